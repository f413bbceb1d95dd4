"""clip_benchmark's local-WebDataset folder layout, checked up front so every error names the path at fault.

A dataset folder looks like::

    ROOT/classnames.txt                             (classification, one class name per label id)
    ROOT/zeroshot_classification_templates.txt      (classification, templates with {c})
    ROOT/dataset_type.txt                           (optional, "retrieval")
    ROOT/test/nshards.txt, ROOT/test/0.tar, ...     ({key}.jpg + {key}.cls or {key}.txt)

clip_benchmark itself fails late with bare asserts or ``FileNotFoundError``; the runner and the preflight
(``eval.preflight``) call these checks instead. Nothing here needs a model.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SPLIT = "test"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"


def is_retrieval_dataset(root: str | Path) -> bool:
    """True when ``ROOT/dataset_type.txt`` says "retrieval" (clip_benchmark's own rule)."""
    type_file = Path(root) / TYPE_FILE
    return type_file.is_file() and type_file.read_text().strip().lower() == "retrieval"


def shard_paths(root: str | Path, split: str = SPLIT) -> list[Path]:
    """The shards of ``split`` clip_benchmark will open; raises naming the folder or file that is wrong."""
    split_dir = Path(root) / split
    nshards_file = split_dir / "nshards.txt"
    if split_dir.is_dir() and not any(split_dir.iterdir()):
        raise ValueError(f"shard folder {split_dir} is empty: no nshards.txt and no .tar shards")
    if not nshards_file.is_file():
        raise ValueError(f"{nshards_file} is missing; a clip_benchmark wds folder needs {split}/nshards.txt")
    try:
        nshards = int(nshards_file.read_text().strip())
    except ValueError as e:
        raise ValueError(f"{nshards_file} does not hold an integer shard count") from e
    if nshards < 1:
        raise ValueError(f"{nshards_file} says {nshards} shards; the {split} split {split_dir} is empty")
    shards = [split_dir / f"{i}.tar" for i in range(nshards)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise ValueError(f"test shard folder {split_dir} lacks shard(s) {', '.join(missing)} listed by nshards.txt")
    return shards


def _members(shard: Path, suffix: str) -> list[bytes]:
    """The payloads of the ``*{suffix}`` members of one shard (small text members only)."""
    out = []
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(suffix) and (data := tar.extractfile(member)) is not None:
                    out.append(data.read())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{shard}: not a readable tar shard ({type(e).__name__}: {e})") from e
    return out


def shard_labels(shard: Path) -> list[int]:
    """The integer label ids of the ``.cls`` members of one shard (reads no image)."""
    labels = []
    for raw in _members(shard, ".cls"):
        try:
            labels.append(int(raw.decode("utf-8").strip()))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{shard}: a .cls member holds {raw[:20]!r}, not an integer label id") from e
    return labels


def count_retrieval_pairs(shards: Iterable[Path]) -> tuple[int, int]:
    """(images, captions) in retrieval shards, from the small .txt members only."""
    n_images = n_texts = 0
    for shard in shards:
        for raw in _members(shard, ".txt"):
            n_images += 1
            n_texts += len(raw.decode("utf-8").splitlines())
    return n_images, n_texts


def check_labels(labels: torch.Tensor | Sequence[int], num_classes: int, classnames_source: str | Path) -> None:
    """Labels outside the class-name range mean the wrong classnames file; say which one."""
    if len(labels) == 0:
        return
    lo, hi = (int(labels.min()), int(labels.max())) if hasattr(labels, "min") else (min(labels), max(labels))
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{classnames_source} has {num_classes} lines but the test labels span {lo}..{hi}; "
            f"classnames.txt must have one line per label id"
        )
