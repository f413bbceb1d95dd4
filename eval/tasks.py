"""The task registry and the one parser of task lists (``--tasks``, ``--extra-task``, the sweep's ``eval_tasks``).

The registry holds the paper's 26 zero-shot tasks (Table 6 order), retrieval, the DataComp group members
and the embedded testbed's eval sets. Each task says which metric MetaCLIP's clipeval reports for it,
which clip_benchmark dataset it is, and where its data is looked for under the dataset root, so
`python -m eval tasks` can show a researcher exactly what will be read before anything runs.

A task spec (:func:`parse_task_spec`) is a comma list of

* groups: ``paper26``, ``retrieval`` (Flickr30k, COCO, WinoGAViL: DataComp's Retrieval group), ``datacomp``,
  ``testbed`` (concept, category,
  color, count, retrieval: the embedded testbed's ``eval/<name>/`` folders, so its dataset root is the
  testbed's ``eval`` folder);
* registry names, e.g. ``cifar10``;
* ad-hoc ``NAME=PATH`` items: a wds folder read from exactly PATH. A registry NAME keeps its registry
  metric (``fgvc_aircraft=/data/eval/wds_fgvc_aircraft`` is scored by mean per-class recall); any other
  NAME is scored by top-1 (or mean R@1 when PATH's ``dataset_type.txt`` says retrieval, WinoGAViL's Jaccard
  when it says association). NAME becomes a file name (``tasks/<NAME>.json``), so it must be a safe path
  component. An ad-hoc folder is always scored with its own class names and templates.

Each registry task also names its MetaCLIP clipeval dataset (``metaclip_key``: class names and templates,
the default prompts, see ``eval.prompts``) and the size of its standard test split (``expected_samples``).

A group name wins over a task name: ``retrieval`` alone is the Flickr30k/COCO/WinoGAViL group; the testbed's
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
JACCARD_10_12 = "jaccard_score_10-12"  # DataComp's WinoGAViL main metric

METRIC_DESCRIPTIONS = {
    ACC1: "top-1 accuracy",
    MEAN_PER_CLASS: "mean per-class accuracy",
    TOP1_TOP5_MEAN: "(top-1 + top-5) / 2",
    ROC_AUC: "ROC AUC of logit[hateful] - logit[not hateful]",
    MEAN_RECALL1: "mean of text and image recall@1",
    JACCARD_10_12: "mean Jaccard index, 10-12 candidates",
}


@dataclass(frozen=True)
class Task:
    """One evaluation task: what it is called, how it is scored, where its data lives, which prompts it uses."""

    name: str  # our key, used on the command line and in results
    title: str  # the paper's column header
    metric: str
    kind: str = "classification"  # or "retrieval", or "association" (WinoGAViL)
    cb_name: str | None = None  # clip_benchmark dataset name (None: clip_benchmark lacks it)
    splits: tuple[str, ...] = ("test",)  # wds split folders tried in order; the first is the one meant
    builder: bool = False  # clip_benchmark's torchvision builder can read ROOT/<cb_name> offline, honouring the split
    prompt_key: str | None = None  # key into clip_benchmark's / eval/data's classname+template JSON
    metaclip_key: str | None = None  # MetaCLIP clipeval's dataset name (eval/data/metaclip_*.json)
    note: str = ""
    wds_aliases: tuple[str, ...] = field(default_factory=tuple)
    folder: str | None = None  # the folder under the dataset root, instead of wds_<name> (the testbed's sets)
    local_path: str | None = None  # an ad-hoc task read from exactly this wds folder (``--extra-task``)
    source_split: str = ""  # the original dataset's split when `prepare` stores it as test/ (shown by `tasks`)
    expected_samples: int | None = None  # the standard test split's size; a different count is flagged
    count_note: str = ""  # added to the flag when the count differs (e.g. what a known wrong count means)
    refuse_folder: str | None = None  # ROOT/<this> is a builder folder that ignores the split: refused, never read

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


# Expected counts are the standard test splits. Unless a comment says otherwise they are the "size" of the
# task in DataComp's tasklist.yml (mlfoundations/datacomp@4a8df1992566ef8334773f7152e1855b1f716162), i.e. the
# clip_benchmark wds test splits (https://huggingface.co/datasets/clip-benchmark/wds_<name>) this suite reads.
PAPER_TASKS: tuple[Task, ...] = (
    _cls("imagenet1k", "ImageNet", builder=True, prompt_key="imagenet1k", metaclip_key="imagenet",
         expected_samples=50000),
    _cls("food101", "Food-101", builder=True, prompt_key="food101", metaclip_key="Food101", expected_samples=25250),
    _cls("cifar10", "CIFAR10", builder=True, prompt_key="cifar10", metaclip_key="CIFAR10", expected_samples=10000),
    _cls("cifar100", "CIFAR100", builder=True, prompt_key="cifar100", metaclip_key="CIFAR100",
         expected_samples=10000),
    # CUB-200-2011 train_test_split.txt: 5,994 train / 5,794 test images (Wah et al., CNS-TR-2011-001)
    _cls("cub", "CUB", cb="", prompt_key="cub", metaclip_key="CUB200", expected_samples=5794,
         note="CUB-200-2011 test split; build with `python -m eval prepare cub`"),
    # SUN397's official partition 1 (Partitions/Testing_01.txt, 50 images per class): 19,850, the test split
    # of CLIP's Table 9. clip_benchmark's published wds_sun397 was written through its builder and holds the
    # whole dataset (108,754 images, DataComp's tasklist size), so it is read but its count is flagged.
    _cls("sun397", "SUN397", prompt_key="sun397", metaclip_key="SUN397", expected_samples=19850,
         refuse_folder="sun397",
         note="standard test split = partition 1 (`prepare sun397`); clip_benchmark's wds_sun397 is the whole set",
         count_note="clip_benchmark's wds_sun397 is the whole dataset (108,754 images), as DataComp scores it; "
         "`python -m eval prepare sun397` writes the partition-1 test split"),
    _cls("cars", "Cars", builder=True, prompt_key="cars", metaclip_key="StanfordCars", expected_samples=8041),
    _cls("fgvc_aircraft", "Aircraft", MEAN_PER_CLASS, builder=True, prompt_key="fgvc_aircraft",
         metaclip_key="FGVCAircraft", expected_samples=3333),
    _cls("dtd", "DTD", builder=True, prompt_key="dtd", metaclip_key="DescribableTextures", expected_samples=1880),
    _cls("pets", "Pets", MEAN_PER_CLASS, builder=True, prompt_key="pets", metaclip_key="OxfordPets",
         expected_samples=3669),
    _cls("caltech101", "Caltech-101", MEAN_PER_CLASS, cb="vtab/caltech101", prompt_key="caltech101",
         metaclip_key="Caltech101", expected_samples=6085, refuse_folder="caltech101",
         note="VTAB test split (wds_vtab-caltech101)"),
    _cls("flowers", "Flowers", MEAN_PER_CLASS, builder=True, prompt_key="flowers", metaclip_key="Flowers102",
         wds_aliases=("wds_vtab-flowers",), expected_samples=6149),
    _cls("mnist", "MNIST", builder=True, prompt_key="mnist", metaclip_key="MNIST", expected_samples=10000),
    # FER-2013 test = PublicTest + PrivateTest (3,589 + 3,589), the Kaggle msambare/fer2013 test/ folder
    # clip_benchmark's builder (and its wds_fer2013) reads
    _cls("fer2013", "FER-2013", builder=True, prompt_key="fer2013", metaclip_key="FacialEmotionRecognition2013",
         expected_samples=7178),
    _cls("stl10", "STL-10", builder=True, prompt_key="stl10", metaclip_key="STL10", expected_samples=8000),
    _cls("eurosat", "EuroSAT", cb="vtab/eurosat", prompt_key="eurosat", metaclip_key="EuroSAT",
         expected_samples=5400, refuse_folder="eurosat",
         note="VTAB test split (wds_vtab-eurosat), the split published numbers use; MetaCLIP's catalog reads a "
         "folder named val"),
    _cls("resisc45", "RESISC45", cb="vtab/resisc45", prompt_key="resisc45", metaclip_key="RESISC45",
         expected_samples=6300),
    _cls("gtsrb", "GTSRB", builder=True, prompt_key="gtsrb", metaclip_key="GTSRB", expected_samples=12630),
    _cls("kitti", "KITTI", cb="vtab/kitti_closest_vehicle_distance", prompt_key="kitti_closest_vehicle_distance",
         metaclip_key="KITTI", expected_samples=711, note="closest-vehicle distance, 4 classes"),
    _cls("country211", "Country211", builder=True, prompt_key="country211", metaclip_key="Country211",
         expected_samples=21100),
    _cls("pcam", "PCAM", builder=True, prompt_key="pcam", metaclip_key="PatchCamelyon", expected_samples=32768),
    # UCF101 split 1: testlist01.txt lists 3,783 videos
    _cls("ucf101", "UCF101", cb="", prompt_key="ucf101", metaclip_key="UCF101", source_split="testlist01",
         expected_samples=3783, note="middle frame of testlist01 videos; `prepare ucf101`"),
    # no fixed count: videos removed from YouTube differ between copies (prepare_report.json lists them)
    _cls("kinetics700", "Kinetics700", TOP1_TOP5_MEAN, cb="", prompt_key="kinetics700", metaclip_key="Kinetics700",
         source_split="val", note="middle frame of validation videos; `prepare kinetics700`"),
    _cls("clevr", "CLEVR", cb="vtab/clevr_count_all", prompt_key="clevr_count_all", metaclip_key="CLEVRCounts",
         expected_samples=15000, note="counts, 8 classes"),
    # Hateful Memes dev.jsonl (the dev split MetaCLIP's catalog names): 500 memes
    _cls("hateful_memes", "HatefulMemes", ROC_AUC, cb="", prompt_key="hateful_memes", metaclip_key="HatefulMemes",
         source_split="dev", expected_samples=500, note="dev split; `prepare hateful_memes`"),
    _cls("sst2", "SST2", cb="renderedsst2", builder=True, prompt_key="renderedsst2", metaclip_key="SST2",
         expected_samples=1821, note="rendered SST2"),
)  # fmt: skip

RETRIEVAL_TASKS: tuple[Task, ...] = (
    _ret("flickr30k", "Flickr", "flickr30k", 1000),
    _ret("mscoco", "COCO", "mscoco_captions", 5000),
    # DataComp's association task: its tasklist.yml size 3,563 and main metric jaccard_score_10-12
    Task("winogavil", "WinoGAViL", JACCARD_10_12, kind="association", expected_samples=3563,
         note="DataComp's scoring: top-k of the candidates for 'A/An <cue>'; `prepare winogavil`"),
)  # fmt: skip

# DataComp members outside the 26 (classification, wds folders only). ImageNet-V2 and -Sketch share
# ImageNet's 1000 classes, so MetaCLIP's ImageNet prompts apply to them; the others have no MetaCLIP list.
DATACOMP_EXTRA_TASKS: tuple[Task, ...] = (
    _cls("imagenet_sketch", "ImageNet-Sketch", metaclip_key="imagenet", expected_samples=50889),
    _cls("imagenetv2", "ImageNet-V2", metaclip_key="imagenet", expected_samples=10000),
    _cls("imagenet-a", "ImageNet-A", expected_samples=7500),
    _cls("imagenet-o", "ImageNet-O", expected_samples=2000),
    _cls("imagenet-r", "ImageNet-R", expected_samples=30000),
    _cls("objectnet", "ObjectNet", expected_samples=18574),
    _cls("svhn", "SVHN", cb="vtab/svhn", expected_samples=26032),
    _cls("clevr_distance", "CLEVR Distance", cb="vtab/clevr_closest_object_distance", expected_samples=15000),
)

# The embedded testbed's eval sets (testbed.EVAL_TASKS; eval imports no testbed code), read from
# <testbed>/eval/<name>/: pass that ``eval`` folder as the dataset root.
_TESTBED_FINE = tuple(f"concept_{c}" for c in ("bird", "lizard", "fish", "flower", "beetle", "mushroom", "butterfly",
                                                 "shell"))  # fmt: skip
TESTBED_TASKS: tuple[Task, ...] = (
    *(
        Task(n, n, ACC1, folder=n, note="embedded testbed")
        for n in ("concept", *_TESTBED_FINE, "category", "color", "count")
    ),
    Task("retrieval", "retrieval", MEAN_RECALL1, kind="retrieval", folder="retrieval", note="embedded testbed"),
)
# The testbed's report groups (DataComp-style, beside the average): long-tail concept names, which alt-text
# carries (the 64-way task and the 8 fine-grained ones, most of the average as in the paper's 26 tasks),
# against the attributes (shape category, colour, count) and retrieval that dense synthetic captions describe.
TESTBED_GROUPS: dict[str, tuple[str, ...]] = {
    "concepts": ("concept", *_TESTBED_FINE),
    "attributes": ("category", "color", "count"),
    "retrieval": ("retrieval",),
}

REGISTRY: dict[str, Task] = {t.name: t for t in (*PAPER_TASKS, *RETRIEVAL_TASKS, *DATACOMP_EXTRA_TASKS, *TESTBED_TASKS)}
PAPER26: tuple[str, ...] = tuple(t.name for t in PAPER_TASKS)

# DataComp's aggregate groups (members by our task names), as in its aggregate_scores.py.
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
    kind = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    metric = {"retrieval": MEAN_RECALL1, "association": JACCARD_10_12}.get(kind, ACC1)
    kind = kind if kind in ("retrieval", "association") else "classification"
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
