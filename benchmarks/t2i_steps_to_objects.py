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
from caption_mixing.paths import check_output_dir  # noqa: E402
from caption_mixing.pipeline import SharedEpoch, iter_batches  # noqa: E402
from caption_mixing.provenance import write_run_metadata  # noqa: E402
from eval.geneval import ATTRIBUTES, summary_value  # noqa: E402
from t2i.components import load_text_encoder, load_vae  # noqa: E402
from t2i.config import T2IConfig, load_config, parse_overrides  # noqa: E402
from t2i.experiment import resolve  # noqa: E402
from t2i.model import train_scheduler  # noqa: E402
from t2i.train import Learner, diffusion_loss, encode_batch, make_accelerator, training_loader  # noqa: E402
from training.device import resolve_device  # noqa: E402
from training.distributed import DistEnv  # noqa: E402

TAGS = ("single_object", "counting", "colors")
COLUMNS = (*TAGS, *ATTRIBUTES)  # then the judge's colour and count heads, whatever class it reads


@torch.no_grad()
def encode_training_set(cfg, res, vae, text, device: str) -> dict[str, torch.Tensor]:
    """One pass over the training shards: posterior moments of every image, text states of its caption."""
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


def score(cfg, model, vae, text, res, out: Path) -> dict:
    """Export the EMA model as a pipeline and score it as the sweep does (``t2i.geneval.embedded_geneval_folder``)."""
    from t2i.geneval import embedded_geneval_folder
    from t2i.sample import export_pipeline, load_pipeline

    out.mkdir(parents=True, exist_ok=True)
    export_pipeline(out / "pipeline", cfg, model.cpu(), vae, text)
    pipe, _ = load_pipeline(out / "pipeline", resolve_device(cfg.device))
    max_len = cfg.max_sequence_length
    return embedded_geneval_folder(cfg, pipe, max_len, out / "geneval", res.testbed_root, res.holdout)[0]


def train_steps(cfg, caption_channels: int, eval_steps: list[int], next_batch, evaluate, save) -> list[dict]:
    """The trainer's learner (DiT, EMA, AdamW, warm-up), loss and clip, fed by ``next_batch(gen) -> (latents,
    hidden, mask)``. At each of ``eval_steps``: ``evaluate(step, ema_model)`` gives a row (train seconds and loss
    are added), then ``save(rows)``, so that a stopped run keeps what it measured."""
    device = resolve_device(cfg.device)
    accelerator = make_accelerator(cfg, DistEnv(device=device))
    torch.manual_seed(cfg.seed)
    learner = Learner.build(cfg, caption_channels, device)
    model, ema, opt, lr_sched = learner.model, learner.ema, learner.optimizer, learner.lr_sched
    noise_sched = train_scheduler(cfg)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    rows, train_s = [], 0.0
    for step in tqdm(range(1, max(eval_steps) + 1), desc="DiT", unit="step"):
        t0 = time.perf_counter()
        latents, hidden, mask = next_batch(gen)
        loss = diffusion_loss(model, accelerator, cfg, noise_sched, latents, hidden, mask, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        ema.update(model)
        train_s += time.perf_counter() - t0
        if step in eval_steps:
            snapshot = ema.copy_to(copy.deepcopy(model)).eval()
            row = {"steps": step, "train_seconds": round(train_s, 1), "loss": loss.item()}
            rows.append({**row, **evaluate(step, snapshot)})
            save(rows)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def train_and_score(cfg, data: dict, eval_steps: list[int], res, vae, text, out: Path) -> list[dict]:
    """``train_steps`` on the encoded set (caption dropout to the empty prompt, for guidance); a GenEval score per
    step count."""
    device = resolve_device(cfg.device)
    n = len(data["moments"])

    def next_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen, device=device).cpu()
        hidden, mask = data["hidden"][idx].float(), data["mask"][idx].clone()
        drop = torch.rand(cfg.batch_size) < cfg.caption_dropout
        hidden[drop], mask[drop] = data["empty_hidden"].float(), data["empty_mask"]
        latents = encode_batch({"x": data["moments"][idx]}, vae, cfg, True, gen, device)
        return latents, hidden.to(device), mask.to(device)

    def evaluate(step: int, model: torch.nn.Module) -> dict:
        return summary_of(score(cfg, model, vae, text, res, out / f"step_{step:06d}"))

    def save(rows: list[dict]) -> None:
        write_results(out, cfg, rows)

    return train_steps(cfg, data["hidden"].shape[-1], eval_steps, next_batch, evaluate, save)


