"""Class names and prompt templates for a task, and where each came from.

Two prompt sources (``--prompts``, recorded as ``prompt_source`` in every classification result):

* ``metaclip`` (default): MetaCLIP's clipeval lists, the paper's own evaluation code, vendored unchanged
  as ``eval/data/metaclip_labels.json`` and ``eval/data/metaclip_templates.json`` (each names its
  repository, path and commit under ``source``). A class may have several names (FER-2013: "happy" and
  "smiling"); its embedding is then the mean of the L2-normalised embeddings of every name x template,
  renormalised, exactly as clipeval's ``build_text_features`` averages them (:class:`Prompts`).
* ``clip_benchmark``: what clip_benchmark's CLI scores, so numbers published through it can be compared:
  the data folder's ``classnames.txt`` / ``zeroshot_classification_templates.txt``, then clip_benchmark's
  packaged CLIP lists (``en_classnames.json`` / ``en_zeroshot_classification_templates.json``), then this
  package's ``eval/data/{classnames,templates}.json`` for the tasks clip_benchmark lacks.

The label ids always come from the data. MetaCLIP's names apply when their class count matches the data's
(its ``classnames.txt``, a builder's classes, or clip_benchmark's list for a folder without one) and, where
the names can be compared after normalising (case, punctuation, "three" = "3"), they are put in the data's
label order (:func:`align_classes`: CLEVR's "10", "3", ... become label order "3" ... "10"). Otherwise the
data's own class names are used with MetaCLIP's templates and the result says so (``prompt_note``).
Ad-hoc ``NAME=PATH`` folders always use their own files (``prompt_source`` "folder").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import clip_benchmark.datasets as cb_datasets

from eval.tasks import Task
from eval.wds_folder import CLASSNAMES_FILE, TEMPLATES_FILE

DATA_DIR = Path(__file__).with_name("data")
CB_DIR = Path(cb_datasets.__file__).parent
METACLIP_LABELS = DATA_DIR / "metaclip_labels.json"
METACLIP_TEMPLATES = DATA_DIR / "metaclip_templates.json"

METACLIP = "metaclip"
CLIP_BENCHMARK = "clip_benchmark"
FOLDER = "folder"
PROMPT_SOURCES = (METACLIP, CLIP_BENCHMARK)  # what --prompts accepts; FOLDER is implied by NAME=PATH

_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


@dataclass(frozen=True)
class Prompts:
    """Names per label id (several per class are averaged), templates with ``{c}``, and their provenance."""

    classes: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...]
    source: str  # METACLIP, CLIP_BENCHMARK or FOLDER
    files: dict[str, str] = field(default_factory=dict, compare=False)  # classnames/templates -> where from
    note: str = ""

    @property
    def classnames(self) -> list[str]:
        """The first name of every class (what a single-name list would hold)."""
        return [names[0] for names in self.classes]

    def class_texts(self, index: int) -> list[str]:
        """Every template filled with every name of class ``index`` (clipeval: for t in templates for name)."""
        return [t.replace("{c}", name) for t in self.templates for name in self.classes[index]]

    def record(self) -> dict[str, Any]:
        """The fields a task result carries about its prompts."""
        out: dict[str, Any] = {"prompt_source": self.source, "prompt_sources": dict(self.files)}
        if any(len(names) > 1 for names in self.classes):
            out["num_names"] = sum(len(names) for names in self.classes)
        if self.note:
            out["prompt_note"] = self.note
        return out


def _single(names: list[str]) -> tuple[tuple[str, ...], ...]:
    return tuple((n,) for n in names)


@cache
def _json(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


@cache
def _metaclip(path: Path, key: str) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if "source" not in doc or key not in doc:
        raise ValueError(f"{path}: expected a 'source' and a {key!r} field (vendored from MetaCLIP's clipeval)")
    return doc[key]


def metaclip_lists(key: str | None) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]] | None:
    """(classes, templates with ``{c}``) of MetaCLIP's clipeval dataset ``key``, or None when it has none."""
    labels, templates = _metaclip(METACLIP_LABELS, "labels"), _metaclip(METACLIP_TEMPLATES, "templates")
    if not key or key not in labels or key not in templates:
        return None
    classes = tuple(tuple(c) if isinstance(c, list) else (c,) for c in labels[key])
    return classes, tuple(t.replace("{}", "{c}") for t in templates[key])


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


def data_classnames(
    folder: Path, prompt_key: str | None, dataset_classes: list[str] | None = None
) -> tuple[list[str], str] | None:
    """The names that define the data's label ids: ``classnames.txt``, a builder's classes, a packaged list."""
    if (folder / CLASSNAMES_FILE).is_file():
        return _lines(folder / CLASSNAMES_FILE), str(folder / CLASSNAMES_FILE)
    if dataset_classes:
        return list(dataset_classes), "dataset builder"
    return packaged_classnames(prompt_key)


def folder_prompts(
    folder: Path, prompt_key: str | None, dataset_classes: list[str] | None = None
) -> tuple[list[str], list[str], dict[str, str]]:
    """clip_benchmark's rule: (classnames, templates, sources) for a data folder; raises naming what was tried."""
    sources: dict[str, str] = {}
    if found := data_classnames(folder, prompt_key, dataset_classes):
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


