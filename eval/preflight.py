"""Check evaluation tasks without a model, so a broken eval set stops a run before its first step.

For every task: its data is found (``eval.locate``), the split's shards listed by ``nshards.txt`` exist,
class names and templates are readable, and the label ids in the first shard fit the class count (only
the small ``.cls`` members of that one shard are read, so this costs milliseconds). A retrieval task
needs ``dataset_type.txt`` = retrieval and captions in its first shard; WinoGAViL needs "association" and
readable instances in its first shard. Folders read by clip_benchmark's torchvision builders are only
checked for presence and templates: their class names come from the builder. A builder folder that would
score a whole dataset instead of its test split (SUN397, Caltech-101, EuroSAT) is a problem naming the wds
folder to get. ``python -m eval zeroshot`` and the training applications call :func:`check_tasks` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from eval.association import is_association_dataset, read_instances
from eval.locate import DataSource, locate
from eval.prompts import METACLIP, check_prompt_source, metaclip_lists, packaged_templates, task_prompts
from eval.tasks import Task, looked_for
from eval.wds_folder import (
    TEMPLATES_FILE,
    check_labels,
    count_retrieval_pairs,
    is_retrieval_dataset,
    shard_labels,
    shard_paths,
)


def check_tasks(
    tasks: Sequence[Task],
    dataset_root: str | Path | None,
    *,
    keep_going: bool = False,
    download: bool = False,
    prompts: str = METACLIP,
) -> list[str]:
    """Every problem found, one line each naming the task and the path at fault.

    With ``keep_going`` the list is returned (the caller evaluates what it can and reports the rest);
    otherwise any problem raises ``ValueError`` listing all of them. ``download`` accepts a missing
    builder folder, as ``--download`` would fetch it. ``prompts`` is the prompt source the run will use.
    """
    check_prompt_source(prompts, "prompts")
    problems = [
        f"{task.name}: {msg.removeprefix(f'{task.name}: ')}"
        for task in tasks
        for msg in _task_problems(task, dataset_root, download, prompts)
    ]
    if problems and not keep_going:
        raise ValueError(
            f"{len(problems)} problem(s) with the eval tasks, found before evaluating:\n  "
            + "\n  ".join(problems)
            + "\n(fix the data, drop the task, or opt into partial evaluation to evaluate the rest)"
        )
    return problems


def _task_problems(task: Task, dataset_root: str | Path | None, download: bool, prompts: str) -> list[str]:
    try:
        src = locate(task, dataset_root, download=download)
    except ValueError as e:
        return [str(e)]
    if src is None:
        return [f"no data found; looked for {', '.join(str(p) for p in looked_for(task, dataset_root))}"]
    if src.kind == "builder":
        has_templates = (
            (src.path / TEMPLATES_FILE).is_file()
            or packaged_templates(task.prompt_key)
            or (prompts == METACLIP and metaclip_lists(task.metaclip_key))
        )
        return [] if has_templates else [f"no prompt templates for {src.path} (key {task.prompt_key!r})"]
    try:
        _check_wds(task, src, prompts)
    except ValueError as e:
        return [str(e)]
    return []


def _check_association(src: DataSource, shards: list[Path]) -> None:
    if not is_association_dataset(src.path):
        raise ValueError(f"{src.path / 'dataset_type.txt'} must say 'association' (`python -m eval prepare winogavil`)")
    if next(read_instances(shards[:1]), None) is None:
        raise ValueError(f"{shards[0]} holds no WinoGAViL instance")


def _check_wds(task: Task, src: DataSource, prompts: str) -> None:
    """Raise ``ValueError`` naming the file at fault in the task's wds folder."""
    shards = shard_paths(src.path, src.split)
    if task.kind == "association":
        _check_association(src, shards)
        return
    retrieval = is_retrieval_dataset(src.path)
    if task.kind == "retrieval":
        if not retrieval:
            raise ValueError(f"{src.path / 'dataset_type.txt'} must say 'retrieval' for a retrieval task")
        if count_retrieval_pairs(shards[:1])[0] == 0:
            raise ValueError(f"{shards[0]} holds no .txt captions")
        return
    if retrieval:
        raise ValueError(
            f"{src.path} is a retrieval folder (dataset_type.txt) but {task.name} is a classification task"
        )
    chosen = task_prompts(task, src.path, prompts)
    labels = shard_labels(shards[0])
    if not labels:
        raise ValueError(f"{shards[0]} holds no .cls label members")
    try:
        check_labels(labels, len(chosen.classes), chosen.files["classnames"])
    except ValueError as e:
        raise ValueError(f"{e} (first shard {shards[0]})") from e
