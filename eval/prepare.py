"""Convert datasets from their original layouts to the local webdataset layout ``eval zeroshot`` reads.

``python -m eval prepare TASK --source DIR --out DIR`` for TASK in cub, ucf101, kinetics700, hateful_memes
(which clip_benchmark lacks), sun397 (its standard partition-1 test split: clip_benchmark's wds_sun397 is
the whole dataset) and winogavil (DataComp's association task, from its released CSV + images).
The output (``--out``, normally ``DATASET_ROOT/wds_<task>``) is what ``eval zeroshot`` reads; class names
and templates are written beside the shards (eval/data or clip_benchmark's lists for templates, the
source's own files for CUB, SUN397 and Kinetics700 class names). Videos contribute their middle frame.
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
from eval.wds_folder import TYPE_FILE
from eval.wds_writer import write_classification_wds, write_wds

PREPARABLE = ("cub", "sun397", "ucf101", "kinetics700", "hateful_memes", "winogavil")


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
        raise ValueError(f"neither clip_benchmark's nor eval/data's template lists have {task!r}")
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


# ---------------------------------------------------------------------------------------------- SUN397


def prepare_sun397(source: Path, out: Path) -> dict[str, object]:
    """SUN397 partition 1 test split (Partitions/Testing_01.txt, 50 images per class, 19,850 in all).

    ``source`` holds the images (``SUN397/a/abbey/...`` or ``a/abbey/...``, the official archive or
    clip_benchmark's builder folder) and the official ``Partitions`` files. Class names are written as
    clip_benchmark's builder names them ("/a/apse/indoor" -> "apse indoor"); label = line of ClassName.txt.
    """
    parts = [source, source / "Partitions", source / "SUN397"]
    names_file = _first_existing([d / "ClassName.txt" for d in parts], "SUN397 needs ClassName.txt")
    test_file = _first_existing(
        [d / "Testing_01.txt" for d in parts], "SUN397 needs the official Partitions (Testing_01.txt)"
    )
    class_paths = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    index = {c: i for i, c in enumerate(class_paths)}
    classnames = [c[3:].replace("_", " ").replace("/", " ") for c in class_paths]  # "/a/apse/indoor"
    listed = [ln.strip() for ln in test_file.read_text().splitlines() if ln.strip()]
    image_root = source / "SUN397" if (source / "SUN397").is_dir() else source

    def samples() -> Iterator[tuple[str, bytes, str, int]]:
        for n, rel in enumerate(tqdm(listed, desc="sun397", unit="img")):
            cls = rel.rsplit("/", 1)[0]
            if cls not in index:
                raise ValueError(f"{test_file}: {rel} is in no class of {names_file}")
            path = _need(image_root / rel.lstrip("/"), f"listed in {test_file}")
            yield f"{n:06d}", path.read_bytes(), _ext(path), index[cls]

    n = write_classification_wds(out, samples(), classnames, _templates("sun397"))
    return {"task": "sun397", "num_samples": n, "num_classes": len(classnames), "partition": test_file.name}


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


# ---------------------------------------------------------------------------------------------- WinoGAViL


def _json_list(value: str, where: str) -> list[str]:
    try:
        items = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: expected a JSON list of names, got {value[:60]!r}") from e
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"{where}: expected a JSON list of names, got {value[:60]!r}")
    return items


def prepare_winogavil(source: Path, out: Path) -> dict[str, object]:
    """WinoGAViL as released (nlphuji/winogavil): winogavil_dataset.csv + winogavil_images/<candidate>.jpg.

    The CSV's ``candidates`` and ``associations`` columns are JSON lists of image names; every instance is
    kept (DataComp scores all of them and reports the 10-12-candidate mean as its main metric).
    """
    table = _need(source / "winogavil_dataset.csv", "WinoGAViL's release has winogavil_dataset.csv")
    images = source / "winogavil_images"
    if not images.is_dir():
        hint = f"unzip {source / 'winogavil_images.zip'} there" if (source / "winogavil_images.zip").is_file() else ""
        raise ValueError(f"{images} is missing; WinoGAViL's images go there (<candidate>.jpg) {hint}".strip())
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"cue", "candidates", "associations"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{table}: expected columns {sorted(need)}, got {sorted(rows[0]) if rows else 'no rows'}")
    instances = []
    for i, r in enumerate(rows, 2):  # line 1 is the header
        where = f"{table}:{i}"
        cands, assoc = _json_list(r["candidates"], where), _json_list(r["associations"], where)
        if not assoc or not set(assoc) <= set(cands):
            raise ValueError(f"{where}: associations {assoc} must be a non-empty subset of candidates {cands}")
        instances.append((r.get("ID", str(i - 2)), r["cue"], cands, assoc))

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for n, (iid, cue, cands, assoc) in enumerate(tqdm(instances, desc="winogavil", unit="inst")):
            meta = {"id": iid, "cue": cue, "candidates": cands, "associations": assoc}
            members = {"json": json.dumps(meta).encode()}
            for j, name in enumerate(cands):
                path = _need(images / f"{name}.jpg", f"candidate of {table} row {n + 2}")
                members[f"c{j:02d}.jpg"] = path.read_bytes()
            yield f"{n:06d}", members

    n = write_wds(out, samples(), {TYPE_FILE: "association\n"}, shard_size=200)
    sizes = sorted({len(c) for _, _, c, _ in instances})
    return {"task": "winogavil", "num_samples": n, "candidate_counts": sizes}


PREPARERS = {
    "cub": prepare_cub,
    "sun397": prepare_sun397,
    "winogavil": prepare_winogavil,
    "ucf101": prepare_ucf101,
    "kinetics700": prepare_kinetics700,
    "hateful_memes": prepare_hateful_memes,
}


def prepare(task: str, source: str | Path, out: str | Path) -> dict[str, object]:
    """Dispatch to the task's converter; unknown tasks name the ones that can be prepared."""
    if task not in PREPARERS:
        raise ValueError(
            f"prepare: {task!r} cannot be prepared; choose one of {', '.join(PREPARABLE)} "
            f"(the other tasks are read from clip_benchmark's published wds folders)"
        )
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"--source {source}: not a folder")
    return PREPARERS[task](source, Path(out))
