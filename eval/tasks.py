"""The task registry and the one parser of task lists (``--tasks``, ``--extra-task``, the sweep's ``eval_tasks``).

The registry holds the paper's 26 zero-shot tasks (Table 6 order), retrieval, the DataComp group members
and the embedded testbed's eval sets. Each task says which metric MetaCLIP's clipeval reports for it,
which clip_benchmark dataset it is, and where its data is looked for under the dataset root, so
`python -m eval tasks` can show a researcher exactly what will be read before anything runs.

A task spec (:func:`parse_task_spec`) is a comma list of

* groups: ``paper26``, ``retrieval`` (Flickr30k, COCO), ``datacomp``, ``testbed`` (concept, category,
  color, count, retrieval: the embedded testbed's ``eval/<name>/`` folders, so its dataset root is the
  testbed's ``eval`` folder);
* registry names, e.g. ``cifar10``;
* ad-hoc ``NAME=PATH`` items: a wds folder read from exactly PATH. A registry NAME keeps its registry
  metric (``fgvc_aircraft=/data/eval/wds_fgvc_aircraft`` is scored by mean per-class recall); any other
  NAME is scored by top-1 (or mean R@1 when PATH's ``dataset_type.txt`` says retrieval). NAME becomes a
  file name (``tasks/<NAME>.json``), so it must be a safe path component.

A group name wins over a task name: ``retrieval`` alone is the Flickr30k/COCO group; the testbed's
retrieval set comes with ``testbed`` or as ``retrieval=PATH``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from caption_mixing.paths import validate_name

# Metric keys as they appear in per-task results.
ACC1 = "acc1"
MEAN_PER_CLASS = "mean_per_class_recall"
TOP1_TOP5_MEAN = "top1_top5_mean"
ROC_AUC = "roc_auc"
MEAN_RECALL1 = "mean_recall@1"

METRIC_DESCRIPTIONS = {
    ACC1: "top-1 accuracy",
    MEAN_PER_CLASS: "mean per-class accuracy",
    TOP1_TOP5_MEAN: "(top-1 + top-5) / 2",
    ROC_AUC: "ROC AUC of logit[hateful] - logit[not hateful]",
    MEAN_RECALL1: "mean of text and image recall@1",
}


@dataclass(frozen=True)
class Task:
    """One evaluation task: what it is called, how it is scored, where its data lives."""

    name: str  # our key, used on the command line and in results
    title: str  # the paper's column header
    metric: str
    kind: str = "classification"  # or "retrieval"
    cb_name: str | None = None  # clip_benchmark dataset name (None: clip_benchmark lacks it)
    splits: tuple[str, ...] = ("test",)  # wds split folders tried in order; the first is the paper's
    builder: bool = False  # clip_benchmark's torchvision builder can read ROOT/<cb_name> offline
    prompt_key: str | None = None  # key into clip_benchmark's / eval/data's classname+template JSON
    note: str = ""
    wds_aliases: tuple[str, ...] = field(default_factory=tuple)
    folder: str | None = None  # the folder under the dataset root, instead of wds_<name> (the testbed's sets)
    local_path: str | None = None  # an ad-hoc task read from exactly this wds folder (``--extra-task``)
    source_split: str = ""  # the original dataset's split when `prepare` stores it as test/ (shown by `tasks`)
    expected_samples: int | None = None  # the paper's split size; a different count is flagged in the result

    @property
    def wds_dirs(self) -> tuple[str, ...]:
        """clip_benchmark's local wds folder names (``wds_<name with / as ->``), preferred first."""
        if self.folder:
            return (self.folder, *self.wds_aliases)
        base = self.cb_name or self.name
        return (f"wds_{base.replace('/', '-')}", *self.wds_aliases)

    @property
    def paper_split(self) -> str:
        return self.splits[0]


def _cls(name: str, title: str, metric: str = ACC1, cb: str | None = None, **kw: object) -> Task:
    cb_name = name if cb is None else cb
    return Task(name=name, title=title, metric=metric, cb_name=cb_name or None, **kw)  # type: ignore[arg-type]


def _ret(name: str, title: str, cb: str, n_images: int) -> Task:
    note = f"{n_images // 1000}k test images (Karpathy split)"
    return Task(name, title, MEAN_RECALL1, kind="retrieval", cb_name=cb, expected_samples=n_images, note=note)


PAPER_TASKS: tuple[Task, ...] = (
    _cls("imagenet1k", "ImageNet", builder=True, prompt_key="imagenet1k"),
    _cls("food101", "Food-101", builder=True, prompt_key="food101"),
    _cls("cifar10", "CIFAR10", builder=True, prompt_key="cifar10"),
    _cls("cifar100", "CIFAR100", builder=True, prompt_key="cifar100"),
    _cls(
        "cub", "CUB", cb="", prompt_key="cub", note="CUB-200-2011 test split; build with `python -m eval prepare cub`"
    ),
    _cls("sun397", "SUN397", builder=True, prompt_key="sun397"),
    _cls("cars", "Cars", builder=True, prompt_key="cars"),
    _cls("fgvc_aircraft", "Aircraft", MEAN_PER_CLASS, builder=True, prompt_key="fgvc_aircraft"),
    _cls("dtd", "DTD", builder=True, prompt_key="dtd"),
    _cls("pets", "Pets", MEAN_PER_CLASS, builder=True, prompt_key="pets"),
    _cls(
        "caltech101",
        "Caltech-101",
        MEAN_PER_CLASS,
        builder=True,
        prompt_key="caltech101",
        wds_aliases=("wds_vtab-caltech101",),
    ),
    _cls("flowers", "Flowers", MEAN_PER_CLASS, builder=True, prompt_key="flowers", wds_aliases=("wds_vtab-flowers",)),
    _cls("mnist", "MNIST", builder=True, prompt_key="mnist"),
    _cls("fer2013", "FER-2013", builder=True, prompt_key="fer2013"),
    _cls("stl10", "STL-10", builder=True, prompt_key="stl10"),
    _cls(
        "eurosat",
        "EuroSAT",
        splits=("val", "test"),
        builder=True,
        prompt_key="eurosat",
        note="MetaCLIP uses the val split; a test-only folder is used and flagged",
    ),
    _cls("resisc45", "RESISC45", cb="vtab/resisc45", prompt_key="resisc45"),
    _cls("gtsrb", "GTSRB", builder=True, prompt_key="gtsrb"),
    _cls(
        "kitti",
        "KITTI",
        cb="vtab/kitti_closest_vehicle_distance",
        prompt_key="kitti_closest_vehicle_distance",
        note="closest-vehicle distance, 4 classes",
    ),
    _cls("country211", "Country211", builder=True, prompt_key="country211"),
    _cls("pcam", "PCAM", builder=True, prompt_key="pcam"),
    _cls(
        "ucf101",
        "UCF101",
        cb="",
        prompt_key="ucf101",
        source_split="testlist01",
        note="middle frame of testlist01 videos; `prepare ucf101`",
    ),
    _cls(
        "kinetics700",
        "Kinetics700",
        TOP1_TOP5_MEAN,
        cb="",
        prompt_key="kinetics700",
        source_split="val",
        note="middle frame of validation videos; `prepare kinetics700`",
    ),
    _cls("clevr", "CLEVR", cb="vtab/clevr_count_all", prompt_key="clevr_count_all", note="counts, 8 classes"),
    _cls(
        "hateful_memes",
        "HatefulMemes",
        ROC_AUC,
        cb="",
        prompt_key="hateful_memes",
        source_split="dev",
        note="dev split; `prepare hateful_memes`",
    ),
    _cls("sst2", "SST2", cb="renderedsst2", builder=True, prompt_key="renderedsst2", note="rendered SST2"),
)

RETRIEVAL_TASKS: tuple[Task, ...] = (
    _ret("flickr30k", "Flickr", "flickr30k", 1000),
    _ret("mscoco", "COCO", "mscoco_captions", 5000),
)

# DataComp members outside the 26 (classification, wds folders only).
DATACOMP_EXTRA_TASKS: tuple[Task, ...] = (
    _cls("imagenet_sketch", "ImageNet-Sketch"),
    _cls("imagenetv2", "ImageNet-V2"),
    _cls("imagenet-a", "ImageNet-A"),
    _cls("imagenet-o", "ImageNet-O"),
    _cls("imagenet-r", "ImageNet-R"),
    _cls("objectnet", "ObjectNet"),
    _cls("svhn", "SVHN", cb="vtab/svhn"),
    _cls("clevr_distance", "CLEVR Distance", cb="vtab/clevr_closest_object_distance"),
)

# The embedded testbed's eval sets (testbed.EVAL_TASKS; eval imports no testbed code), read from
# <testbed>/eval/<name>/: pass that ``eval`` folder as the dataset root.
TESTBED_TASKS: tuple[Task, ...] = (
    *(Task(n, n, ACC1, folder=n, note="embedded testbed") for n in ("concept", "category", "color", "count")),
    Task("retrieval", "retrieval", MEAN_RECALL1, kind="retrieval", folder="retrieval", note="embedded testbed"),
)

REGISTRY: dict[str, Task] = {t.name: t for t in (*PAPER_TASKS, *RETRIEVAL_TASKS, *DATACOMP_EXTRA_TASKS, *TESTBED_TASKS)}
PAPER26: tuple[str, ...] = tuple(t.name for t in PAPER_TASKS)

# DataComp's aggregate groups (members by our task names). WinoGAViL has no loader in this suite, so the
# Retrieval group covers at most 2 of its 3 members; the coverage is always reported.
DATACOMP_GROUPS: dict[str, tuple[str, ...]] = {
    "IN dist. shift": ("imagenet_sketch", "imagenetv2", "imagenet-a", "imagenet-o", "imagenet-r", "objectnet"),
    "VTAB": (
        "caltech101",
        "cifar100",
        "clevr",
        "clevr_distance",
        "dtd",
        "eurosat",
        "kitti",
        "flowers",
        "pets",
        "pcam",
        "resisc45",
        "svhn",
        "sun397",
    ),
    "Retrieval": ("flickr30k", "mscoco", "winogavil"),
}

TASK_SETS: dict[str, tuple[str, ...]] = {
    "paper26": PAPER26,
    "retrieval": tuple(t.name for t in RETRIEVAL_TASKS),
    "datacomp": tuple(dict.fromkeys(m for ms in DATACOMP_GROUPS.values() for m in ms if m in REGISTRY)),
    "testbed": tuple(t.name for t in TESTBED_TASKS),
}


def parse_task_spec(spec: str, flag: str = "--tasks") -> list[Task]:
    """Expand a comma list of groups, registry names and ``NAME=PATH`` items into tasks (see the module doc).

    Errors name ``flag``: an unknown name comes with the closest registered names, so a typo never silently
    drops a task, and an ad-hoc name that is not a safe file name is refused before anything is written.
    """
    tasks: list[Task] = []
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        if "=" in item:
            tasks.append(_adhoc_task(item, flag))
        elif item in TASK_SETS:
            tasks.extend(REGISTRY[n] for n in TASK_SETS[item])
        elif item in REGISTRY:
            tasks.append(REGISTRY[item])
        else:
            close = difflib.get_close_matches(item, [*REGISTRY, *TASK_SETS], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known groups: {', '.join(TASK_SETS)}"
            raise ValueError(f"{flag}: unknown task {item!r}{hint} (`python -m eval tasks` lists them)")
    if not tasks:
        raise ValueError(f"{flag} {spec!r} names no task")
    return unique_tasks(tasks, flag)


def _adhoc_task(item: str, flag: str) -> Task:
    """``NAME=PATH``: the registry task NAME read from PATH, or a new task (top-1 / mean R@1) on PATH."""
    name, _, path = (s.strip() for s in item.partition("="))
    if not name or not path:
        raise ValueError(f"{flag}: {item!r} is not NAME=PATH")
    validate_name(name, f"{flag} task name")
    if name in TASK_SETS:
        raise ValueError(f"{flag}: {name!r} is a task group ({', '.join(TASK_SETS)}); name one task per NAME=PATH")
    if name in REGISTRY:
        return replace(REGISTRY[name], local_path=path)
    type_file = Path(path) / "dataset_type.txt"
    retrieval = type_file.is_file() and type_file.read_text().strip().lower() == "retrieval"
    kind, metric = ("retrieval", MEAN_RECALL1) if retrieval else ("classification", ACC1)
    return Task(name=name, title=name, metric=metric, kind=kind, local_path=path, note="ad-hoc task")


def unique_tasks(tasks: Iterable[Task], flag: str = "--tasks") -> list[Task]:
    """``tasks`` in order without repeats; one name given with two different definitions is an error."""
    seen: dict[str, Task] = {}
    for t in tasks:
        if t.name in seen and seen[t.name] != t:
            where = [x.local_path or "the registry" for x in (seen[t.name], t)]
            raise ValueError(f"{flag}: task {t.name!r} is given twice, read from {where[0]} and from {where[1]}")
        seen.setdefault(t.name, t)
    return list(seen.values())


def looked_for(task: Task, dataset_root: str | Path | None) -> list[Path]:
    """Every path the runner checks for ``task``, in order (shown in `tasks` and in missing reports)."""
    if task.local_path:
        return [Path(task.local_path)]
    if dataset_root is None:
        raise ValueError(f"task {task.name!r} is looked for under a dataset root, and none was given")
    root = Path(dataset_root)
    paths = [root / d for d in task.wds_dirs]
    if task.builder and task.cb_name:
        paths.append(root / task.cb_name)
    return paths


def format_registry(dataset_root: str | Path | None = None) -> str:
    """The registry as a fixed-width table: name, paper column, metric, split, where the data is looked for."""
    root = Path(dataset_root) if dataset_root else Path("$DATASET_ROOT")
    rows = [("#", "name", "column", "metric", "split", "looked for", "note")]
    sections = [
        ("paper26", PAPER_TASKS),
        ("retrieval", RETRIEVAL_TASKS),
        ("datacomp extras", DATACOMP_EXTRA_TASKS),
        ("testbed", TESTBED_TASKS),
    ]
    lines: list[str] = []
    for title, tasks in sections:
        body = []
        for i, t in enumerate(tasks, 1):
            paths = looked_for(t, root)
            where = " | ".join(
                str(p) + ("/" + "{" + ",".join(t.splits) + "}" if p.name in t.wds_dirs else "") for p in paths
            )
            split = f"{t.source_split} (as {t.paper_split}/)" if t.source_split else t.paper_split
            body.append((str(i), t.name, t.title, METRIC_DESCRIPTIONS[t.metric], split, where, t.note))
        widths = [max(len(r[c]) for r in [*rows, *body]) for c in range(5)]
        lines.append(f"== {title} ({len(tasks)} tasks) ==")
        for r in [rows[0], *body]:
            note = f"  [{r[6]}]" if r[6] else ""
            lines.append("  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5] + note)
        lines.append("")
    groups = "; ".join(f"{g}: {', '.join(m)}" for g, m in DATACOMP_GROUPS.items())
    lines.append(f"DataComp groups: {groups}")
    return "\n".join(lines)