def print_step_figures(rows: list[dict], keys: tuple[str, ...], block: str | None = None) -> None:
    """The probes' ``name=value`` lines, ``<key>_pct_at_<steps>`` per row and key (from ``row[block]`` when
    given); the last key of the last row is the benchmark's figure."""
    for r in rows:
        for key in keys:
            print(f"{key}_pct_at_{r['steps']}={(r[block] if block else r)[key]}")


def write_results(out: Path, cfg, rows: list[dict]) -> None:
    doc = {"config": cfg.to_dict(), "device": resolve_device(cfg.device), "torch": torch.__version__, "rows": rows}
    atomic_write_json(out / "results.json", doc)
    atomic_write_text(out / "results.md", markdown(rows, cfg))


def summary_of(doc: dict) -> dict:
    """Per-category accuracy (%) and the any-class colour and count readings of the generated images, and the
    judge's on real renderings (ceiling), on the same renderings through the pipeline's VAE (the pipeline's own
    ceiling) and on uniform noise (floor)."""
    sets = {"generated": doc["scores"], **doc["judge_reference"]}

    def pct(block: dict, key: str) -> float | None:
        v = summary_value(block, key)
        return None if v is None else round(100 * v, 1)

    return {name: {key: pct(sets[name], key) for key in COLUMNS} for name in sets}


def markdown(rows: list[dict], cfg) -> str:
    head = f"GenEval-style accuracy (%) of the embedded T2I against DiT steps (batch {cfg.batch_size}, p={cfg.p:g})\n\n"
    lines = ["| DiT steps | train s | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]

    def cells(block: dict) -> str:
        return " | ".join("n/a" if block.get(k) is None else f"{block[k]:.1f}" for k in COLUMNS)

    for r in rows:
        lines.append(f"| {r['steps']} | {r['train_seconds']:.0f} | {cells(r['generated'])} |")
    references = {"real": "real renderings", "roundtrip": "real renderings through the VAE", "noise": "noise"}
    for ref, what in references.items():
        if ref in rows[-1]:
            lines.append(f"| judge on {what} | | {cells(rows[-1][ref])} |")
    return head + "\n".join(lines) + "\n"


def parse_args(
    argv: list[str] | None, doc: str, steps: str, out: str, add_flags=None
) -> tuple[argparse.Namespace, list[int], T2IConfig]:
    """The flags the DiT-probe benchmarks share (``add_flags(parser)`` adds a probe's own); returns (args, sorted
    step counts, the embedded preset with the overrides). Bad flags exit with a usage error naming the flag,
    before anything is written."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default=steps, help="comma list of DiT step counts to score at")
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="embedded preset override")
    if add_flags is not None:
        add_flags(ap)
    args = ap.parse_args(argv)
    try:
        eval_steps = sorted({int(s) for s in args.steps.split(",")})
    except ValueError:
        ap.error(f"--steps {args.steps!r}: expected a comma list of integers")
    if eval_steps[0] < 1:
        ap.error("--steps: step counts must be >= 1")
    try:
        check_output_dir(args.out, "--out")
        overrides = parse_overrides(args.set)
        if args.device:
            overrides["device"] = args.device
        cfg = load_config("embedded", overrides)
    except ValueError as e:
        ap.error(str(e))
    return args, eval_steps, cfg


def main(argv: list[str] | None = None) -> int:
    args, eval_steps, cfg = parse_args(argv, __doc__, "1600,4000,8000", "runs/steps_to_objects")
    res = resolve(cfg)
    device = resolve_device(cfg.device)
    vae = load_vae(res.vae, device)
    text = load_text_encoder(res.text_encoder, cfg.max_sequence_length, device)
    t0 = time.perf_counter()
    data = encode_training_set(cfg, res, vae, text, device)
    print(f"encoded {len(data['moments'])} training samples in {time.perf_counter() - t0:.0f} s", flush=True)
    vae.cpu(), text.model.cpu()  # the exported pipelines are built on the CPU, then loaded on the device
    args.out.mkdir(parents=True, exist_ok=True)
    write_run_metadata(args.out, cfg.to_dict(), cfg.seed)
    rows = train_and_score(cfg, data, eval_steps, res, vae, text, args.out)
    print_step_figures(rows, (*ATTRIBUTES, *TAGS), "generated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
