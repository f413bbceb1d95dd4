"""One point of a text-to-image ratio sweep: resolve data and components, train, export, evaluate.

The run folder is the unit of reproducibility and idempotency (as in ``clip_train.experiment``):
resolved config with its hash, provenance, checkpoints, training log, the exported pipeline,
samples, a grid and ``metrics.json``. A folder whose metrics exist for the same config is reused;
one made by a different config is refused unless forced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from caption_mixing.atomic import atomic_write_json, atomic_write_text
from caption_mixing.provenance import write_run_metadata
from caption_mixing.shards import expand_shards
from clip_train.experiment import RunConflictError, check_run_dir  # noqa: F401  (re-exported)
from t2i.config import EMBEDDED, T2IConfig
from t2i.train import DataSpec, cpu_threads, ema_transformer, resolve_device, train

TESTBED_NOTICE = "Embedded synthetic testbed: numbers exercise the suite and are not paper results."


@dataclass
class Resolved:
    data: DataSpec
    holdout: list[str]
    holdout_sidecar_dir: str | None
    vae: str
    text_encoder: str
    text_encoder_model: str | None
    clip_model: str
    clip_checkpoint: str | None
    uses_testbed: bool


def resolve(cfg: T2IConfig, testbed_dir: str | None = None) -> Resolved:
    """Turn "embedded" entries into testbed paths (building the testbed and components once)."""
    from t2i.data import latents_sidecar_dir

    embedded = [
        k
        for k in ("train_shards", "holdout_shards", "vae", "text_encoder", "eval_clip_model")
        if getattr(cfg, k) == EMBEDDED and not (k == "train_shards" and cfg.train_latents)
    ]
    testbed = comps = None
    if embedded:
        from caption_mixing.testbed import Testbed, ensure_testbed

        if testbed_dir and (Path(testbed_dir) / "testbed.json").exists():
            testbed = Testbed.load(testbed_dir)
        else:
            testbed = ensure_testbed(testbed_dir)
        if {"vae", "text_encoder", "eval_clip_model"} & set(embedded):
            from t2i.embedded import ensure_embedded_components

            comps = ensure_embedded_components(cfg, testbed)
    from t2i.embedded import embedded_split

    split = embedded_split(testbed.train_shards) if testbed is not None else None
    if cfg.train_latents:
        data = DataSpec(
            cfg.train_latents, True, cfg.sidecar_dir or latents_sidecar_dir(cfg.train_latents), cfg.dataset_size
        )
    elif cfg.train_shards == EMBEDDED:
        n = len(split[0]) * testbed.config.shard_size
        data = DataSpec(split[0], False, cfg.sidecar_dir, cfg.dataset_size or n)
    else:
        data = DataSpec(cfg.train_shards, False, cfg.sidecar_dir, cfg.dataset_size)
    if cfg.holdout_shards == EMBEDDED:
        holdout = split[1]
    elif cfg.holdout_shards:
        holdout = expand_shards(cfg.holdout_shards)
    else:
        raise ValueError("holdout_shards is not set: the evaluation needs held-out image shards with sidecars")
    embedded_clip = cfg.eval_clip_model == EMBEDDED
    return Resolved(
        data=data,
        holdout=holdout,
        holdout_sidecar_dir=None if cfg.holdout_shards == EMBEDDED else cfg.sidecar_dir,
        vae=str(comps.vae) if cfg.vae == EMBEDDED else cfg.vae,
        text_encoder=str(comps.text_encoder) if cfg.text_encoder == EMBEDDED else cfg.text_encoder,
        text_encoder_model=None if cfg.text_encoder == EMBEDDED else cfg.text_encoder_model,
        clip_model=comps.clip_model if embedded_clip else cfg.eval_clip_model,
        clip_checkpoint=str(comps.clip_checkpoint) if embedded_clip else cfg.eval_clip_checkpoint,
        uses_testbed=testbed is not None,
    )


def run_dir_for(out: Path, cfg: T2IConfig) -> Path:
    return Path(out) / f"t2i-{Path(cfg.preset or 'custom').stem}-p{cfg.p:g}"


def export_run_pipeline(cfg: T2IConfig, run_dir: Path, ckpt: Path, res: Resolved) -> Path:
    """EMA transformer + the frozen parts -> ``run_dir/pipeline`` (diffusers folder)."""
    from t2i.components import load_text_encoder, load_vae
    from t2i.sample import export_pipeline

    text = load_text_encoder(res.text_encoder, cfg.max_sequence_length, "cpu", res.text_encoder_model)
    vae = load_vae(res.vae)
    transformer = ema_transformer(cfg, ckpt, text.width)
    return export_pipeline(run_dir / "pipeline", cfg, transformer, vae, text)


def reference_scores(judge, items: list[dict], size: tuple[int, int], seed: int) -> dict:
    """The judge's scores for the held-out real images (ceiling) and uniform-noise images (floor), same prompts."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    noise = [
        Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())
        for _ in items
    ]
    sets = {"noise_images": noise}
    if all(it["image"] is not None for it in items):
        sets["real_images"] = [it["image"] for it in items]
    columns = {"original": "alt", "synthetic": "synthetic"}
    return {
        name: {col: judge.mean_score(imgs, [it[key] for it in items]) for col, key in columns.items()}
        for name, imgs in sets.items()
    }


