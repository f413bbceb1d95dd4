"""Writing: the train shards with their caption sidecars, and the evaluation task folders.

Train shards are img2dataset-style WebDataset tars (``{key}.jpg``, ``{key}.txt`` with the alt-text,
``{key}.json`` with metadata plus a ``"testbed"`` ground-truth record), each with one sidecar per
synthetic source; ~1% of samples have no ``altogether`` caption and ~0.5% an empty one, because real
re-captioning runs have gaps. Eval tasks are clip_benchmark local-WebDataset folders. Every shard
and task draws from its own RNG stream and tar members carry fixed metadata, so builds are
byte-identical and independent of build order.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from caption_mixing.atomic import atomic_write_bytes, atomic_write_text
from caption_mixing.sidecar import sidecar_path, write_sidecar
from testbed.captions import dense_caption, train_captions
from testbed.render import render
from testbed.world import (
    BACKGROUNDS,
    CATEGORIES,
    COLORS,
    CONCEPTS,
    COUNT_WORDS,
    EVAL_TASKS,
    EVAL_TEMPLATES,
    FINE_TASKS,
    MANIFEST_NAME,
    POSITIONS,
    Concept,
    TestbedConfig,
)


def train_concept_probs(seed: int) -> np.ndarray:
    """Zipf-like frequencies over the 64 concepts; every category gets one concept per rank block of 8,
    so the long tail is spread evenly over categories rather than concentrated in a few."""
    rng = np.random.default_rng([seed, 0, 1])
    ranks = np.empty(len(CONCEPTS), dtype=np.int64)
    species_order = [rng.permutation(8) for _ in CATEGORIES]
    for block in range(8):
        cats = rng.permutation(len(CATEGORIES))
        for j, ci in enumerate(cats):
            ranks[ci * 8 + species_order[ci][block]] = block * 8 + j
    weights = 1.0 / (ranks + 1.0) ** 1.1
    return weights / weights.sum()


def fine_classes(task: str) -> list[Concept]:
    """The species of a fine-grained task ``concept_<category>``, in label order."""
    category = task.removeprefix("concept_")
    if task not in FINE_TASKS:
        raise KeyError(f"{task!r} is not a fine-grained testbed task ({', '.join(FINE_TASKS)})")
    return [c for c in CONCEPTS if c.category == category]


def _sample_attrs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concept-independent attributes: color, count, position (used for count 1), background."""
    colors = rng.integers(0, len(COLORS), n)
    counts = rng.choice(np.arange(1, 5), size=n, p=[0.55, 0.2, 0.13, 0.12])
    positions = rng.integers(0, len(POSITIONS), n)
    backgrounds = rng.integers(0, len(BACKGROUNDS), n)
    return colors, counts, positions, backgrounds


_TAR_MTIME = 1_700_000_000


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata, so two builds are byte-identical."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = _TAR_MTIME
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "testbed"
    tar.addfile(ti, io.BytesIO(data))


def empty_stats() -> dict[str, Any]:
    """Per-shard counts the manifest reports: alt-text kinds, sidecar gaps, samples per concept."""
    return {"alt_kind": {"correct": 0, "wrong": 0, "none": 0}, "missing": 0, "empty": 0, "concepts": [0] * 64}


def _train_meta(
    r: random.Random, cfg: TestbedConfig, key: str, alt: str, kind: str, concept: Concept, scene: dict[str, Any]
) -> dict[str, Any]:
    """img2dataset-style ``{key}.json``, plus the ground truth under ``"testbed"``."""
    ow, oh = r.choice(((640, 480), (800, 600), (1024, 768), (500, 500), (1200, 800), (480, 640)))
    digest = hashlib.sha1(f"{cfg.seed}/{key}".encode()).hexdigest()[:16]
    return {
        "url": f"https://images.example.com/{digest[:2]}/{digest}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": cfg.image_size,
        "height": cfg.image_size,
        "original_width": ow,
        "original_height": oh,
        "caption": alt,
        "testbed": {
            "concept": concept.name,
            "category": concept.category,
            **scene,
            "alt_kind": kind,
            "pattern": concept.pattern,
        },
    }


