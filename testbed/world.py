"""The testbed's world: concepts, categories, colours, constants and the build configuration.

Everything here is data that decides what a testbed contains; together with ``GENERATOR_VERSION``
the :class:`TestbedConfig` fingerprint determines every byte the build writes, so a cached build is
reused only when it would come out identical. Rendering, caption text and file writing live in the
sibling modules and read these tables.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

GENERATOR_VERSION = 2  # 2: fine-grained concept tasks per category, larger eval sets (issue 18)
SYNTHETIC_SOURCES = ("altogether", "scratch")

MANIFEST_NAME = "testbed.json"
NOTICE = "Synthetic testbed for exercising the suite; its numbers are not paper results."

# category -> (shape adjective used in captions, [(species, plural), ...] in pattern order)
TAXONOMY: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "bird": (
        "triangular",
        [
            ("house sparrow", "house sparrows"),
            ("barn swallow", "barn swallows"),
            ("song thrush", "song thrushes"),
            ("common kingfisher", "common kingfishers"),
            ("great tit", "great tits"),
            ("hoopoe", "hoopoes"),
            ("nightingale", "nightingales"),
            ("winter wren", "winter wrens"),
        ],
    ),
    "lizard": (
        "diamond-shaped",
        [
            ("common iguana", "common iguanas"),
            ("green anole", "green anoles"),
            ("gila monster", "gila monsters"),
            ("thorny devil", "thorny devils"),
            ("leopard gecko", "leopard geckos"),
            ("komodo dragon", "komodo dragons"),
            ("marine iguana", "marine iguanas"),
            ("frilled lizard", "frilled lizards"),
        ],
    ),
    "fish": (
        "oval",
        [
            ("clownfish", "clownfish"),
            ("pufferfish", "pufferfish"),
            ("lionfish", "lionfish"),
            ("moorish idol", "moorish idols"),
            ("mandarin dragonet", "mandarin dragonets"),
            ("rainbow trout", "rainbow trout"),
            ("northern pike", "northern pike"),
            ("atlantic salmon", "atlantic salmon"),
        ],
    ),
    "flower": (
        "star-shaped",
        [
            ("oxeye daisy", "oxeye daisies"),
            ("sunflower", "sunflowers"),
            ("corn poppy", "corn poppies"),
            ("wild tulip", "wild tulips"),
            ("common foxglove", "common foxgloves"),
            ("lotus", "lotuses"),
            ("edelweiss", "edelweiss"),
            ("passionflower", "passionflowers"),
        ],
    ),
    "beetle": (
        "round",
        [
            ("stag beetle", "stag beetles"),
            ("rhinoceros beetle", "rhinoceros beetles"),
            ("dung beetle", "dung beetles"),
            ("jewel beetle", "jewel beetles"),
            ("tiger beetle", "tiger beetles"),
            ("longhorn beetle", "longhorn beetles"),
            ("click beetle", "click beetles"),
            ("ladybug", "ladybugs"),
        ],
    ),
    "mushroom": (
        "dome-capped",
        [
            ("fly agaric", "fly agarics"),
            ("chanterelle", "chanterelles"),
            ("porcini", "porcini"),
            ("morel", "morels"),
            ("shiitake", "shiitakes"),
            ("oyster mushroom", "oyster mushrooms"),
            ("death cap", "death caps"),
            ("puffball", "puffballs"),
        ],
    ),
    "butterfly": (
        "bow-tie-shaped",
        [
            ("monarch butterfly", "monarch butterflies"),
            ("swallowtail", "swallowtails"),
            ("peacock butterfly", "peacock butterflies"),
            ("painted lady", "painted ladies"),
            ("glasswing butterfly", "glasswing butterflies"),
            ("common morpho", "common morphos"),
            ("comma butterfly", "comma butterflies"),
            ("gatekeeper butterfly", "gatekeeper butterflies"),
        ],
    ),
    "shell": (
        "fan-shaped",
        [
            ("queen conch", "queen conchs"),
            ("nautilus", "nautiluses"),
            ("cowrie", "cowries"),
            ("abalone", "abalones"),
            ("giant clam", "giant clams"),
            ("scallop", "scallops"),
            ("whelk", "whelks"),
            ("cockle", "cockles"),
        ],
    ),
}
CATEGORY_PLURALS = {
    "bird": "birds",
    "lizard": "lizards",
    "fish": "fish",
    "flower": "flowers",
    "beetle": "beetles",
    "mushroom": "mushrooms",
    "butterfly": "butterflies",
    "shell": "shells",
}
CATEGORIES: tuple[str, ...] = tuple(TAXONOMY)
# Eval tasks, weighted like the paper's 26-task average: mostly long-tail concept recognition (the 64-way
# ``concept`` task, ImageNet-like, and one 8-way fine-grained task per category, like CUB or Flowers),
# then coarse ``category``, the attributes ``color`` and ``count``, and ``retrieval`` with dense captions.
FINE_TASKS: tuple[str, ...] = tuple(f"concept_{cat}" for cat in CATEGORIES)
EVAL_TASKS: tuple[str, ...] = ("concept", *FINE_TASKS, "category", "color", "count", "retrieval")
# Marking patterns; the i-th species of every category wears PATTERNS[i].
PATTERNS = ("solid", "hstripes", "vstripes", "dots", "checker", "hollow", "center_dot", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (20, 190, 60),
    "blue": (35, 65, 225),
    "yellow": (245, 225, 30),
    "purple": (145, 45, 185),
    "orange": (250, 135, 15),
    "white": (250, 250, 250),
    "black": (18, 18, 18),
}
COUNT_WORDS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("grass", "sand", "sky", "water", "snow")

# Marking tones: dark markings on light objects, light markings on dark ones (RGB used by the renderer,
# the word by the dense captions).
MARK_RGB: dict[str, tuple[int, int, int]] = {"dark": (25, 25, 25), "light": (240, 240, 240)}


def marking_tone(rgb: tuple[int, int, int]) -> str:
    """'dark' or 'light': the marking tone that contrasts with an object of colour ``rgb``."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "dark" if lum > 140 else "light"


