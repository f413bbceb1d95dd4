"""GenEval-style evaluation of a text-to-image pipeline (issue 17): ``python -m t2i geneval``.

Images go into GenEval's folder layout (``eval.geneval.write_sample_folder``:
``<out>/<index:05d>/metadata.jsonl`` + ``samples/<n:05d>.png``), which the official scorer
(github.com/djghosh13/geneval, ``evaluation/evaluate_images.py``) reads unchanged. On the testbed the
judge of ``eval.judge`` scores them (``eval.geneval.score_folder``), beside its own accuracy on real
renderings of the same prompts (ceiling) and on uniform noise (floor) (``eval.geneval.judge_ceiling``).
Seeds: sample n of prompt i is generated with seed + i * images_per_prompt + n, whatever the batching.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from PIL import Image

from caption_mixing.atomic import atomic_write_json, atomic_write_text, build_folder_once, temp_target
from caption_mixing.paths import check_output_dir

IMAGES_PER_PROMPT = 4  # GenEval's default (its generation scripts' --n_samples)
METADATA_SEED = 0  # testbed GenEval-style prompts of the embedded sweep: the same for every p and seed
EMBEDDED_PER_TAG = 24  # prompts per category in the embedded sweep's evaluation
JUDGE_SEED = 0
RESULT = "geneval.json"


def official_command(folder: Path) -> str:
    """The official GenEval scorer on ``folder`` (run from a clone of djghosh13/geneval, with its detector)."""
    return (
        f"python evaluation/evaluate_images.py {folder} --outfile {folder}/results.jsonl "
        "--model-path <mask2former folder>  &&  python evaluation/summary_scores.py "
        f"{folder}/results.jsonl"
    )


def generate_geneval(
    pipe,
    records: list[dict],
    out: Path,
    *,
    max_sequence_length: int,
    images_per_prompt: int = IMAGES_PER_PROMPT,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 4.5,
) -> list[list[Image.Image]]:
    """``images_per_prompt`` seeded images per record, written in GenEval's layout under ``out``."""
    from eval.geneval import write_sample_folder
    from t2i.sample import generate

    n = images_per_prompt
    prompts = [r["prompt"] for r in records for _ in range(n)]
    images = generate(
        pipe,
        prompts,
        max_sequence_length=max_sequence_length,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
    )
    per_record = [images[i * n : (i + 1) * n] for i in range(len(records))]
    for index, (record, imgs) in enumerate(zip(records, per_record, strict=True)):
        write_sample_folder(out, index, record, imgs)
    return per_record


def _summary(scores: dict) -> dict:
    """A score_folder result without its per-image verdicts (those stay in geneval.json)."""
    return {k: v for k, v in scores.items() if k != "verdicts"}


def score_geneval(out: Path, judge, records: list[dict], images_per_prompt: int, seed: int = 0, roundtrip=None) -> dict:
    """Judge the folder, and measure the judge itself on real renderings, on noise and (with ``roundtrip``, the
    pipeline's VAE) on real renderings after encode + decode, for the same records."""
    from eval.geneval import judge_ceiling, score_folder

    scores = score_folder(out, judge)
    reference = judge_ceiling(judge, records, images_per_record=images_per_prompt, seed=seed, roundtrip=roundtrip)
    return {"scores": scores, "judge_reference": {k: _summary(v) for k, v in reference.items()}}