def write_train_shard(
    shard: int, cfg: TestbedConfig, probs: np.ndarray, textures: dict[str, np.ndarray], tar_path: Path, bar: tqdm
) -> dict[str, Any]:
    """Write one train shard and its sidecars; returns per-shard counts for the manifest.

    Each shard has its own RNG stream (seed, 1, shard), so shards are independent of build order.
    """
    rng = np.random.default_rng([cfg.seed, 1, shard])
    r = random.Random(int(rng.integers(2**62)))
    start = shard * cfg.shard_size
    n = min(cfg.shard_size, cfg.num_train - start)
    concepts = rng.choice(len(CONCEPTS), size=n, p=probs)
    colors, counts, positions, backgrounds = _sample_attrs(rng, n)
    color_names = tuple(COLORS)
    altogether: dict[str, str] = {}
    scratch: dict[str, str] = {}
    stats = empty_stats()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            key = f"{shard:05d}{i:04d}"
            concept = CONCEPTS[int(concepts[i])]
            color = color_names[int(colors[i])]
            count = int(counts[i])
            position = POSITIONS[int(positions[i])] if count == 1 else None
            background = BACKGROUNDS[int(backgrounds[i])]
            jpg = render(rng, textures, cfg.image_size, concept, color, count, position, background)
            caps = train_captions(r, concept, color, count, position, background)
            scratch[key] = caps.scratch
            gap = r.random()
            if gap < 0.01:
                stats["missing"] += 1
            elif gap < 0.015:
                altogether[key] = ""
                stats["empty"] += 1
            else:
                altogether[key] = caps.altogether
            stats["alt_kind"][caps.kind] += 1
            stats["concepts"][concept.index] += 1
            scene = {"color": color, "count": count, "position": position, "background": background}
            meta = _train_meta(r, cfg, key, caps.alt, caps.kind, concept, scene)
            _tar_add(tar, f"{key}.jpg", jpg)
            _tar_add(tar, f"{key}.txt", caps.alt.encode("utf-8"))
            _tar_add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
            bar.update(1)
    atomic_write_bytes(tar_path, buf.getvalue())
    write_sidecar(sidecar_path(tar_path, "altogether"), tar_path, "altogether", altogether)
    write_sidecar(sidecar_path(tar_path, "scratch"), tar_path, "scratch", scratch)
    return stats


def _eval_items(task: str, cfg: TestbedConfig, rng: np.random.Generator) -> list[tuple[Concept, str, int, int]]:
    """Balanced (concept, color, count, label) list for an eval task, in a deterministic shuffled order."""
    color_names = tuple(COLORS)
    items: list[tuple[Concept, str, int, int]] = []
    if task == "concept":
        for c in CONCEPTS:
            items += [(c, color_names[rng.integers(8)], 1, c.index) for _ in range(cfg.eval_per_class)]
    elif task in FINE_TASKS:  # the species of one category, labelled 0..7 in pattern order
        for k, c in enumerate(fine_classes(task)):
            items += [(c, color_names[rng.integers(8)], 1, k) for _ in range(cfg.eval_per_class_small)]
    elif task == "category":
        for ci in range(len(CATEGORIES)):
            for _ in range(cfg.eval_per_class_small):
                items.append((CONCEPTS[ci * 8 + int(rng.integers(8))], color_names[rng.integers(8)], 1, ci))
    elif task == "color":
        for k, col in enumerate(color_names):
            items += [(CONCEPTS[int(rng.integers(64))], col, 1, k) for _ in range(cfg.eval_per_class_small)]
    elif task == "count":
        for k in range(4):
            for _ in range(2 * cfg.eval_per_class_small):
                items.append((CONCEPTS[int(rng.integers(64))], color_names[rng.integers(8)], k + 1, k))
    else:  # retrieval: balanced concepts, random attributes
        for i in range(cfg.num_retrieval):
            items.append((CONCEPTS[i % 64], color_names[rng.integers(8)], int(rng.integers(1, 5)), -1))
    order = rng.permutation(len(items))
    return [items[j] for j in order]