def normalize_name(name: str) -> str:
    """Lower case, number words as digits, letters and digits only: "Hand Stand Pushups" = "Handstand Pushups"."""
    words = re.split(r"(\W+)", name.lower())
    words = [str(_NUMBER_WORDS.index(w)) if w in _NUMBER_WORDS else w for w in words]
    return re.sub(r"[^a-z0-9]", "", "".join(words))


def align_classes(
    names: list[str], vendored: tuple[tuple[str, ...], ...], names_source: str
) -> tuple[tuple[tuple[str, ...], ...] | None, str]:
    """MetaCLIP's classes in the data's label order, or None (use the data's names); plus a note saying why.

    Counts must match. Names found in MetaCLIP's list must sit at their own position (then MetaCLIP's order
    is the data's), or every name must have a counterpart (then MetaCLIP's classes are permuted into the
    data's order). Names that cannot be compared at all (none found) leave MetaCLIP's order, by the count.
    """
    n = len(names)
    if len(vendored) != n:
        return None, (
            f"MetaCLIP's list has {len(vendored)} classes, {names_source} has {n}: its class names are used "
            f"with MetaCLIP's templates"
        )
    keys = [normalize_name(x) for x in names]
    vkeys = [{normalize_name(v) for v in c} for c in vendored]
    known = set().union(*vkeys)
    found = [k in known for k in keys]
    if all(k in vk for k, vk, f in zip(keys, vkeys, found, strict=True) if f):
        differ = [i for i in range(n) if not found[i]]
        if len(differ) == n:
            return vendored, f"{names_source}'s names cannot be compared with MetaCLIP's; its order is assumed"
        if differ:
            i = differ[0]
            return vendored, (
                f"{len(differ)} of {n} names in {names_source} differ from MetaCLIP's (e.g. {names[i]!r} vs "
                f"{vendored[i][0]!r}); the others are in MetaCLIP's order, so it is kept"
            )
        return vendored, ""
    slots: dict[str, list[int]] = {}
    for j, vk in enumerate(vkeys):
        for k in vk:
            slots.setdefault(k, []).append(j)
    used: set[int] = set()
    order: list[int] = []
    for k in keys:
        j = next((j for j in slots.get(k, []) if j not in used), None)
        if j is None:
            break
        used.add(j)
        order.append(j)
    if len(order) == n:
        return tuple(vendored[j] for j in order), f"MetaCLIP's classes put in the label order of {names_source}"
    missing = [names[i] for i in range(n) if not found[i]]
    return None, (
        f"{names_source} orders its classes differently from MetaCLIP's and {len(missing)} of its names have no "
        f"counterpart (e.g. {missing[:3]}): its class names are used with MetaCLIP's templates"
    )


def check_prompt_source(prompts: str, flag: str = "--prompts") -> str:
    if prompts not in PROMPT_SOURCES:
        raise ValueError(f"{flag}: {prompts!r} is not a prompt source; choose {' or '.join(PROMPT_SOURCES)}")
    return prompts


def task_prompts(
    task: Task, folder: Path, prompts: str = METACLIP, dataset_classes: list[str] | None = None
) -> Prompts:
    """The prompts a classification ``task`` read from ``folder`` is scored with (see the module doc)."""
    check_prompt_source(prompts)
    lists = metaclip_lists(task.metaclip_key) if prompts == METACLIP and not task.local_path else None
    if lists is None:
        names, templates, files = folder_prompts(folder, task.prompt_key, dataset_classes)
        source = FOLDER if task.local_path or task.folder else CLIP_BENCHMARK
        note = ""
        if prompts == METACLIP and source == CLIP_BENCHMARK:
            note = f"MetaCLIP's clipeval has no class names and templates for {task.name}: clip_benchmark's used"
        return Prompts(_single(names), tuple(templates), source, files, note)
    vendored, templates = lists
    key = task.metaclip_key
    files = {"classnames": f"{METACLIP_LABELS}#{key}", "templates": f"{METACLIP_TEMPLATES}#{key}"}
    labels = data_classnames(folder, task.prompt_key, dataset_classes)
    if labels is None:
        note = "the data names no classes: MetaCLIP's label order is assumed"
        return Prompts(vendored, templates, METACLIP, files, note)
    names, names_source = labels
    classes, note = align_classes(names, vendored, names_source)
    if classes is None:
        return Prompts(_single(names), templates, METACLIP, {**files, "classnames": names_source}, note)
    return Prompts(classes, templates, METACLIP, files, note)


def describe_prompts(task: Task, prompts: str = METACLIP) -> str:
    """One cell for `python -m eval tasks`: where ``task``'s prompts come from under ``prompts``."""
    if task.kind == "retrieval":
        return "captions"
    if task.kind == "association":
        return "'A/An <cue>' (DataComp)"
    if task.folder or task.local_path:
        return "folder files"
    lists = metaclip_lists(task.metaclip_key) if prompts == METACLIP else None
    if lists is None:
        suffix = " (MetaCLIP has none)" if prompts == METACLIP else ""
        return f"clip_benchmark:{task.prompt_key or task.name}{suffix}"
    classes, templates = lists
    n_names = sum(len(c) for c in classes)
    names = f", {n_names} names" if n_names > len(classes) else ""
    plural = "s" if len(templates) > 1 else ""
    return f"metaclip:{task.metaclip_key} ({len(classes)} classes{names} x {len(templates)} template{plural})"