def evaluate_pipeline(cfg: T2IConfig, run_dir: Path, pipeline_dir: Path, res: Resolved) -> dict:
    """Generate from held-out alt-texts and synthetic captions; CLIP-score each against its prompt."""
    from t2i.evaluate import ClipJudge, fid_score, holdout_prompts, load_open_clip
    from t2i.sample import generate, image_grid, load_pipeline

    device = resolve_device(cfg)
    items = holdout_prompts(res.holdout, cfg.synthetic_source, cfg.eval_prompts, res.holdout_sidecar_dir)
    pipe, meta = load_pipeline(pipeline_dir, device)
    max_len = int(meta["max_sequence_length"])
    tok = pipe.tokenizer
    gen_truncated = {col: sum(len(tok(it[col]).input_ids) > max_len for it in items) for col in ("alt", "synthetic")}
    kwargs = dict(
        max_sequence_length=max_len, steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, seed=cfg.sample_seed
    )
    images = {col: generate(pipe, [it[col] for it in items], **kwargs) for col in ("alt", "synthetic")}
    samples = run_dir / "samples"
    for col, imgs in images.items():
        (samples / col).mkdir(parents=True, exist_ok=True)
        for it, img in zip(items, imgs, strict=True):
            img.save(samples / col / f"{it['key']}.png")
    atomic_write_text(
        samples / "prompts.jsonl",
        "".join(json.dumps({"key": it["key"], "alt": it["alt"], "synthetic": it["synthetic"]}) + "\n" for it in items),
    )
    k = min(cfg.grid_prompts, len(items))
    grid = image_grid(images["alt"][:k] + images["synthetic"][:k], cols=k)  # row 1: alt-text, row 2: synthetic
    grid.save(run_dir / "grid.png")

    model, preprocess, tokenizer = load_open_clip(res.clip_model, res.clip_checkpoint, "cpu")
    judge = ClipJudge(model, preprocess, tokenizer)
    scores = {col: judge.per_image(images[col], [it[col] for it in items]) for col in ("alt", "synthetic")}
    mean = {col: judge.mean_score(images[col], [it[col] for it in items]) for col in ("alt", "synthetic")}
    metrics = {
        "clip_score": {"original": mean["alt"], "synthetic": mean["synthetic"]},
        "clip_score_std": {
            "original": float(torch.tensor(scores["alt"]).std()),
            "synthetic": float(torch.tensor(scores["synthetic"]).std()),
        },
        "eval_prompts": len(items),
        "eval_clip_model": res.clip_model,
        "eval_clip_checkpoint": res.clip_checkpoint,
        "truncated_prompts": {"generator": gen_truncated, "judge": judge.processor.truncated},
        "grid": str((run_dir / "grid.png").resolve()),
        "sample_steps": cfg.sample_steps,
        "guidance_scale": cfg.guidance_scale,
    }
    real = [it["image"] for it in items if it["image"] is not None]
    metrics["clip_score_reference"] = reference_scores(judge, items, images["alt"][0].size, cfg.sample_seed)
    if cfg.fid_inception_weights and real:
        metrics["fid"] = {col: fid_score(real, images[col], cfg.fid_inception_weights) for col in ("alt", "synthetic")}
    return metrics