def write_eval_task(
    task: str, cfg: TestbedConfig, textures: dict[str, np.ndarray], folder: Path, bar: tqdm
) -> dict[str, Any]:
    """Write one clip_benchmark local-wds folder; eval images use their own RNG stream (seed, 2, task)."""
    rng = np.random.default_rng([cfg.seed, 2, EVAL_TASKS.index(task)])
    r = random.Random(int(rng.integers(2**62)))
    items = _eval_items(task, cfg, rng)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (concept, color, count, label) in enumerate(items):
            key = f"{i:06d}"
            position = POSITIONS[int(rng.integers(5))] if count == 1 else None
            background = BACKGROUNDS[int(rng.integers(5))]
            _tar_add(
                tar, f"{key}.jpg", render(rng, textures, cfg.image_size, concept, color, count, position, background)
            )
            if task == "retrieval":
                caps = [dense_caption(r, concept, color, count, position, background, use_name=True)]
                if r.random() < 0.5:
                    caps.append(dense_caption(r, concept, color, count, position, background, use_name=True))
                _tar_add(tar, f"{key}.txt", "\n".join(caps).encode("utf-8"))
            else:
                _tar_add(tar, f"{key}.cls", str(label).encode("ascii"))
            bar.update(1)
    atomic_write_bytes(folder / "test" / "0.tar", buf.getvalue())
    atomic_write_text(folder / "test" / "nshards.txt", "1\n")
    info: dict[str, Any] = {"num_samples": len(items)}
    if task == "retrieval":
        atomic_write_text(folder / "dataset_type.txt", "retrieval\n")
        info["type"] = "retrieval"
    else:
        classnames = {
            "concept": [c.name for c in CONCEPTS],
            **{fine: [c.name for c in fine_classes(fine)] for fine in FINE_TASKS},
            "category": list(CATEGORIES),
            "color": list(COLORS),
            "count": list(COUNT_WORDS),
        }[task]
        atomic_write_text(folder / "classnames.txt", "\n".join(classnames) + "\n")
        atomic_write_text(folder / "zeroshot_classification_templates.txt", "\n".join(EVAL_TEMPLATES[task]) + "\n")
        info.update(type="classification", num_classes=len(classnames))
    return info


_OWN_ENTRIES = {"train", "eval", MANIFEST_NAME}
_OWN_TRAIN_FILE = re.compile(r"^(\d{5}\.tar|\d{5}\.(altogether|scratch)\.json|\..*\.tmp)$")


def prepare_root(root: Path) -> None:
    """Make ``root`` ready for a fresh build, deleting only files the build writes.

    The manifest goes first, so an interrupted rebuild never looks complete. A folder holding
    anything else is refused rather than cleaned, in case ``--out`` points somewhere precious.
    """
    root.mkdir(parents=True, exist_ok=True)
    foreign = sorted(
        p.name for p in root.iterdir() if p.name not in _OWN_ENTRIES and not re.match(r"^\..*\.tmp$", p.name)
    )
    if foreign:
        raise FileExistsError(
            f"{root}: refusing to build a testbed into a folder with other content ({', '.join(foreign[:5])})"
        )
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for p in root.glob(".*.tmp"):
        p.unlink()
    train = root / "train"
    if train.is_dir():
        for p in train.iterdir():
            if p.is_file() and _OWN_TRAIN_FILE.match(p.name):
                p.unlink()
    if (root / "eval").is_dir():
        for task in EVAL_TASKS:
            shutil.rmtree(root / "eval" / task, ignore_errors=True)
