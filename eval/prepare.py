"""Convert the tasks clip_benchmark lacks from their original layouts to its local webdataset layout.

``python -m eval prepare TASK --source DIR --out DIR`` for TASK in cub, ucf101, kinetics700, hateful_memes.
The output (``--out``, normally ``DATASET_ROOT/wds_<task>``) is what ``eval zeroshot`` reads; class names
and templates are written beside the shards (eval/data for templates, the source's own files for CUB
and Kinetics700 class names). Videos contribute their middle frame.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from caption_mixing.atomic import atomic_write_json
from eval.prompts import packaged_classnames, packaged_templates
from eval.video import middle_frame_jpeg
from eval.wds_writer import write_classification_wds

PREPARABLE = ("cub", "ucf101", "kinetics700", "hateful_memes")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise ValueError(f"{path} is missing; {what}")
    return path


def _first_existing(candidates: list[Path], what: str) -> Path:
    for c in candidates:
        if c.exists():
            return c
    raise ValueError(f"{what}: none of {', '.join(str(c) for c in candidates)} exists")


def _table(path: Path) -> dict[str, str]:
    """``id value`` lines (CUB's metadata files) -> {id: value}."""
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{i}: expected '<id> <value>', got {line!r}")
            out[parts[0]] = parts[1].strip()
    return out


def _templates(task: str) -> list[str]:
    found = packaged_templates(task)
    if found is None:
        raise ValueError(f"eval/data/templates.json has no templates for {task!r}")
    return found[0]


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


# ---------------------------------------------------------------------------------------------- CUB


def prepare_cub(source: Path, out: Path) -> dict[str, object]:
    """CUB-200-2011 test split (train_test_split.txt is_train = 0); class names from classes.txt."""
    if not (source / "images.txt").is_file() and (source / "CUB_200_2011" / "images.txt").is_file():
        source = source / "CUB_200_2011"
    images = _table(_need(source / "images.txt", "CUB needs images.txt"))
    labels = _table(_need(source / "image_class_labels.txt", "CUB needs image_class_labels.txt"))
    is_train = _table(_need(source / "train_test_split.txt", "CUB needs train_test_split.txt"))
    classes = _table(_need(source / "classes.txt", "CUB needs classes.txt"))
    class_ids = sorted(classes, key=int)
    # "001.Black_footed_Albatross" -> "Black footed Albatross"
    classnames = [re.sub(r"^\d+\.", "", classes[c]).replace("_", " ") for c in class_ids]
    index = {c: i for i, c in enumerate(class_ids)}
    test_ids = [i for i in sorted(images, key=int) if is_train.get(i) == "0"]
    if not test_ids:
        raise ValueError(f"{source / 'train_test_split.txt'}: no test images (is_train = 0)")

    def samples() -> Iterator[tuple[str, bytes, str, int]]:
        for n, i in enumerate(tqdm(test_ids, desc="cub", unit="img")):
            if i not in labels or labels[i] not in index:
                raise ValueError(f"{source / 'image_class_labels.txt'}: image {i} has no known class")
            path = _need(source / "images" / images[i], f"listed in {source / 'images.txt'}")
            yield f"{n:06d}", path.read_bytes(), _ext(path), index[labels[i]]

    n = write_classification_wds(out, samples(), classnames, _templates("cub"))
    return {"task": "cub", "num_samples": n, "num_classes": len(classnames)}


# ---------------------------------------------------------------------------------------------- videos


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def prepare_ucf101(source: Path, out: Path) -> dict[str, object]:
    """UCF101 testlist01 videos -> middle frames; classes by classInd.txt, names from eval/data."""
    lists = _first_existing(
        [source / "classInd.txt", source / "ucfTrainTestlist" / "classInd.txt"], "UCF101 needs classInd.txt"
    ).parent
    class_ind = _table(lists / "classInd.txt")
    ind_names = [class_ind[k] for k in sorted(class_ind, key=int)]
    ours = packaged_classnames("ucf101")
    assert ours is not None
    by_squash = {_squash(n): n for n in ours[0]}
    missing = [n for n in ind_names if _squash(n) not in by_squash]
    if missing or len(ind_names) != len(ours[0]):
        raise ValueError(
            f"{lists / 'classInd.txt'} lists {len(ind_names)} classes, {ours[1]} has {len(ours[0])}; "
            f"unmatched: {missing[:5]}"
        )
    classnames = [by_squash[_squash(n)] for n in ind_names]
    label_of = {_squash(n): i for i, n in enumerate(ind_names)}
    test = [ln.split()[0] for ln in _need(lists / "testlist01.txt", "UCF101 split 1").read_text().splitlines() if ln]
    video_root = source / "UCF-101" if (source / "UCF-101").is_dir() else source

    def samples() -> Iterator[tuple[str, bytes, str, int]]:
        for n, rel in enumerate(tqdm(test, desc="ucf101", unit="video")):
            folder = rel.split("/")[0]
            if _squash(folder) not in label_of:
                raise ValueError(f"{lists / 'testlist01.txt'}: {rel} is in no class of classInd.txt")
            path = _need(video_root / rel, f"listed in {lists / 'testlist01.txt'}")
            yield f"{n:06d}", middle_frame_jpeg(path), "jpg", label_of[_squash(folder)]

    n = write_classification_wds(out, samples(), classnames, _templates("ucf101"))
    return {"task": "ucf101", "num_samples": n, "num_classes": len(classnames)}


def prepare_kinetics700(source: Path, out: Path) -> dict[str, object]:
    """Kinetics700 validation videos -> middle frames; class names = sorted labels of the annotation CSV.

    YouTube removals make some listed videos unavailable in every copy of Kinetics; those are counted
    and listed in ``OUT/prepare_report.json``, never dropped silently.
    """
    ann = _first_existing(
        [source / n for n in ("validate.csv", "val.csv", "annotations/validate.csv", "annotations/val.csv")],
        "Kinetics700 needs its annotation CSV",
    )
    with open(ann, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"label", "youtube_id", "time_start", "time_end"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{ann}: expected columns {sorted(need)}, got {sorted(rows[0]) if rows else 'no rows'}")
    classnames = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classnames)}
    video_dirs = [d for d in (source / "val", source / "validate", source / "videos", source) if d.is_dir()]
    missing: list[str] = []

    def find(r: dict[str, str]) -> Path | None:
        stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        for d in video_dirs:
            for cand in (d / r["label"] / f"{stem}.mp4", d / f"{stem}.mp4"):
                if cand.is_file():
                    return cand
        missing.append(stem)
        return None

    def samples() -> Iterator[tuple[str, bytes, str, int]]:
        for n, r in enumerate(tqdm(rows, desc="kinetics700", unit="video")):
            if (path := find(r)) is not None:
                yield f"{n:06d}", middle_frame_jpeg(path), "jpg", index[r["label"]]

    n = write_classification_wds(out, samples(), classnames, _templates("kinetics700"))
    report = {
        "task": "kinetics700",
        "num_samples": n,
        "num_classes": len(classnames),
        "num_listed": len(rows),
        "num_missing_videos": len(missing),
        "missing_videos": missing,
    }
    atomic_write_json(out / "prepare_report.json", report)
    if missing:
        tqdm.write(
            f"[prepare] kinetics700: {len(missing)}/{len(rows)} listed videos not found; "
            f"see {out / 'prepare_report.json'}"
        )
    return report


