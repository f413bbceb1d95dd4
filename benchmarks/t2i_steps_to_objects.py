"""How many DiT steps until the embedded text-to-image model draws objects: GenEval-style accuracy against steps.

The embedded preset's DiT, recipe and components (testbed, VAE, text tower, judge: the same cached ones
``python -m t2i run`` uses), trained on inputs encoded once: each training image's VAE posterior and the
text states of the caption the preset's mixing rule draws for it in epoch 0 (so the caption of a sample is
fixed for the run, as ``mix_mode: per_sample``). Only the DiT runs per step, which is what a longer schedule
costs. At each step count in ``--steps`` the EMA weights are exported as a pipeline and scored on the
testbed's GenEval-style prompts by the testbed judge, beside the judge's ceiling (real renderings), the
pipeline's own ceiling (the same renderings through its VAE) and floor (uniform noise):

    python benchmarks/t2i_steps_to_objects.py --steps 1600,4000,8000 --out runs/steps_to_objects
    python benchmarks/t2i_steps_to_objects.py --steps 2000,8000,32000 --device cuda --set p=0   # a GPU session

Writes ``results.json`` and ``results.md`` in ``--out`` (one row per step count, rewritten after each) beside
``config.json`` and ``provenance.json``, and prints ``name=value`` lines; the last one is the colour
accuracy at the largest step count (TAGS ends with colors).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caption_mixing.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from caption_mixing.pipeline import SharedEpoch, iter_batches  # noqa: E402
from caption_mixing.provenance import write_run_metadata  # noqa: E402
from t2i.components import load_text_encoder, load_vae  # noqa: E402
from t2i.config import load_config  # noqa: E402
from t2i.experiment import resolve  # noqa: E402
from t2i.model import build_transformer, train_scheduler  # noqa: E402
from t2i.train import EMA, diffusion_loss, encode_batch, make_accelerator, training_loader, warmup_constant  # noqa: E402
from training.device import resolve_device  # noqa: E402
from training.distributed import DistEnv  # noqa: E402

TAGS = ("single_object", "counting", "colors")


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``--set key=value`` pairs, values read as YAML (numbers, booleans, null), as ``python -m t2i``."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


@torch.no_grad()
def encode_training_set(cfg, res, text, device: str) -> dict[str, torch.Tensor]:
    """One pass over the training shards: posterior moments of every image, text states of its caption."""
    vae = load_vae(res.vae, device)
    loader = training_loader(cfg, res.data, SharedEpoch(0), 256, 1, None, text.tokenizer)
    moments, hidden, masks = [], [], []
    for _, batch in tqdm(iter_batches(loader), desc="encode training set", unit="batch"):
        post = vae.encode(batch["x"].to(device)).latent_dist
        moments.append(torch.cat([post.mean, post.logvar], dim=1).cpu())
        h, m = text.encode(batch["captions"], device)
        hidden.append(h.half().cpu())
        masks.append(m.cpu())
    empty_h, empty_m = text.encode([""], device)
    return {
        "moments": torch.cat(moments),
        "hidden": torch.cat(hidden),
        "mask": torch.cat(masks),
        "empty_hidden": empty_h[0].cpu(),
        "empty_mask": empty_m[0].cpu(),
    }


def score(cfg, model, res, text, out: Path, judge_dir: Path) -> dict:
    """Export the EMA model as a pipeline and score it like the sweep does (``t2i.geneval``)."""
    from eval.judge import load_judge
    from t2i.geneval import EMBEDDED_PER_TAG, METADATA_SEED, run_geneval_folder
    from t2i.sample import export_pipeline, load_pipeline
    from testbed.geneval import geneval_metadata

    out.mkdir(parents=True, exist_ok=True)
    export_pipeline(out / "pipeline", cfg, model.cpu(), load_vae(res.vae), text)
    pipe, _ = load_pipeline(out / "pipeline", resolve_device(cfg.device))
    records = geneval_metadata(seed=METADATA_SEED, per_tag=EMBEDDED_PER_TAG)
    return run_geneval_folder(
        pipe,
        records,
        out / "geneval",
        judge=load_judge(judge_dir),
        judge_path=judge_dir,
        metadata=f"testbed.geneval.geneval_metadata(seed={METADATA_SEED}, per_tag={EMBEDDED_PER_TAG})",
        max_sequence_length=cfg.max_sequence_length,
        seed=cfg.sample_seed,
        steps=cfg.sample_steps,
        guidance_scale=cfg.guidance_scale,
    )


def train_and_score(cfg, data: dict, eval_steps: list[int], res, text, out: Path, judge_dir: Path) -> list[dict]:
    """The trainer's loss, optimizer, warm-up, clip and EMA on the encoded set; a GenEval score per step count."""
    device = resolve_device(cfg.device)
    accelerator = make_accelerator(cfg, DistEnv(device=device))
    vae = load_vae(res.vae, device)  # its scaling factor, for the trainer's latent sampling
    torch.manual_seed(cfg.seed)
    model = build_transformer(cfg, data["hidden"].shape[-1]).to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_constant(s, cfg.warmup_steps))
    noise_sched = train_scheduler(cfg)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    n, rows, train_s = len(data["moments"]), [], 0.0
    for step in tqdm(range(1, max(eval_steps) + 1), desc="DiT", unit="step"):
        t0 = time.perf_counter()
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen, device=device).cpu()
        hidden, mask = data["hidden"][idx].float(), data["mask"][idx].clone()
        drop = torch.rand(cfg.batch_size) < cfg.caption_dropout
        hidden[drop], mask[drop] = data["empty_hidden"].float(), data["empty_mask"]
        latents = encode_batch({"x": data["moments"][idx]}, vae, cfg, True, gen, device)
        loss = diffusion_loss(model, accelerator, cfg, noise_sched, latents, hidden.to(device), mask.to(device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        ema.update(model)
        train_s += time.perf_counter() - t0
        if step in eval_steps:
            snapshot = ema.copy_to(copy.deepcopy(model)).eval()
            doc = score(cfg, snapshot, res, text, out / f"step_{step:06d}", judge_dir)
            rows.append({"steps": step, "train_seconds": round(train_s, 1), "loss": loss.item(), **summary_of(doc)})
            write_results(out, cfg, rows)  # after every step count, so a stopped run keeps what it measured
            print(json.dumps(rows[-1]), flush=True)
    return rows


def write_results(out: Path, cfg, rows: list[dict]) -> None:
    doc = {"config": cfg.to_dict(), "device": resolve_device(cfg.device), "torch": torch.__version__, "rows": rows}
    atomic_write_json(out / "results.json", doc)
    atomic_write_text(out / "results.md", markdown(rows, cfg))


def summary_of(doc: dict) -> dict:
    """Per-category accuracy (%) of the generated images, and the judge's on real renderings (ceiling), on the
    same renderings through the pipeline's VAE (the pipeline's own ceiling) and on uniform noise (floor)."""
    sets = {"generated": doc["scores"], **doc["judge_reference"]}
    return {name: {tag: round(100 * sets[name]["per_category"][tag], 1) for tag in TAGS} for name in sets}


def markdown(rows: list[dict], cfg) -> str:
    head = f"GenEval-style accuracy (%) of the embedded T2I against DiT steps (batch {cfg.batch_size}, p={cfg.p:g})\n\n"
    lines = ["| DiT steps | train s | " + " | ".join(TAGS) + " |", "|---" * (len(TAGS) + 2) + "|"]
    for r in rows:
        accuracy = " | ".join(f"{r['generated'][t]:.1f}" for t in TAGS)
        lines.append(f"| {r['steps']} | {r['train_seconds']:.0f} | {accuracy} |")
    references = {"real": "real renderings", "roundtrip": "real renderings through the VAE", "noise": "noise"}
    for ref, what in references.items():
        if ref in rows[-1]:
            lines.append(f"| judge on {what} | | " + " | ".join(f"{rows[-1][ref][t]:.1f}" for t in TAGS) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="1600,4000,8000", help="comma list of DiT step counts to score at")
    ap.add_argument("--out", type=Path, default=Path("runs/steps_to_objects"))
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="embedded preset override")
    args = ap.parse_args(argv)
    try:
        eval_steps = sorted({int(s) for s in args.steps.split(",")})
    except ValueError:
        ap.error(f"--steps {args.steps!r}: expected a comma list of integers")
    if eval_steps[0] < 1:
        ap.error("--steps: step counts must be >= 1")
    overrides = parse_overrides(args.set)
    if args.device:
        overrides["device"] = args.device
    cfg = load_config("embedded", overrides)
    res = resolve(cfg)
    from t2i.geneval import ensure_embedded_judge

    judge_dir = ensure_embedded_judge(Path(res.testbed_root).parent, cfg.resolution, real_shards=list(res.holdout))
    device = resolve_device(cfg.device)
    text = load_text_encoder(res.text_encoder, cfg.max_sequence_length, device)
    t0 = time.perf_counter()
    data = encode_training_set(cfg, res, text, device)
    print(f"encoded {len(data['moments'])} training samples in {time.perf_counter() - t0:.0f} s", flush=True)
    text.model.cpu()
    args.out.mkdir(parents=True, exist_ok=True)
    write_run_metadata(args.out, cfg.to_dict(), cfg.seed)
    rows = train_and_score(cfg, data, eval_steps, res, text, args.out, judge_dir)
    for r in rows:
        for tag in TAGS:
            print(f"{tag}_pct_at_{r['steps']}={r['generated'][tag]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
