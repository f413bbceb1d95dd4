"""One point of a text-to-image ratio sweep: what ``training.point.run_point`` needs from this application.

``T2IApp`` resolves data and frozen components (building the embedded ones on the testbed),
checks the evaluation inputs before training, trains with ``t2i.train.train``, exports the EMA
model as a diffusers pipeline and scores generated images (Table 5). The run folder
(config hash, provenance, reuse or refusal, ``metrics.json``) is ``training``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caption_mixing.atomic import atomic_write_text
from caption_mixing.mixconfig import mode_tag
from caption_mixing.shards import expand_shards
from t2i.config import EMBEDDED, T2IConfig
from t2i.train import DataSpec, ema_transformer, train
from training import point, rundir
from training.checkpoint import load_checkpoint
from training.device import cpu_threads, resolve_device
from training.distributed import barrier, init_distributed
from training.rundir import DONE, check_run_dir, write_run_metadata

__all__ = ["T2IApp", "resolve", "run_dir_for", "run_point", "train_point"]


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
    testbed_root: str | None = None  # the built testbed (embedded runs): its folder's parent caches the judge


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
        from testbed import Testbed, ensure_testbed

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
        testbed_root=str(testbed.root) if testbed is not None else None,
    )


def run_dir_for(out: Path, cfg: T2IConfig) -> Path:
    """``OUT/t2i-<preset>-p<p>[-s<seed>]`` (no label for seed 0: ``training.rundir.seed_label``); the sweep calls it
    through its task registry."""
    label = "-".join(x for x in (mode_tag(cfg), rundir.seed_label(cfg.seed)) if x) or None  # mix_mode=gate: "-gate"
    return rundir.run_dir_for(out, "t2i", cfg.preset, cfg.p, label=label)


def preflight(cfg: T2IConfig, res: Resolved) -> None:
    """Evaluation inputs checked before the first step: the judge's model and checkpoint, FID weights,
    and a held-out sample with both an alt-text and a synthetic caption."""
    from t2i.components import check_open_clip_name
    from t2i.evaluate import holdout_prompts

    check_open_clip_name(res.clip_model)
    if not res.clip_checkpoint or not Path(res.clip_checkpoint).is_file():
        raise FileNotFoundError(
            f"eval_clip_checkpoint={res.clip_checkpoint!r}: a local open_clip checkpoint file is required for "
            f"eval_clip_model={res.clip_model!r} (checked before training)"
        )
    if cfg.fid_inception_weights:
        from t2i.evaluate import check_fid_backend

        if not Path(cfg.fid_inception_weights).is_file():
            raise FileNotFoundError(f"fid_inception_weights={cfg.fid_inception_weights!r}: no such file")
        check_fid_backend()
    holdout_prompts(res.holdout, cfg.synthetic_source, 1, res.holdout_sidecar_dir)


def export_run_pipeline(cfg: T2IConfig, run_dir: Path, ckpt: Path, res: Resolved) -> Path:
    """EMA transformer + the frozen parts -> ``run_dir/pipeline`` (diffusers folder)."""
    from t2i.components import load_text_encoder, load_vae
    from t2i.sample import export_pipeline

    allow = cfg.allow_pickle_weights
    text = load_text_encoder(res.text_encoder, cfg.max_sequence_length, "cpu", res.text_encoder_model, allow)
    vae = load_vae(res.vae, allow_pickle=allow)
    transformer = ema_transformer(cfg, ckpt, text.width)
    return export_pipeline(run_dir / "pipeline", cfg, transformer, vae, text)


def reference_scores(judge, items: list[dict], size: tuple[int, int], seed: int) -> dict:
    """The judge's scores for the held-out real images (ceiling) and uniform-noise images (floor), same prompts."""
    from eval.judge import uniform_noise

    sets = {"noise_images": uniform_noise(len(items), size[0], seed)}
    if all(it["image"] is not None for it in items):
        sets["real_images"] = [it["image"] for it in items]
    columns = {"original": "alt", "synthetic": "synthetic"}
    return {
        name: {col: judge.mean_score(imgs, [it[key] for it in items]) for col, key in columns.items()}
        for name, imgs in sets.items()
    }


