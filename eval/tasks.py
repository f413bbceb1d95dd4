"""The task registry: the paper's 26 zero-shot tasks (Table 6 order), retrieval and DataComp group members.

Each task says which metric MetaCLIP's clipeval reports for it, which clip_benchmark dataset it is,
and where its data is looked for under ``--dataset-root``, so `python -m eval tasks` can show a
researcher exactly what will be read before anything runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

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
    local_path: str | None = None  # an ad-hoc task read from exactly this wds folder (``--extra-task``)
    source_split: str = ""  # the original dataset's split when `prepare` stores it as test/ (shown by `tasks`)
    expected_samples: int | None = None  # the paper's split size; a different count is flagged in the result

    @property
    def wds_dirs(self) -> tuple[str, ...]:
        """clip_benchmark's local wds folder names (``wds_<name with / as ->``), preferred first."""
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

REGISTRY: dict[str, Task] = {t.name: t for t in (*PAPER_TASKS, *RETRIEVAL_TASKS, *DATACOMP_EXTRA_TASKS)}
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
}


def resolve_tasks(spec: str) -> list[Task]:
    """Expand ``paper26|retrieval|datacomp|a,b,c`` (sets may be mixed with names) into registry tasks.

    An unknown name raises with the closest registered names, so a typo never silently drops a task.
    """
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in TASK_SETS:
            names.extend(TASK_SETS[part])
        elif part in REGISTRY:
            names.append(part)
        else:
            close = difflib.get_close_matches(part, [*REGISTRY, *TASK_SETS], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known sets: {', '.join(TASK_SETS)}"
            raise ValueError(f"--tasks: unknown task {part!r}{hint} (`python -m eval tasks` lists them)")
    if not names:
        raise ValueError(f"--tasks {spec!r} names no task")
    return [REGISTRY[n] for n in dict.fromkeys(names)]


def local_task(spec: str) -> Task:
    """``NAME=PATH`` -> a task outside the registry on a local wds folder (top-1, or mean R@1 for retrieval).

    For suites like the embedded testbed's eval sets; registry names cannot be shadowed.
    """
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--extra-task {spec!r}: expected NAME=PATH")
    if name in REGISTRY:
        raise ValueError(f"--extra-task {name!r}: the name is a registry task; choose another")
    type_file = Path(path) / "dataset_type.txt"
    retrieval = type_file.is_file() and type_file.read_text().strip().lower() == "retrieval"
    kind, metric = ("retrieval", MEAN_RECALL1) if retrieval else ("classification", ACC1)
    return Task(name=name, title=name, metric=metric, kind=kind, local_path=str(path), note="extra task")


def looked_for(task: Task, dataset_root: str | Path) -> list[Path]:
    """Every path the runner checks for ``task``, in order (shown in `tasks` and in missing reports)."""
    if task.local_path:
        return [Path(task.local_path)]
    root = Path(dataset_root)
    paths = [root / d for d in task.wds_dirs]
    if task.builder and task.cb_name:
        paths.append(root / task.cb_name)
    return paths


def format_registry(dataset_root: str | Path | None = None) -> str:
    """The registry as a fixed-width table: name, paper column, metric, split, where the data is looked for."""
    root = Path(dataset_root) if dataset_root else Path("$DATASET_ROOT")
    rows = [("#", "name", "column", "metric", "split", "looked for", "note")]
    sections = [("paper26", PAPER_TASKS), ("retrieval", RETRIEVAL_TASKS), ("datacomp extras", DATACOMP_EXTRA_TASKS)]
    lines: list[str] = []
    for title, tasks in sections:
        body = []
        for i, t in enumerate(tasks, 1):
            paths = looked_for(t, root)
            where = " | ".join(
                str(p) + ("/" + "{" + ",".join(t.splits) + "}" if p.name.startswith("wds_") else "") for p in paths
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