@dataclass(frozen=True)
class Concept:
    """One fine class: a species name, its plural, its category (shape) and its marking pattern."""

    index: int
    name: str
    plural: str
    category: str
    pattern: str


CONCEPTS: tuple[Concept, ...] = tuple(
    Concept(ci * 8 + pi, name, plural, cat, PATTERNS[pi])
    for ci, (cat, (_, species)) in enumerate(TAXONOMY.items())
    for pi, (name, plural) in enumerate(species)
)

# clip_benchmark zero-shot templates per classification task.
_OBJECT_TEMPLATES = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a close-up photo of the {c}.",
    "a photo of a small {c}.",
)
EVAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "concept": _OBJECT_TEMPLATES,
    **{task: _OBJECT_TEMPLATES for task in FINE_TASKS},
    "category": _OBJECT_TEMPLATES,
    "color": ("a photo of a {c} object.", "a {c} thing.", "something {c}."),
    "count": ("a photo of {c} objects.", "{c} things in a picture."),
}


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that determines the bytes of a testbed (together with GENERATOR_VERSION)."""

    __test__ = False  # not a pytest test class

    num_train: int = 20_000
    shard_size: int = 1_000
    image_size: int = 64
    eval_per_class: int = 32  # concept task: 64 classes x 32
    # category/color tasks and each fine-grained concept_<category> task: 8 classes x 125; count: 4 x 250.
    # ~1000 images per task, so two equally good models differ by < 2 points on a task by sampling alone.
    eval_per_class_small: int = 125
    num_retrieval: int = 1000
    seed: int = 0

    def fingerprint(self) -> str:
        """Short content hash, so a cached build is reused only when it would come out identical."""
        doc = json.dumps({"config": asdict(self), "generator_version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(doc.encode("utf-8")).hexdigest()[:12]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_train / self.shard_size)

    def eval_sizes(self) -> dict[str, int]:
        """Number of images per eval task."""
        return {
            "concept": len(CONCEPTS) * self.eval_per_class,
            **{f"concept_{cat}": len(TAXONOMY[cat][1]) * self.eval_per_class_small for cat in CATEGORIES},
            "category": len(CATEGORIES) * self.eval_per_class_small,
            "color": len(COLORS) * self.eval_per_class_small,
            "count": len(COUNT_WORDS) * 2 * self.eval_per_class_small,
            "retrieval": self.num_retrieval,
        }

    def validate(self) -> None:
        """Fail early with a readable message instead of deep inside the renderer."""
        if self.num_train < 1 or self.shard_size < 1:
            raise ValueError("num_train and shard_size must be >= 1")
        if self.shard_size > 10_000:
            raise ValueError("shard_size must be <= 10000 (sample keys use 4 digits for the index)")
        if self.num_shards > 100_000:
            raise ValueError("at most 100000 shards (5-digit shard names)")
        if self.image_size < 32:
            raise ValueError("image_size must be >= 32 so the marking patterns stay visible")
        if min(self.eval_per_class, self.eval_per_class_small, self.num_retrieval) < 1:
            raise ValueError("eval sizes must be >= 1")