def generate_holdout(cfg: T2IConfig, pipe, max_len: int, items: list[dict], run_dir: Path) -> dict[str, list]:
    """One image per held-out alt-text and per synthetic caption (prompt i: seed sample_seed + i in both
    columns), saved under ``samples/{alt,synthetic}/KEY.png`` with ``samples/prompts.jsonl`` and ``grid.png``."""
    from t2i.sample import generate, image_grid

    kwargs = dict(
        max_sequence_length=max_len, steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, seed=cfg.sample_seed
    )
    images = {col: generate(pipe, [it[col] for it in items], **kwargs) for col in ("alt", "synthetic")}
    samples = run_dir / "samples"
    for col, imgs in images.items():
        (samples / col).mkdir(parents=True, exist_ok=True)
        for it, img in zip(items, imgs, strict=True):
            img.save(samples / col / f"{it['key']}.png")
    rows = [
        {"key": it["key"], "alt": it["alt"], "synthetic": it["synthetic"], "seed": cfg.sample_seed + i}
        for i, it in enumerate(items)
    ]
    atomic_write_text(samples / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    k = min(cfg.grid_prompts, len(items))
    grid = image_grid(images["alt"][:k] + images["synthetic"][:k], cols=k)  # row 1: alt-text, row 2: synthetic
    grid.save(run_dir / "grid.png")
    return images


def clip_metrics(judge, items: list[dict], images: dict[str, list]) -> dict:
    """Table 5: CLIP similarity of each image with its prompt (mean, std) and truncation counts of the judge."""
    scores = {col: judge.per_image(images[col], [it[col] for it in items]) for col in ("alt", "synthetic")}
    mean = {col: judge.mean_score(images[col], [it[col] for it in items]) for col in ("alt", "synthetic")}
    return {
        "clip_score": {"original": mean["alt"], "synthetic": mean["synthetic"]},
        "clip_score_std": {
            "original": float(torch.tensor(scores["alt"]).std()),
            "synthetic": float(torch.tensor(scores["synthetic"]).std()),
        },
        "judge_truncated": {
            col: judge.processor.count_truncated([it[col] for it in items]) for col in ("alt", "synthetic")
        },
    }


def evaluate_pipeline(cfg: T2IConfig, run_dir: Path, pipeline_dir: Path, res: Resolved) -> dict:
    """Generate from held-out alt-texts and synthetic captions; CLIP-score each against its prompt; distance
    of the generated images from the held-out real ones; on the testbed, GenEval-style accuracy (t2i.geneval)."""
    from eval.judge import uniform_noise
    from t2i.evaluate import ClipJudge, distribution_metrics, holdout_prompts, load_open_clip
    from t2i.sample import load_pipeline

    device = resolve_device(cfg.device)
    items = holdout_prompts(res.holdout, cfg.synthetic_source, cfg.eval_prompts, res.holdout_sidecar_dir)
    pipe, meta = load_pipeline(pipeline_dir, device)
    max_len = int(meta["max_sequence_length"])
    tok = pipe.tokenizer
    gen_truncated = {col: sum(len(tok(it[col]).input_ids) > max_len for it in items) for col in ("alt", "synthetic")}
    images = generate_holdout(cfg, pipe, max_len, items, run_dir)

    model, preprocess, tokenizer = load_open_clip(res.clip_model, res.clip_checkpoint, "cpu")
    judge = ClipJudge(model, preprocess, tokenizer)
    clip = clip_metrics(judge, items, images)
    metrics = {
        "clip_score": clip["clip_score"],
        "clip_score_std": clip["clip_score_std"],
        "eval_prompts": len(items),
        "eval_clip_model": res.clip_model,
        "eval_clip_checkpoint": res.clip_checkpoint,
        "truncated_prompts": {"generator": gen_truncated, "judge": clip["judge_truncated"]},
        "grid": str((run_dir / "grid.png").resolve()),
        "sample_steps": cfg.sample_steps,
        "guidance_scale": cfg.guidance_scale,
    }
    size = images["alt"][0].size
    metrics["clip_score_reference"] = reference_scores(judge, items, size, cfg.sample_seed)
    real = [it["image"] for it in items if it["image"] is not None]
    sets = {"original": images["alt"], "synthetic": images["synthetic"]}
    sets["noise"] = uniform_noise(len(items), size[0], cfg.sample_seed)
    metrics["distribution"] = distribution_metrics(judge, real, sets, cfg.fid_inception_weights, cfg.sample_seed)
    if res.testbed_root and cfg.train_shards == EMBEDDED and not cfg.train_latents:
        from t2i.geneval import embedded_geneval

        metrics["geneval"] = embedded_geneval(
            cfg, pipe, max_len, run_dir, Path(res.testbed_root), res.holdout, items, images
        )
    return metrics


class T2IApp:
    """The text-to-image application's hooks for ``training.point.run_point`` (see ``training.point.PointApp``)."""

    def run_dir(self, out: Path, cfg: T2IConfig) -> Path:
        return run_dir_for(out, cfg)

    def resolve(self, cfg: T2IConfig, testbed_dir: str | None) -> Resolved:
        return resolve(cfg, testbed_dir)

    def preflight(self, cfg: T2IConfig, res: Resolved) -> None:
        preflight(cfg, res)

    def train(self, cfg: T2IConfig, run_dir: Path, res: Resolved) -> Path:
        return train(cfg, run_dir, res.data, res.vae, res.text_encoder, res.text_encoder_model)

    def evaluate(self, cfg: T2IConfig, run_dir: Path, ckpt: Path, res: Resolved) -> dict[str, Any]:
        """Export the EMA pipeline, generate from held-out prompts and score the images."""
        pipeline_dir = export_run_pipeline(cfg, run_dir, ckpt, res)
        metrics = evaluate_pipeline(cfg, run_dir, pipeline_dir, res)
        metrics.update(
            synthetic_source=cfg.synthetic_source,
            run_dir=str(run_dir.resolve()),
            pipeline=str(pipeline_dir.relative_to(run_dir)),
            train_truncated_prompts=load_checkpoint(ckpt).get("truncated_prompts", 0),
        )
        return metrics


def run_point(cfg: T2IConfig, out: Path, testbed_dir: str | None = None, force: bool = False) -> dict:
    """Train, export and evaluate one p; return the metrics dict (also written to ``metrics.json``).

    Under torchrun/srun/accelerate launch every rank calls it: all ranks train, rank 0 evaluates.
    """
    return point.run_point(T2IApp(), cfg, Path(out), testbed_dir=testbed_dir, force=force)


def train_point(cfg: T2IConfig, out: Path, testbed_dir: str | None = None, force: bool = False) -> dict:
    """``python -m t2i train``: the same run folder as ``run_point`` (checked, resolved, resumed),
    trained and exported, without evaluating (no ``metrics.json``, so a later ``run`` evaluates it)."""
    app = T2IApp()
    env = init_distributed(cfg.device)
    with cpu_threads(env.device, cfg.workers):
        run_dir = app.run_dir(Path(out), cfg)
        if check_run_dir(run_dir, cfg.to_dict(), force) == DONE:
            print(f"{run_dir}: finished earlier with the same config (see its metrics.json)")
            return {"run_dir": str(run_dir)}
        barrier(env)  # every rank has read the folder's state before rank 0 writes to it
        res = point.main_first(env, lambda: app.resolve(cfg, testbed_dir))
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_metadata(run_dir, cfg.to_dict(), cfg.seed)
        barrier(env)
        ckpt = app.train(cfg, run_dir, res)
        if not env.is_main:
            return {"rank": env.rank, "checkpoint": str(ckpt)}
        return {"checkpoint": str(ckpt), "pipeline": str(export_run_pipeline(cfg, run_dir, ckpt, res))}
