"""Text-to-image command line: ``python -m t2i {run,train,precompute,sample,geneval} ...``.

python -m t2i run --p 1.0                          # embedded preset end to end (train, export, evaluate)
python -m t2i train --preset dit-xl-2 --set train_latents=/data/lat/{00000..01242}.tar ...
torchrun --nproc-per-node 8 -m t2i train --preset dit-xl-2 ...   # multi-GPU (accelerate launch works too)
python -m t2i precompute --shards '/data/cc12m/{00000..01242}.tar' --vae /models/sd-vae --out /data/lat
python -m t2i sample --pipeline runs/t2i-embedded-p1/pipeline --prompts prompts.txt --out samples/
python -m t2i geneval --pipeline runs/t2i-embedded-p1/pipeline --out geneval/   # testbed prompts + judge
python -m t2i geneval --pipeline P --metadata evaluation_metadata.jsonl --out geneval/  # official GenEval prompts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config_args(p: argparse.ArgumentParser) -> None:
    from t2i.config import list_presets

    p.add_argument("--preset", default="embedded", help=f"one of {', '.join(list_presets())} or a YAML file")
    p.add_argument("--p", default=None, help="synthetic-caption ratio in [0, 1] (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--out", default="runs", help="folder that receives the run folder")
    p.add_argument("--testbed-dir", default=None, help="where the embedded testbed is built/cached")
    p.add_argument("--force", action="store_true", help="re-run even if finished or made by another config")


def _load(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from caption_mixing.mixing import parse_p
    from caption_mixing.paths import check_output_dir
    from t2i.config import load_config, parse_overrides

    try:
        check_output_dir(args.out, "--out")
        overrides = parse_overrides(args.overrides)
        if args.p is not None:
            overrides["p"] = parse_p(args.p, "--p")
        return load_config(args.preset, overrides)
    except ValueError as e:
        parser.error(str(e))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m t2i", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train, export the pipeline and evaluate one p (t2i.experiment.run_point)")
    _config_args(run)
    train = sub.add_parser("train", help="train only (resumes in the same run folder); exports the pipeline")
    _config_args(train)
    pre = sub.add_parser("precompute", help="image shards -> VAE latent shards (keys, alt-text, sidecar link)")
    pre.add_argument("--shards", required=True, help="image shard brace pattern(s), joined by ::")
    pre.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder")
    pre.add_argument("--out", required=True, help="folder for latent shards (same file names) and latents.json")
    pre.add_argument("--resolution", type=int, default=256, help="image side in pixels before encoding")
    pre.add_argument("--batch-size", type=int, default=64)
    pre.add_argument("--sidecar-dir", default=None, help="sidecar folder (default: the image shards' folder)")
    pre.add_argument("--device", default=None)
    pre.add_argument("--allow-pickle-weights", action="store_true", help="load a VAE that has only .bin weights")
    sample = sub.add_parser("sample", help="generate images from a pipeline folder")
    sample.add_argument("--pipeline", required=True, help="diffusers pipeline folder (run_dir/pipeline)")
    sample.add_argument("--prompts", required=True, help="text file (one prompt per line), .json list or .jsonl")
    sample.add_argument("--out", required=True, help="output folder for PNGs, prompts.jsonl and grid.png")
    sample.add_argument("--steps", type=int, default=20, help="DPM-Solver steps")
    sample.add_argument("--guidance-scale", type=float, default=4.5, help="classifier-free guidance scale")
    sample.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    sample.add_argument("--device", default=None)
    sample.add_argument("--allow-pickle-weights", action="store_true", help="load .bin weights (no safetensors)")
    gen = sub.add_parser("geneval", help="GenEval-style images (GenEval folder layout) and judge scores")
    gen.add_argument("--pipeline", required=True, help="diffusers pipeline folder (run_dir/pipeline)")
    gen.add_argument("--metadata", default=None, help="GenEval evaluation_metadata.jsonl (default: the testbed's)")
    gen.add_argument("--out", required=True, help="GenEval output folder: <index>/metadata.jsonl, samples/<n>.png")
    gen.add_argument("--images-per-prompt", type=int, default=4, help="seeded images per prompt (GenEval: 4)")
    gen.add_argument("--seed", type=int, default=0, help="sample n of prompt i uses seed + i * N + n")
    gen.add_argument("--judge", default=None, help="testbed judge folder (python -m eval judge; default: cached)")
    gen.add_argument("--per-tag", type=int, default=None, help="testbed prompts per category (default: all)")
    gen.add_argument("--steps", type=int, default=None, help="DPM-Solver steps (default: the pipeline's)")
    gen.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    gen.add_argument("--device", default=None)
    gen.add_argument("--allow-pickle-weights", action="store_true", help="load .bin weights (no safetensors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args, parser)
    except (ValueError, FileNotFoundError) as e:  # bad input (a flag, file or key): say so, no traceback
        print(f"python -m t2i {args.command}: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "precompute":
        from t2i.precompute import precompute

        manifest = precompute(
            args.shards,
            Path(args.out),
            args.vae,
            args.resolution,
            args.batch_size,
            args.sidecar_dir,
            args.device,
            allow_pickle=args.allow_pickle_weights,
        )
        print(f"latents written; manifest: {manifest}")
        return 0
    if args.command == "sample":
        from t2i.sample import sample_to_folder

        paths = sample_to_folder(
            Path(args.pipeline),
            Path(args.prompts),
            Path(args.out),
            args.steps,
            args.guidance_scale,
            args.seed,
            args.device,
            allow_pickle=args.allow_pickle_weights,
        )
        print(f"{len(paths)} images in {args.out}")
        return 0
    if args.command == "geneval":
        from t2i.geneval import geneval_command, print_summary

        print_summary(
            geneval_command(
                Path(args.pipeline),
                Path(args.out),
                Path(args.metadata) if args.metadata else None,
                Path(args.judge) if args.judge else None,
                images_per_prompt=args.images_per_prompt,
                seed=args.seed,
                per_tag=args.per_tag,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                device=args.device,
                allow_pickle=args.allow_pickle_weights,
            )
        )
        return 0
    cfg = _load(args, parser)
    from t2i import experiment
    from training.distributed import cleanup

    try:
        if args.command == "train":  # same run folder as `run`, without the evaluation
            done = experiment.train_point(cfg, Path(args.out), args.testbed_dir, args.force)
            if "pipeline" in done:
                print(json.dumps(done))
            return 0
        metrics = experiment.run_point(cfg, Path(args.out), args.testbed_dir, args.force)
    finally:
        cleanup()
    if "rank" in metrics:  # a rank > 0 of a multi-process run: rank 0 reports
        return 0
    from t2i.report import format_table

    print(format_table([metrics]))
    if "notice" in metrics:
        print(metrics["notice"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
