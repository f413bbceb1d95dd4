"""Class names and prompt templates for a task, and where each came from.

Order of preference: the data folder's own ``classnames.txt`` / ``zeroshot_classification_templates.txt``
(what clip_benchmark's CLI reads, so both tools score the same prompts), then clip_benchmark's packaged
CLIP lists (``en_classnames.json`` / ``en_zeroshot_classification_templates.json``), then this package's
``eval/data`` files for the tasks clip_benchmark lacks (CUB, UCF101, Kinetics700, HatefulMemes).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import clip_benchmark.datasets as cb_datasets

from eval.wds_folder import CLASSNAMES_FILE, TEMPLATES_FILE

DATA_DIR = Path(__file__).with_name("data")
CB_DIR = Path(cb_datasets.__file__).parent


@cache
def _json(path: Path) -> dict[str, list[str]]:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def packaged_classnames(key: str | None) -> tuple[list[str], str] | None:
    """(names, source file) from clip_benchmark's or eval/data's classname JSON, if either has ``key``."""
    for path in (CB_DIR / "en_classnames.json", DATA_DIR / "classnames.json"):
        if key and key in _json(path):
            return list(_json(path)[key]), str(path)
    return None


def packaged_templates(key: str | None) -> tuple[list[str], str] | None:
    """(templates with {c}, source file) from clip_benchmark's or eval/data's template JSON."""
    for path in (CB_DIR / "en_zeroshot_classification_templates.json", DATA_DIR / "templates.json"):
        if key and key in _json(path):
            return list(_json(path)[key]), str(path)
    return None


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def folder_prompts(
    folder: Path, prompt_key: str | None, dataset_classes: list[str] | None = None
) -> tuple[list[str], list[str], dict[str, str]]:
    """(classnames, templates, sources) for a data folder; raises naming every file that was tried."""
    sources: dict[str, str] = {}
    if (folder / CLASSNAMES_FILE).is_file():
        classnames, sources["classnames"] = _lines(folder / CLASSNAMES_FILE), str(folder / CLASSNAMES_FILE)
    elif dataset_classes:
        classnames, sources["classnames"] = list(dataset_classes), "dataset builder"
    elif found := packaged_classnames(prompt_key):
        classnames, sources["classnames"] = found
    else:
        raise ValueError(
            f"no class names for {folder}: {folder / CLASSNAMES_FILE} is missing and no packaged list "
            f"has key {prompt_key!r}"
        )
    if (folder / TEMPLATES_FILE).is_file():
        templates, sources["templates"] = _lines(folder / TEMPLATES_FILE), str(folder / TEMPLATES_FILE)
    elif found := packaged_templates(prompt_key):
        templates, sources["templates"] = found
    else:
        raise ValueError(
            f"no prompt templates for {folder}: {folder / TEMPLATES_FILE} is missing and no packaged "
            f"list has key {prompt_key!r}"
        )
    if not templates or not all("{c}" in t for t in templates):
        raise ValueError(f"{sources['templates']}: every template must contain {{c}}, got {templates[:3]}")
    if not classnames:
        raise ValueError(f"{sources['classnames']}: holds no class names")
    return classnames, templates, sources