# ---------------------------------------------------------------------------------------------- memes


def prepare_hateful_memes(source: Path, out: Path) -> dict[str, object]:
    """HatefulMemes dev split (dev.jsonl + img/); label 1 = "hatespeech meme"."""
    dev = _need(source / "dev.jsonl", "HatefulMemes needs dev.jsonl (the split MetaCLIP evaluates)")
    entries = []
    for i, line in enumerate(dev.read_text().splitlines(), 1):
        if line.strip():
            try:
                e = json.loads(line)
                entries.append((str(e["img"]), int(e["label"])))
            except (json.JSONDecodeError, KeyError, ValueError) as err:
                raise ValueError(f"{dev}:{i}: expected JSON with 'img' and 'label' ({err})") from err
    found = packaged_classnames("hateful_memes")
    assert found is not None

    def samples() -> Iterator[tuple[str, bytes, str, int]]:
        for n, (img, label) in enumerate(tqdm(entries, desc="hateful_memes", unit="img")):
            path = _need(source / img, f"listed in {dev}")
            yield f"{n:06d}", path.read_bytes(), _ext(path), label

    n = write_classification_wds(out, samples(), found[0], _templates("hateful_memes"))
    return {"task": "hateful_memes", "num_samples": n, "num_classes": 2}


PREPARERS = {
    "cub": prepare_cub,
    "ucf101": prepare_ucf101,
    "kinetics700": prepare_kinetics700,
    "hateful_memes": prepare_hateful_memes,
}


def prepare(task: str, source: str | Path, out: str | Path) -> dict[str, object]:
    """Dispatch to the task's converter; unknown tasks name the ones that can be prepared."""
    if task not in PREPARERS:
        raise ValueError(
            f"prepare: {task!r} cannot be prepared; choose one of {', '.join(PREPARABLE)} "
            f"(the other tasks are read through clip_benchmark)"
        )
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"--source {source}: not a folder")
    return PREPARERS[task](source, Path(out))