def run_point(cfg: T2IConfig, out: Path, testbed_dir: str | None = None, force: bool = False) -> dict:
    """Train, export and evaluate one p; return the metrics dict (also written to ``metrics.json``)."""
    with cpu_threads(cfg):
        return _run_point(cfg, out, testbed_dir, force)


def start_run(
    cfg: T2IConfig, out: Path, testbed_dir: str | None, force: bool
) -> tuple[PartialState, Path, Resolved | None]:
    """Every rank: check the run folder, resolve data and components, and let rank 0 write the config
    and provenance. Rank 0 resolves first, so it alone builds the embedded testbed and components and
    the other ranks reuse them. ``Resolved`` is None when the folder finished earlier with this config.
    """
    dist = PartialState(cpu=resolve_device(cfg) == "cpu")
    run_dir = run_dir_for(out, cfg)
    state = check_run_dir(run_dir, cfg, force)
    dist.wait_for_everyone()  # every rank has read the folder's state before rank 0 writes to it
    if state == "done":
        return dist, run_dir, None
    with dist.main_process_first():
        res = resolve(cfg, testbed_dir)
    if dist.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_metadata(run_dir, cfg.to_dict(), cfg.seed)
    dist.wait_for_everyone()
    return dist, run_dir, res


def _run_point(cfg: T2IConfig, out: Path, testbed_dir: str | None, force: bool) -> dict:
    # Under accelerate/torchrun/Slurm every rank calls this: all ranks train, rank 0 alone evaluates.
    t0 = time.perf_counter()
    dist, run_dir, res = start_run(cfg, out, testbed_dir, force)
    if res is None:
        print(f"{run_dir}: finished earlier with the same config; reusing its metrics.json")
        return json.loads((run_dir / "metrics.json").read_text())
    prep_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    ckpt = train(cfg, run_dir, res.data, res.vae, res.text_encoder, res.text_encoder_model)
    train_s = time.perf_counter() - t1
    if not dist.is_main_process:
        return {"rank": dist.process_index, "steps": cfg.steps_for(res.data.dataset_size)}
    t2 = time.perf_counter()
    pipeline_dir = export_run_pipeline(cfg, run_dir, ckpt, res)
    metrics = evaluate_pipeline(cfg, run_dir, pipeline_dir, res)
    eval_s = time.perf_counter() - t2

    from clip_train.checkpoint import load_checkpoint

    train_state = load_checkpoint(ckpt)
    metrics.update(
        p=cfg.p,
        label=f"p={cfg.p:g}",
        synthetic_source=cfg.synthetic_source,
        run_dir=str(run_dir.resolve()),
        pipeline=str(pipeline_dir.relative_to(run_dir)),
        checkpoint=str(ckpt.relative_to(run_dir)),
        steps=train_state["step"],
        mixing=train_state["mixing"],
        train_truncated_prompts=train_state["truncated_prompts"],
        data_errors=train_state["data_errors"],
        prepare_seconds=round(prep_s, 1),
        train_seconds=round(train_s, 1),
        eval_seconds=round(eval_s, 1),
        device=resolve_device(cfg),
        world_size=dist.num_processes,
        torch_threads=torch.get_num_threads(),
    )
    if res.uses_testbed:
        metrics["notice"] = TESTBED_NOTICE
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics
