"""Find a task's data under ``--dataset-root`` without touching the network.

clip_benchmark's local webdataset layout (``ROOT/wds_<name>/<split>/nshards.txt``) is tried first for every
task; for the torchvision-backed tasks clip_benchmark's own builder folder (``ROOT/<name>``) comes next.
Nothing is downloaded unless the caller passes ``download=True`` (``--download``).

SUN397, Caltech-101 and EuroSAT have no builder here: clip_benchmark's torchvision builders for them ignore
the split and read the whole dataset, so when only such a folder is present the task is refused with an
error naming the published wds test split to get, never scored on the whole set.
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


def locate(task: Task, dataset_root: str | Path | None, *, download: bool = False) -> DataSource | None:
    """The first usable location for ``task``, or None when nothing is there (see ``looked_for``)."""
    folders = looked_for(task, dataset_root)  # the wds folders, then the builder folder if the task has one
    wds_folders = folders if task.local_path else folders[: len(task.wds_dirs)]
    for folder in wds_folders:
        if folder.is_dir():
            return _wds_source(task, folder)
    _refuse_whole_set_folder(task, dataset_root)
    if len(folders) > len(wds_folders):
        folder = folders[-1]
        if folder.is_dir() or download:
            wanted = task.paper_split
            note = f"paper uses split {wanted!r}; builder read its test data" if wanted != "test" else ""
            return DataSource("builder", folder, "test", note)
    return None


def _refuse_whole_set_folder(task: Task, dataset_root: str | Path | None) -> None:
    """Raise when the only data is a builder folder whose builder ignores the split (the whole dataset)."""
    if task.local_path or not task.refuse_folder or dataset_root is None:
        return
    raw = Path(dataset_root) / task.refuse_folder
    if raw.is_dir():
        want = task.wds_dirs[0]
        raise ValueError(
            f"{task.name}: only {raw} is present, a folder for clip_benchmark's torchvision builder, which ignores "
            f"the split and would score the whole dataset; get clip_benchmark's published test split {want} "
            f"(https://huggingface.co/datasets/clip-benchmark/{want}) into {Path(dataset_root) / want}"
            + (f" ({task.count_note})" if task.count_note else "")
        )


def _wds_source(task: Task, folder: Path) -> DataSource:
    """The first of the task's splits present in ``folder``; noted when it is not the paper's split."""
    for split in task.splits:
        if (folder / split).is_dir():
            note = "" if split == task.paper_split else f"paper uses split {task.paper_split!r}; read {split!r}"
            return DataSource("wds", folder, split, note)
    # present but without a split folder: let the reader raise a precise error about it
    return DataSource("wds", folder, task.paper_split)


def missing_report(task: Task, dataset_root: str | Path | None) -> dict[str, object]:
    """The result recorded for a task without data: status and every path that was checked."""
    paths = [str(p) for p in looked_for(task, dataset_root)]
    reason = f"no data found; looked for {', '.join(paths)}"
    return {"status": "missing", "path": paths[0], "looked_for": paths, "main_metric": task.metric, "reason": reason}
