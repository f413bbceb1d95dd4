"""GenEval's metadata format, its image-folder layout and its scoring rules, with the testbed judge as detector.

Format and layout are GenEval's own (Ghosh et al., 2023; github.com/djghosh13/geneval at commit af4902f):
``prompts/evaluation_metadata.jsonl`` holds one record per line (``{"tag", "include", ("exclude"),
"prompt"}``); ``generation/diffusers_generate.py`` writes ``<outdir>/<index:05d>/metadata.jsonl`` (the
record, one JSON object) and ``<outdir>/<index:05d>/samples/<n:05d>.png`` (+ ``grid.png``), which
``evaluation/evaluate_images.py`` reads unchanged. Its rules (``evaluate``): an image is correct when every
include clause finds at least ``count`` objects of ``class`` (all of ``color`` when given) and no exclude
clause finds ``count`` or more; a tag's score is the share of correct images, the overall score the mean
over tags (``summary_scores.py``).

Here the detector is ``eval.judge``: its category head names the one class an image shows, its count head
how many, its colour head their colour (a testbed scene has one species in one colour). Records it cannot
judge (two classes, relative positions) are reported as not applicable, never scored as wrong.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from caption_mixing.atomic import atomic_write_bytes, atomic_write_text
from testbed.geneval import NOT_APPLICABLE, TAGS, record_scene_spec

__all__ = [
    "ATTRIBUTES",
    "TAGS",
    "attribute_hits",
    "judge_ceiling",
    "judge_verdict",
    "read_metadata",
    "sample_path",
    "score_folder",
    "score_images",
    "summary_value",
    "validate_record",
    "write_metadata",
    "write_sample_folder",
]

RELATIONS = ("left of", "right of", "above", "below")  # GenEval's position relations
# The judge's colour and count heads read on their own, whatever class the image shows (not GenEval's rule)
ATTRIBUTES = ("color_any_class", "count_any_class")
_RECORD_KEYS = {"tag", "include", "exclude", "prompt"}
_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}
_SAMPLE = re.compile(r"\d+\.png")


class PredictsImages(Protocol):
    """What scoring needs of a judge (``eval.judge.Judge`` is one)."""

    resolution: int

    def predict(self, images: list[Image.Image]) -> list[dict[str, Any]]: ...


def _check_clause(item: Any, where: str, keys: set[str], previous: int) -> None:
    """One include/exclude clause; ``previous`` is how many include clauses precede it (position targets)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    unknown = set(item) - keys
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (allowed: {sorted(keys)})")
    if not isinstance(item.get("class"), str) or not item["class"]:
        raise ValueError(f"{where}.class: missing or not a non-empty string")
    count = item.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{where}.count: must be an integer >= 1, got {count!r}")
    if "color" in item and (not isinstance(item["color"], str) or not item["color"]):
        raise ValueError(f"{where}.color: must be a non-empty string, got {item['color']!r}")
    if "position" in item:
        pos = item["position"]
        ok = isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
        if not ok or not isinstance(pos[1], int) or not 0 <= pos[1] < previous:
            raise ValueError(f"{where}.position: expected [relation in {RELATIONS}, index of an earlier include]")


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """Check one GenEval record; the error starts with ``where`` (file and line) and names the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - _RECORD_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (GenEval records have {sorted(_RECORD_KEYS)})")
    if record.get("tag") not in TAGS:
        raise ValueError(f"{where}: field tag: {record.get('tag')!r} is not a GenEval tag {TAGS}")
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise ValueError(f"{where}: field prompt: missing or empty")
    include = record.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}: field include: must be a non-empty list")
    for i, item in enumerate(include):
        _check_clause(item, f"{where}: field include[{i}]", _INCLUDE_KEYS, i)
    exclude = record.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"{where}: field exclude: must be a list")
    for i, item in enumerate(exclude):
        _check_clause(item, f"{where}: field exclude[{i}]", _EXCLUDE_KEYS, 0)
    return record


def read_metadata(path: Path) -> list[dict[str, Any]]:
    """Records of a GenEval ``evaluation_metadata.jsonl`` (blank lines skipped), each validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GenEval metadata file not found")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
        records.append(validate_record(record, f"{path}:{lineno}"))
    if not records:
        raise ValueError(f"{path}: no GenEval records")
    return records


def write_metadata(records: list[dict[str, Any]], path: Path) -> Path:
    """Write records as GenEval JSONL (one object per line, keys in the given order), atomically."""
    path = Path(path)
    for i, record in enumerate(records):
        validate_record(record, f"{path}: record {i}")
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def sample_path(out: Path, index: int, n: int) -> Path:
    """Where GenEval keeps sample ``n`` of prompt ``index``: ``<out>/<index:05d>/samples/<n:05d>.png``."""
    return Path(out) / f"{index:05d}" / "samples" / f"{n:05d}.png"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _grid(images: list[Image.Image]) -> Image.Image:
    """All samples side by side in one row (GenEval's grid has one row per batch)."""
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), (i * w, 0))
    return grid


def write_sample_folder(
    out: Path, index: int, record: dict[str, Any], images: list[Image.Image], grid: bool = False
) -> Path:
    """Write one prompt's folder in GenEval's layout; samples left from an earlier, larger write are removed."""
    folder = Path(out) / f"{index:05d}"
    validate_record(record, f"{folder / 'metadata.jsonl'}")
    if not images:
        raise ValueError(f"{folder}: no images to write for prompt {record['prompt']!r}")
    atomic_write_text(folder / "metadata.jsonl", json.dumps(record) + "\n")
    for n, image in enumerate(images):
        atomic_write_bytes(sample_path(out, index, n), _png(image))
    for stale in (folder / "samples").iterdir():
        if _SAMPLE.fullmatch(stale.name) and int(stale.stem) >= len(images):
            stale.unlink()
    if grid:
        atomic_write_bytes(folder / "grid.png", _png(_grid(images)))
    return folder


def _unjudgeable(record: dict[str, Any], judge_classes: dict[str, tuple[Any, ...]]) -> str | None:
    """Why the testbed judge cannot score ``record`` (None when it can); unknown classes are an error."""
    if record["tag"] in NOT_APPLICABLE:
        return NOT_APPLICABLE[record["tag"]]
    for req in [*record["include"], *record.get("exclude", [])]:
        if req["class"] not in judge_classes["category"] or req.get("color", "red") not in judge_classes["color"]:
            raise ValueError(
                f"record {record['prompt']!r}: class {req['class']!r} / colour {req.get('color')!r} is outside the "
                "testbed judge's classes; score real GenEval folders with GenEval's evaluation/evaluate_images.py"
            )
    try:
        record_scene_spec(record)
    except ValueError as e:
        return str(e)
    return None


