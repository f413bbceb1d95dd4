"""Find a task's data under ``--dataset-root`` without touching the network.

clip_benchmark's local webdataset layout (``ROOT/wds_<name>/<split>/nshards.txt``) is tried first for every
task; for the torchvision-backed tasks clip_benchmark's own builder folder (``ROOT/<name>``) comes next.
Nothing is downloaded unless the caller passes ``download=True`` (``--download``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eval.tasks import Task, looked_for


@dataclass(frozen=True)
class DataSource:
    """Where a task's data was found and how to read it."""

    kind: str  # "wds" or "builder"
    path: Path
    split: str
    split_note: str = ""  # set when the split read is not the paper's


def locate(task: Task, dataset_root: str | Path, *, download: bool = False) -> DataSource | None:
    """The first usable location for ``task``, or None when nothing is there (see ``looked_for``)."""
    if task.local_path:
        folder = Path(task.local_path)
        return DataSource("wds", folder, task.paper_split) if folder.is_dir() else None
    root = Path(dataset_root)
    for name in task.wds_dirs:
        folder = root / name
        if not folder.is_dir():
            continue
        for split in task.splits:
            if (folder / split).is_dir():
                note = "" if split == task.paper_split else f"paper uses split {task.paper_split!r}; read {split!r}"
                return DataSource("wds", folder, split, note)
        # present but without a split folder: let the reader raise a precise error about it
        return DataSource("wds", folder, task.paper_split)
    if task.builder and task.cb_name:
        folder = root / task.cb_name
        if folder.is_dir() or download:
            wanted = task.paper_split
            note = f"paper uses split {wanted!r}; builder read its test data" if wanted != "test" else ""
            return DataSource("builder", folder, "test", note)
    return None


def missing_report(task: Task, dataset_root: str | Path) -> dict[str, object]:
    """The result recorded for a task without data: status and every path that was checked."""
    paths = [str(p) for p in looked_for(task, dataset_root)]
    return {"status": "missing", "path": paths[0], "looked_for": paths, "main_metric": task.metric}