def ensure_embedded_judge(
    cache: Path, resolution: int, seed: int = JUDGE_SEED, progress: bool = True, **train_kwargs: Any
) -> Path:
    """The testbed judge at ``resolution``: trained once (``eval.judge.train_judge``) into ``cache`` and reused.

    Keyed by what determines it (``train_kwargs`` go to ``train_judge``: steps, train_images, real_shards,
    ...), built in a private folder and renamed into place as the embedded VAE and CLIP are
    (``t2i.embedded``), so concurrent sweep points never see a half-written judge. Returns the folder."""
    from eval import judge as judge_mod

    doc = {"resolution": resolution, "seed": seed, "format": judge_mod.FORMAT, "steps": judge_mod.DEFAULT_STEPS}
    doc.update({k: v if isinstance(v, (int, float, str)) else json.dumps(v) for k, v in train_kwargs.items()})
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache) / f"t2i-judge-r{resolution}-{key}"
    if (root / judge_mod.CARD).is_file():
        print(f"t2i GenEval judge: reusing {root}", flush=True)
        return root
    print(f"t2i GenEval judge: training into {root}", flush=True)
    t0 = time.perf_counter()
    build_folder_once(
        root,
        judge_mod.CARD,
        lambda tmp: judge_mod.train_judge(tmp, resolution, seed=seed, progress=progress, **train_kwargs),
    )
    print(f"t2i GenEval judge: ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def judge_holdout(judge, items: list[dict], images: dict[str, list[Image.Image]], path: Path) -> dict:
    """The judge's reading of each held-out generated image against its scene's truth (testbed labels):
    written to ``path`` (JSONL, for the HTML page); returns the share of images matching on every field."""
    rows = []
    hits = {"alt": 0, "synthetic": 0}
    known = [it for it in items if it.get("truth")]
    preds = {col: judge.predict(images[col]) for col in hits}
    for i, it in enumerate(items):
        row: dict[str, Any] = {"key": it["key"], "truth": it.get("truth")}
        for col in hits:
            pred = {k: preds[col][i][k] for k in ("category", "color", "count")}
            if it.get("truth"):
                pred["match"] = {k: pred[k] == it["truth"].get(k) for k in ("category", "color", "count")}
                hits[col] += all(pred["match"].values())
            row[col] = pred
        rows.append(row)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    if not known:
        return {}
    return {"original": hits["alt"] / len(known), "synthetic": hits["synthetic"] / len(known), "n": len(known)}


def embedded_geneval_folder(cfg, pipe, max_len: int, out: Path, testbed_root: Path, holdout: list[str]):
    """The embedded sweep's GenEval-style folder for one pipeline: the testbed's prompts (``EMBEDDED_PER_TAG`` per
    category), generated with the config's sampler settings and scored by the cached testbed judge.

    Returns (``geneval.json``'s document, the judge, its folder)."""
    from eval.judge import load_judge
    from testbed.geneval import geneval_metadata

    judge_dir = ensure_embedded_judge(Path(testbed_root).parent, cfg.resolution, real_shards=list(holdout))
    judge = load_judge(judge_dir)
    doc = run_geneval_folder(
        pipe,
        geneval_metadata(seed=METADATA_SEED, per_tag=EMBEDDED_PER_TAG),
        out,
        judge=judge,
        judge_path=judge_dir,
        metadata=f"testbed.geneval.geneval_metadata(seed={METADATA_SEED}, per_tag={EMBEDDED_PER_TAG})",
        max_sequence_length=max_len,
        images_per_prompt=IMAGES_PER_PROMPT,
        seed=cfg.sample_seed,
        steps=cfg.sample_steps,
        guidance_scale=cfg.guidance_scale,
    )
    return doc, judge, judge_dir


def embedded_geneval(
    cfg, pipe, max_len: int, run_dir: Path, testbed_root: Path, holdout: list[str], items: list[dict], images
) -> dict:
    """``metrics["geneval"]`` of an embedded run: the testbed's GenEval-style prompts, the cached judge,
    scores without verdicts, the judge's ceiling and floor, and the held-out scene match."""
    out = run_dir / "geneval"
    doc, judge, judge_dir = embedded_geneval_folder(cfg, pipe, max_len, out, testbed_root, holdout)
    summary = _summary(doc["scores"])
    summary.update(
        judge=doc["judge_reference"],
        judge_path=str(judge_dir),
        images_per_prompt=doc["images_per_prompt"],
        prompts=doc["prompts"],
        folder=str(out.resolve()),
        holdout_scene_match=judge_holdout(judge, items, images, run_dir / "samples" / "judge.jsonl"),
    )
    return summary


_INDEX_FOLDER = re.compile(r"\d{5,}")


def check_geneval_out(out: Path, flag: str) -> Path:
    """``out`` if it is new, empty or an earlier GenEval output (which a new run replaces whole); anything else
    in it is an error naming ``flag``, so pointing ``--out`` at a folder of other files never deletes them."""
    out = check_output_dir(out, f"--{flag}")
    if not out.is_dir():
        return out
    for entry in out.iterdir():
        ours = entry.name == RESULT or temp_target(entry.name) == RESULT
        ours = ours or (entry.is_dir() and _INDEX_FOLDER.fullmatch(entry.name) is not None)
        if not ours:
            raise ValueError(
                f"--{flag} {out}: holds {entry.name!r}, which is not part of a GenEval output folder "
                f"(<index>/ folders and {RESULT}); a GenEval run replaces its folder whole, so pass a new or empty one"
            )
    return out


def run_geneval_folder(
    pipe,
    records: list[dict],
    out: Path,
    *,
    judge=None,
    judge_path: Path | None = None,
    metadata: str,
    max_sequence_length: int,
    images_per_prompt: int = IMAGES_PER_PROMPT,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 4.5,
) -> dict:
    """Generate into ``out`` (GenEval layout), score when a judge is given, write ``out/geneval.json``."""
    from t2i.sample import vae_roundtrip

    out = check_geneval_out(out, "out")
    if out.exists():  # a stale folder from another run would mix into the official scorer's input
        shutil.rmtree(out)
    out.mkdir(parents=True)
    kwargs = dict(max_sequence_length=max_sequence_length, steps=steps, guidance_scale=guidance_scale, seed=seed)
    generate_geneval(pipe, records, out, images_per_prompt=images_per_prompt, **kwargs)
    doc: dict[str, Any] = {
        "metadata": metadata,
        "prompts": len(records),
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "seed_rule": "sample n of prompt i: seed + i * images_per_prompt + n",
        "steps": steps,
        "guidance_scale": guidance_scale,
        "official_scorer": official_command(out),
    }
    if judge is not None:
        doc.update(
            score_geneval(out, judge, records, images_per_prompt, seed, roundtrip=vae_roundtrip(pipe)),
            judge_path=str(judge_path) if judge_path else None,
        )
        doc["judge_card"] = getattr(judge, "card", None)
    atomic_write_json(out / RESULT, doc)
    return doc


def geneval_command(
    pipeline: Path,
    out: Path,
    metadata: Path | None = None,
    judge: Path | None = None,
    *,
    images_per_prompt: int = IMAGES_PER_PROMPT,
    seed: int = 0,
    per_tag: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    device: str | None = None,
    allow_pickle: bool = False,
) -> dict:
    """``python -m t2i geneval``: a GenEval metadata file (or the testbed's prompts) -> images -> scores.

    With the testbed's prompts and no ``judge``, the cached testbed judge at the pipeline's resolution is
    used (trained on first use). With a GenEval metadata file and no judge, only images are written: run
    the official scorer on them (``official_scorer`` in the result)."""
    from eval.geneval import read_metadata
    from t2i.config import check_sample_steps
    from t2i.sample import load_pipeline
    from training.device import resolve_device

    for flag, value in (("--images-per-prompt", images_per_prompt), ("--per-tag", per_tag)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    if steps is not None:
        check_sample_steps(steps, "--steps")
    check_geneval_out(Path(out), "out")  # before the slow part, and before anything is written
    if metadata is not None:  # the prompts first: a bad file fails before the pipeline loads
        records, source = read_metadata(Path(metadata)), str(metadata)
    else:
        from testbed.geneval import geneval_metadata

        records = geneval_metadata(seed=METADATA_SEED, per_tag=per_tag)  # the sweep's prompts when per_tag matches
        source = f"testbed.geneval.geneval_metadata(seed={METADATA_SEED}, per_tag={per_tag})"
    pipe, meta = load_pipeline(Path(pipeline), resolve_device(device), allow_pickle=allow_pickle)
    max_len = int(meta.get("max_sequence_length", pipe.tokenizer.model_max_length))
    if metadata is None and judge is None:  # testbed prompts: the cached testbed judge at the pipeline's resolution
        from testbed.cache import default_testbed_root

        resolution = int(meta.get("resolution") or pipe.transformer.config.sample_size * pipe.vae_scale_factor)
        judge = ensure_embedded_judge(default_testbed_root().parent, resolution)
    loaded = None
    if judge is not None:
        from eval.judge import load_judge

        loaded = load_judge(Path(judge))
    return run_geneval_folder(
        pipe,
        records,
        Path(out),
        judge=loaded,
        judge_path=judge,
        metadata=source,
        max_sequence_length=max_len,
        images_per_prompt=images_per_prompt,
        seed=seed,
        steps=steps if steps is not None else int(meta.get("sample_steps", 20)),
        guidance_scale=guidance_scale if guidance_scale is not None else float(meta.get("guidance_scale", 4.5)),
    )


def print_summary(doc: dict) -> None:
    """Per-category accuracy of the generated images beside the judge's ceiling and floor (or, without a
    judge, where the images are and the official scorer's command)."""
    from eval.geneval import summary_value

    n = doc["prompts"] * doc["images_per_prompt"]
    print(f"{n} images ({doc['prompts']} prompts x {doc['images_per_prompt']}) from {doc['metadata']}")
    scores = doc.get("scores")
    if scores is None:
        print(f"no judge: score them with GenEval's official scorer:\n  {doc['official_scorer']}")
        return
    ref = doc.get("judge_reference", {})
    print(f"{'category':<16}{'generated':>10}{'real (ceiling)':>16}{'through VAE':>13}{'noise (floor)':>15}  images")

    def pct(block: dict | None, tag: str) -> str:
        v = summary_value(block, tag)
        return "n/a" if v is None else f"{100 * v:.1f}"

    for tag in [*scores["per_category"], "overall", *scores.get("attributes", {})]:
        count = scores.get("n_images", {}).get(tag, "")
        print(
            f"{tag:<16}{pct(scores, tag):>10}{pct(ref.get('real'), tag):>16}{pct(ref.get('roundtrip'), tag):>13}"
            f"{pct(ref.get('noise'), tag):>15}  {count}"
        )
    for tag, why in scores.get("not_applicable", {}).items():
        print(f"n/a {tag}: {why}")
