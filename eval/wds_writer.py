"""Write clip_benchmark's local webdataset layout: ``OUT/{split}/{i}.tar`` + ``nshards.txt`` + prompt files.

Each shard and text file is written atomically, and ``nshards.txt`` last, so a reader never sees a
half-converted folder as complete.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from caption_mixing.atomic import atomic_write, atomic_write_text
from eval.wds_folder import CLASSNAMES_FILE, TEMPLATES_FILE


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(
    out: str | Path,
    samples: Iterable[tuple[str, dict[str, bytes]]],
    files: dict[str, str],
    *,
    split: str = "test",
    shard_size: int = 1000,
) -> int:
    """samples: (key, {extension: payload}) -> shards of ``shard_size``; ``files`` (name -> text) beside them.

    Returns the number of samples written; ``nshards.txt`` comes last.
    """
    out = Path(out)
    split_dir = out / split
    n = shard = 0
    batch: list[tuple[str, dict[str, bytes]]] = []

    def flush() -> None:
        nonlocal shard, batch

        def write(f: io.BufferedWriter) -> None:
            with tarfile.open(fileobj=f, mode="w") as tar:
                for key, members in batch:
                    for ext, data in members.items():
                        _add(tar, f"{key}.{ext}", data)

        atomic_write(split_dir / f"{shard}.tar", write)
        shard, batch = shard + 1, []

    for key, members in samples:
        batch.append((key, members))
        n += 1
        if len(batch) >= shard_size:
            flush()
    if batch:
        flush()
    if n == 0:
        raise ValueError(f"no samples to write to {split_dir}")
    for name, text in files.items():
        atomic_write_text(out / name, text)
    atomic_write_text(split_dir / "nshards.txt", f"{shard}\n")
    return n


def write_classification_wds(
    out: str | Path,
    samples: Iterable[tuple[str, bytes, str, int]],
    classnames: list[str],
    templates: list[str],
    *,
    split: str = "test",
    shard_size: int = 1000,
) -> int:
    """samples: (key, image bytes, image extension, label). Returns the number of samples written."""
    if any("\n" in c for c in classnames):
        raise ValueError("class names must not contain newlines")

    def members() -> Iterable[tuple[str, dict[str, bytes]]]:
        for key, img, ext, label in samples:
            if not 0 <= label < len(classnames):
                raise ValueError(
                    f"sample {key}: label {label} outside 0..{len(classnames) - 1} ({len(classnames)} classes)"
                )
            yield key, {ext: img, "cls": str(label).encode()}

    files = {CLASSNAMES_FILE: "\n".join(classnames) + "\n", TEMPLATES_FILE: "\n".join(templates) + "\n"}
    return write_wds(out, members(), files, split=split, shard_size=shard_size)