def judge_verdict(pred: dict[str, Any], record: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's ``evaluate`` on one detection: ``count`` objects of ``category``, all of ``color``."""
    found = {pred["category"]: int(pred["count"])}
    reasons = []
    for req in record["include"]:
        n = found.get(req["class"], 0)
        if n < req["count"]:
            reasons.append(f"expected {req['class']}>={req['count']}, found {n}")
        elif "color" in req and pred["color"] != req["color"]:
            want = f"{req['color']} {req['class']}>={req['count']}"
            reasons.append(f"expected {want}, found 0 {req['color']}; and {n} {pred['color']}")
    for req in record.get("exclude", []):
        n = found.get(req["class"], 0)
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return not reasons, "\n".join(reasons)


def attribute_hits(pred: dict[str, Any], record: dict[str, Any]) -> dict[str, bool]:
    """``ATTRIBUTES`` of one detection, with the class ignored, for records with one include clause: its
    colour when the record names one; GenEval's count rule (at least the include clause's count, fewer than
    an exclude clause's of the same class) when the record asks for more than presence (a count above 1 or
    an upper bound), since a judge that always sees something passes "at least 1" on noise. A generator
    learns colour and number before it draws a shape the judge can name; every GenEval verdict needs the
    shape, so these readings show that stage."""
    if len(record["include"]) != 1:
        return {}
    req, n = record["include"][0], int(pred["count"])
    upper = [ex["count"] for ex in record.get("exclude", []) if ex["class"] == req["class"]]
    hits = {}
    if req["count"] > 1 or upper:
        hits["count_any_class"] = n >= req["count"] and all(n < u for u in upper)
    if "color" in req:
        hits["color_any_class"] = pred["color"] == req["color"]
    return hits


def summary_value(block: dict[str, Any] | None, key: str) -> float | None:
    """One number of a score summary (``score_images``): "overall", a tag's accuracy or an ``ATTRIBUTES``
    reading; None when it has none."""
    block = block or {}
    if key == "overall":
        return block.get("overall")
    return block.get("attributes" if key in ATTRIBUTES else "per_category", {}).get(key)


def _summary(verdicts: list[dict[str, Any]], not_applicable: dict[str, str]) -> dict[str, Any]:
    """Per-tag accuracy over judged images, GenEval's overall (mean over tags that have a score), and the
    ``ATTRIBUTES`` readings over the images that have them."""
    per_category: dict[str, float | None] = {}
    n_images: dict[str, int] = {}
    n_prompts: dict[str, int] = {}
    for tag in TAGS:
        judged = [v for v in verdicts if v["tag"] == tag and v["correct"] is not None]
        n_images[tag] = len(judged)
        n_prompts[tag] = len({v["index"] for v in judged})
        per_category[tag] = sum(v["correct"] for v in judged) / len(judged) if judged else None
    attributes: dict[str, float | None] = {}
    for key in ATTRIBUTES:
        hits = [v["attributes"][key] for v in verdicts if key in v.get("attributes", {})]
        n_images[key] = len(hits)
        attributes[key] = sum(hits) / len(hits) if hits else None
    scored = [s for s in per_category.values() if s is not None]
    return {
        "overall": sum(scored) / len(scored) if scored else None,
        "per_category": per_category,
        "attributes": attributes,
        "n_images": n_images,
        "n_prompts": n_prompts,
        "not_applicable": not_applicable,
        "verdicts": verdicts,
    }


def score_images(
    records: list[dict[str, Any]],
    images: list[list[Image.Image]],
    judge: PredictsImages,
    indices: list[int] | None = None,
) -> dict[str, Any]:
    """Score ``images[i]`` (the samples of ``records[i]``) with ``judge`` under GenEval's rules.

    Returns {"overall", "per_category": {tag: float|None}, "attributes": {ATTRIBUTES key: float|None},
    "n_images": {tag or ATTRIBUTES key: int}, "n_prompts": {tag: int}, "not_applicable": {tag: reason},
    "verdicts": [{"index", "sample", "tag", "prompt", "correct", "reason", "predicted", "attributes"}]};
    ``correct`` is None for a record the judge cannot score (its reason says why).
    """
    from eval.judge import HEADS

    if len(records) != len(images):
        raise ValueError(f"score_images: {len(records)} records but {len(images)} image lists")
    indices = list(range(len(records))) if indices is None else indices
    not_applicable = dict(NOT_APPLICABLE)
    verdicts: list[dict[str, Any]] = []
    for index, record, samples in zip(indices, records, images, strict=True):
        reason = _unjudgeable(record, HEADS)
        base = {"index": index, "tag": record["tag"], "prompt": record["prompt"]}
        if reason is not None:
            not_applicable.setdefault(record["tag"], reason)
            verdicts += [
                {**base, "sample": n, "correct": None, "reason": f"n/a: {reason}"} for n in range(len(samples))
            ]
            continue
        for n, pred in enumerate(judge.predict(samples) if samples else []):
            correct, why = judge_verdict(pred, record)
            predicted = {k: pred[k] for k in ("category", "color", "count")}
            hits = attribute_hits(pred, record)
            verdicts.append(
                {**base, "sample": n, "correct": correct, "reason": why, "predicted": predicted, "attributes": hits}
            )
    return _summary(verdicts, not_applicable)


def _read_prompt_folder(folder: Path) -> tuple[dict[str, Any], list[Image.Image]]:
    """The record and the samples (``samples/<n>.png`` in numeric order) of one GenEval prompt folder."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: missing (a GenEval prompt folder holds metadata.jsonl and samples/)")
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta}: not JSON ({e})") from e
    validate_record(record, f"{meta}:1")
    sample_dir = folder / "samples"
    names = [p for p in sample_dir.iterdir() if _SAMPLE.fullmatch(p.name)] if sample_dir.is_dir() else []
    images = []
    for p in sorted(names, key=lambda p: int(p.stem)):
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return record, images


def score_folder(folder: Path, judge: PredictsImages) -> dict[str, Any]:
    """Score a GenEval sample folder (``<index>/metadata.jsonl`` + ``<index>/samples/<n>.png``) with ``judge``.

    Same result as :func:`score_images`; ``sample`` in a verdict is the file's number (``sample_path`` gives it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: GenEval sample folder not found")
    subs = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not subs:
        raise ValueError(f"{folder}: no <index>/ prompt folders (GenEval layout: <index:05d>/metadata.jsonl)")
    records, images = zip(*(_read_prompt_folder(p) for p in subs), strict=True)
    return score_images(list(records), list(images), judge, [int(p.name) for p in subs])


def judge_ceiling(
    judge: PredictsImages,
    metadata: list[dict[str, Any]],
    images_per_record: int = 4,
    seed: int = 0,
    roundtrip: Callable[[list[Image.Image]], list[Image.Image]] | None = None,
) -> dict[str, Any]:
    """The judge's scores on real testbed renderings matching each record (ceiling) and on uniform noise (floor).

    Real: ``images_per_record`` held-out renderings of the scene each record describes
    (``testbed.geneval.record_scene_spec``, ``testbed.judge_data.render_scenes(split='holdout')``, one
    stream per record). Noise: uniform RGB at the judge's resolution. Returns {"real": ..., "noise": ...},
    each shaped like :func:`score_images`. With ``roundtrip`` (a latent model's VAE encode + decode), also
    "roundtrip": the same real renderings after it, the most a generator decoding through that VAE can reach.
    """
    from eval.judge import HEADS, uniform_noise
    from testbed.judge_data import render_scenes

    if images_per_record < 1:
        raise ValueError(f"images_per_record={images_per_record}: must be >= 1")
    real: list[list[Image.Image]] = []
    for i, record in enumerate(metadata):
        if _unjudgeable(record, HEADS) is not None:
            real.append([])
            continue
        scenes = render_scenes(images_per_record, seed, "holdout", spec=record_scene_spec(record), stream=1 + i)
        real.append([s.image for s in scenes])
    noise_all = uniform_noise(images_per_record * len(metadata), judge.resolution, seed)
    noise = [noise_all[i * images_per_record : (i + 1) * images_per_record] for i in range(len(metadata))]
    out = {"real": score_images(metadata, real, judge), "noise": score_images(metadata, noise, judge)}
    if roundtrip is not None:
        out["roundtrip"] = score_images(metadata, [roundtrip(imgs) if imgs else [] for imgs in real], judge)
    return out
