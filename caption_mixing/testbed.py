"""The embedded testbed: a small, deterministic, web-like image-text corpus.

THIS IS A SYNTHETIC TESTBED. It exists so that the whole suite (caption mixing, CLIP training,
zero-shot evaluation) can be exercised end to end on a laptop without downloading anything.
Numbers measured on it are never paper results and must not be reported as such.

It is written in exactly the layout real data uses, so the same code paths run on it:

* ``train/00000.tar ...`` -- img2dataset-style WebDataset shards (``{key}.jpg``, ``{key}.txt`` with
  the alt-text, ``{key}.json`` with metadata plus a ``"testbed"`` ground-truth record);
* ``train/00000.altogether.json``, ``train/00000.scratch.json`` -- one caption sidecar per shard and
  synthetic source (see :mod:`caption_mixing.sidecar`); ~1% of samples have no ``altogether``
  caption and ~0.5% an empty one, because real re-captioning runs have gaps;
* ``eval/{task}/`` -- clip_benchmark local-WebDataset folders (``wds/{task}``);
* ``testbed.json`` -- the manifest, written last and atomically, so a killed build is redone.

The world is built so the phenomenon the project studies exists: images show 1-4 objects of one of
64 fine "species" (8 generic categories drawn as distinct shapes, species told apart by a marking
pattern), with a color, a position and a background. Alt-texts are short and noisy but often name
the species (sometimes the wrong one); ``altogether`` captions are dense and aligned and keep the
species name when the alt-text had it right; ``scratch`` captions are dense but only ever use
generic category names and sometimes hallucinate. So alt-text carries long-tail concept knowledge,
synthetic captions carry attributes, and mixing ratio p trades one for the other.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from caption_mixing.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from caption_mixing.sidecar import sidecar_path, write_sidecar

GENERATOR_VERSION = 1
SYNTHETIC_SOURCES = ("altogether", "scratch")
EVAL_TASKS = ("concept", "category", "color", "count", "retrieval")

MANIFEST_NAME = "testbed.json"
NOTICE = "Synthetic testbed for exercising the suite; its numbers are not paper results."

# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------

# category -> (shape adjective used in captions, [(species, plural), ...] in pattern order)
_TAXONOMY: dict[str, tuple[str, list[tuple[str, str]]]] = {
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
CATEGORIES: tuple[str, ...] = tuple(_TAXONOMY)
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
_BG_BASE = {
    "grass": (72, 104, 46),
    "sand": (198, 178, 132),
    "sky": (132, 176, 222),
    "water": (34, 84, 112),
    "snow": (196, 205, 218),
}


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
    for ci, (cat, (_, species)) in enumerate(_TAXONOMY.items())
    for pi, (name, plural) in enumerate(species)
)
CONCEPT_BY_NAME = {c.name: c for c in CONCEPTS}

# clip_benchmark zero-shot templates per classification task.
EVAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "concept": (
        "a photo of a {c}.",
        "a blurry photo of a {c}.",
        "a close-up photo of the {c}.",
        "a photo of a small {c}.",
    ),
    "category": (
        "a photo of a {c}.",
        "a blurry photo of a {c}.",
        "a close-up photo of the {c}.",
        "a photo of a small {c}.",
    ),
    "color": ("a photo of a {c} object.", "a {c} thing.", "something {c}."),
    "count": ("a photo of {c} objects.", "{c} things in a picture."),
}

# ----------------------------------------------------------------------------------------------
# Configuration, manifest and the Testbed handle
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that determines the bytes of a testbed (together with GENERATOR_VERSION)."""

    __test__ = False  # not a pytest test class

    num_train: int = 20_000
    shard_size: int = 1_000
    image_size: int = 64
    eval_per_class: int = 20  # concept task: 64 classes x 20
    eval_per_class_small: int = 50  # category/color tasks (8 classes x 50); count task 4 x 100 (2x this)
    num_retrieval: int = 500
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


@dataclass(frozen=True)
class Testbed:
    """A built testbed on disk, as described by its manifest."""

    __test__ = False  # not a pytest test class

    root: Path
    config: TestbedConfig
    train_shards: str
    num_train: int
    synthetic_sources: tuple[str, ...]
    eval_tasks: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | os.PathLike) -> Testbed:
        """Read ``root/testbed.json``; the error names the file when it is missing or malformed."""
        root = Path(root).expanduser().resolve()
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no testbed manifest (build one with `python -m caption_mixing.testbed --out {root}`)"
            )
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            config = TestbedConfig(**doc["config"])
            train = doc["train"]
            return cls(
                root=root,
                config=config,
                train_shards=str(root / train["pattern"]),
                num_train=int(train["num_samples"]),
                synthetic_sources=tuple(doc["synthetic_sources"]),
                eval_tasks={task: root / info["path"] for task, info in doc["eval"].items()},
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid testbed manifest ({type(e).__name__}: {e})") from e

    @property
    def fingerprint(self) -> str:
        return self.config.fingerprint()

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.root / MANIFEST_NAME).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

_SS = 4  # supersampling factor for anti-aliased shape edges


def _shape_polygon_mask(category: str, n: int) -> np.ndarray:
    """Boolean mask (n x n) of the category's shape, drawn with PIL at resolution n."""
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)

    def p(x: float, y: float) -> tuple[float, float]:
        return (x * n, y * n)

    if category == "bird":
        d.polygon([p(0.5, 0.04), p(0.97, 0.92), p(0.03, 0.92)], fill=255)
    elif category == "lizard":
        d.polygon([p(0.5, 0.02), p(0.98, 0.5), p(0.5, 0.98), p(0.02, 0.5)], fill=255)
    elif category == "fish":
        d.ellipse([p(0.02, 0.2), p(0.98, 0.8)], fill=255)
    elif category == "flower":
        pts = []
        for k in range(10):
            r = 0.49 if k % 2 == 0 else 0.21
            a = -math.pi / 2 + k * math.pi / 5
            pts.append(p(0.5 + r * math.cos(a), 0.53 + r * math.sin(a)))
        d.polygon(pts, fill=255)
    elif category == "beetle":
        d.ellipse([p(0.06, 0.06), p(0.94, 0.94)], fill=255)
    elif category == "mushroom":
        d.pieslice([p(0.02, 0.1), p(0.98, 1.0)], 180, 360, fill=255)
        d.rectangle([p(0.37, 0.54), p(0.63, 0.98)], fill=255)
    elif category == "butterfly":
        d.polygon([p(0.02, 0.08), p(0.5, 0.4), p(0.98, 0.08), p(0.98, 0.92), p(0.5, 0.6), p(0.02, 0.92)], fill=255)
    elif category == "shell":
        d.pieslice([p(-0.03, 0.04), p(1.03, 1.84)], 200, 340, fill=255)
    else:  # pragma: no cover - the taxonomy is fixed
        raise KeyError(category)
    return np.asarray(img) > 127


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion with a 4-neighbourhood, ``steps`` times (small masks, cached: speed irrelevant)."""
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


_SPRITES: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}


def _sprite(category: str, pattern: str, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha[s,s,1] float32, marking[s,s,1] bool) for one object of size s; cached."""
    key = (category, pattern, s)
    hit = _SPRITES.get(key)
    if hit is not None:
        return hit
    hi = _shape_polygon_mask(category, s * _SS)
    if pattern == "hollow":
        width = max(2, round(s / 8)) * _SS
        hi = hi & ~_erode(hi, width)
    alpha = hi.reshape(s, _SS, s, _SS).mean(axis=(1, 3)).astype(np.float32)
    full = _shape_polygon_mask(category, s * _SS).reshape(s, _SS, s, _SS).mean(axis=(1, 3)) > 0.5
    ys, xs = np.nonzero(full)
    cy, cx = (ys.mean(), xs.mean()) if len(ys) else (s / 2, s / 2)
    yy, xx = np.mgrid[0:s, 0:s]
    if pattern == "hstripes":
        per = max(4, round(s / 4.5))
        mark = (yy // (per // 2)) % 2 == 1
    elif pattern == "vstripes":
        per = max(4, round(s / 4.5))
        mark = (xx // (per // 2)) % 2 == 1
    elif pattern == "dots":
        per = max(5, round(s / 4))
        r = max(1.0, per / 3.2)
        mark = ((yy % per) - per / 2 + 0.5) ** 2 + ((xx % per) - per / 2 + 0.5) ** 2 <= r * r
    elif pattern == "checker":
        cell = max(3, round(s / 6))
        mark = ((yy // cell) + (xx // cell)) % 2 == 1
    elif pattern == "center_dot":
        r = max(2.0, s / 6)
        mark = (yy - cy + 0.5) ** 2 + (xx - cx + 0.5) ** 2 <= r * r
    elif pattern == "cross":
        half = max(1.0, s / 14)
        mark = (np.abs(yy - cy + 0.5) <= half) | (np.abs(xx - cx + 0.5) <= half)
    else:  # solid, hollow
        mark = np.zeros((s, s), dtype=bool)
    out = (alpha[:, :, None], mark[:, :, None])
    _SPRITES[key] = out
    return out


def _mark_color(rgb: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    """Marking color contrasting with the object color (dark on light objects, light on dark)."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if lum > 140:
        return np.array((25, 25, 25), np.float32), "dark"
    return np.array((240, 240, 240), np.float32), "light"


def _box_blur(a: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """Wrap-around box blur via cumulative sums (textures must tile smoothly)."""
    out = a
    if ry > 0:
        out = sum(np.roll(out, k, axis=0) for k in range(-ry, ry + 1)) / (2 * ry + 1)
    if rx > 0:
        out = sum(np.roll(out, k, axis=1) for k in range(-rx, rx + 1)) / (2 * rx + 1)
    return out


def _make_textures(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """One tileable texture (2*size square, float32 RGB) per background kind; images crop from it."""
    t = 2 * size
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float32)
    sc = size / 64
    tex: dict[str, np.ndarray] = {}
    for kind in BACKGROUNDS:
        base = np.array(_BG_BASE[kind], np.float32)
        n = rng.standard_normal((t, t)).astype(np.float32)
        if kind == "grass":
            lum = 16 * _box_blur(n, max(1, round(3 * sc)), 0) * 1.8 + 5 * rng.standard_normal((t, t))
            img = base + lum[..., None] * np.array((0.8, 1.0, 0.6), np.float32)
        elif kind == "sand":
            lum = 9 * n + 7 * np.sin(0.22 / sc * yy + 0.08 / sc * xx)
            img = base + lum[..., None]
        elif kind == "sky":
            cloud = np.clip(_box_blur(n, max(2, round(6 * sc)), max(3, round(9 * sc))) * 9, 0, 1)
            img = base + (22 * yy / t)[..., None] + cloud[..., None] * (np.array((245, 248, 252)) - base) * 0.6
        elif kind == "water":
            wave = np.sin(0.75 / sc * yy + 1.6 * np.sin(0.13 / sc * xx))
            img = base + (13 * wave + 4 * n)[..., None] * np.array((0.7, 0.9, 1.0), np.float32)
        else:  # snow
            speck = (rng.random((t, t)) > 0.97).astype(np.float32) * 28
            img = base + (6 * _box_blur(n, 2, 2) * 2.5 + speck)[..., None]
        tex[kind] = np.clip(img, 0, 255).astype(np.float32)
    return tex


def _layout(rng: np.random.Generator, count: int, position: str | None, size: int) -> list[tuple[int, int, int]]:
    """(x0, y0, s) boxes for ``count`` objects: one at a named position, or several in distinct quadrants."""
    sc = size / 64
    boxes = []
    if count == 1:
        s = int(round(rng.integers(18, 31) * sc))
        fx, fy = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}.get(
            position or "center", (0.5, 0.5)
        )
        jx, jy = rng.integers(-3, 4, size=2) * sc
        centers = [(fx * size + jx, fy * size + jy, s)]
    else:
        cells = rng.choice(4, size=count, replace=False)
        centers = []
        for c in cells:
            s = int(round(rng.integers(16, 23) * sc))
            jx, jy = rng.integers(-2, 3, size=2) * sc
            centers.append(((0.25 + 0.5 * (c % 2)) * size + jx, (0.25 + 0.5 * (c // 2)) * size + jy, s))
    for cx, cy, s in centers:
        x0 = int(min(max(round(cx - s / 2), 0), size - s))
        y0 = int(min(max(round(cy - s / 2), 0), size - s))
        boxes.append((x0, y0, s))
    return boxes


def _render(
    rng: np.random.Generator,
    textures: dict[str, np.ndarray],
    size: int,
    concept: Concept,
    color: str,
    count: int,
    position: str | None,
    background: str,
) -> bytes:
    """Draw one image and return its JPEG bytes (quality 90, deterministic)."""
    tex = textures[background]
    oy, ox = rng.integers(0, tex.shape[0] - size + 1, size=2)
    canvas = tex[oy : oy + size, ox : ox + size].copy()
    canvas += rng.normal(0.0, 3.0, size=(size, size, 1)).astype(np.float32) + float(rng.integers(-8, 9))
    rgb = COLORS[color]
    col = np.array(rgb, np.float32)
    mark_col, _ = _mark_color(rgb)
    for x0, y0, s in _layout(rng, count, position, size):
        alpha, mark = _sprite(concept.category, concept.pattern, s)
        paint = np.where(mark, mark_col, col)
        box = canvas[y0 : y0 + s, x0 : x0 + s]
        box += alpha * (paint - box)
    buf = io.BytesIO()
    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

_FIRST = ("John", "Maria", "Ken", "Ana", "Luis", "Emma", "Raj", "Sofia", "Tom", "Yuki", "Omar", "Lena")
_SURNAMES = ("Smith", "Garcia", "Tanaka", "Novak", "Okafor", "Larsen", "Rossi", "Dubois", "Kim", "Murphy")
_SITES = ("naturepix.net", "wildshots.org", "photostock.example", "myblog.example", "imgshare.example")
_TOWNS = ("Lisbon", "Austin", "Kyoto", "Oslo", "Nairobi", "Perth", "Quebec", "Porto")
_FILLERS = ("photo", "image", "hd", "pic", "jpg", "download")
_UNRELATED = (
    "home decor ideas",
    "best deals today",
    "cheap flights and hotels",
    "wedding dress inspiration",
    "kitchen renovation before after",
    "funny cat memes",
    "vintage car show",
    "top ten travel tips",
)


def _date(r: random.Random) -> str:
    return f"{r.randint(1, 28):02d}/{r.randint(1, 12):02d}/{r.randint(1998, 2023)}"


def _alt_text(r: random.Random, kind: str, name: str | None, color: str) -> str:
    """Short noisy web alt-text. ``name`` is the (correct or wrong) species, or None for kind 'none'."""
    first, sur, site = r.choice(_FIRST), r.choice(_SURNAMES), r.choice(_SITES)
    d4, year = f"{r.randint(0, 9999):04d}", str(r.randint(1998, 2023))
    if name is not None:
        n = name.title() if r.random() < 0.3 else name
        if r.random() < 0.15:  # a color word in ~15% of alt-texts (usually the true one)
            n = f"{color if r.random() < 0.85 else r.choice(tuple(COLORS))} {n}"
        templates = (
            f"{n}, {_date(r)}",
            f"IMG_{d4} {n} by {first[0]}. {sur}",
            f"{n} best price free shipping",
            f"{n} stock photo",
            f"beautiful {n} in the wild",
            f"{n} - {sur} Photography",
            f"my {n} {year}",
            f"{n} wallpaper hd download",
            f"{n} | {site}",
            f"close up of a {n}",
            f"{n} seen near {r.choice(_TOWNS)}",
            f"DSC_{d4} {n}",
            f"{n} (photo: {first} {sur})",
        )
    else:
        templates = (
            f"DSC_{d4}.JPG uploaded {_date(r)}",
            f"IMG_{d4}.jpg - {site}",
            f"photo by {first} {sur}",
            f"stock photo royalty free image {r.randint(100000, 999999)}",
            f"{_date(r)} summer trip day {r.randint(1, 9)}",
            "best deals today free shipping",
            f"click to enlarge image {r.randint(10, 99)}",
            f"untitled image {r.randint(100, 999)} by {sur}",
            f"{r.choice(_UNRELATED)} {year}",
            f"{first}'s weekend in {r.choice(_TOWNS)}",
            f"copyright {year} {first} {sur} all rights reserved",
            f"{r.choice(_UNRELATED)} stock photo",
        )
        text = r.choice(templates)
        if r.random() < 0.15:
            text = f"{color} {text}" if r.random() < 0.5 else f"{text} {color}"
        templates = (text,)
    words = r.choice(templates).split()
    while len(words) < 3:
        words.append(r.choice(_FILLERS))
    return " ".join(words[:12])


_PATTERN_WITH = {
    "solid": ("with a plain, unmarked body", "with no markings at all", "in one solid color"),
    "hstripes": ("with {m} horizontal stripes", "striped horizontally with {m} bands"),
    "vstripes": ("with {m} vertical stripes", "striped vertically with {m} bands"),
    "dots": ("covered in small {m} dots", "with a pattern of {m} dots"),
    "checker": ("with a {m} checkered pattern", "marked with a {m} checkerboard pattern"),
    "hollow": ("drawn as a hollow outline", "shown only as a hollow outline with an empty middle"),
    "center_dot": ("with a single {m} dot in the middle", "marked by one {m} spot at the center"),
    "cross": ("marked with a {m} cross", "with a {m} cross through the middle"),
}
_POSITION = {
    "left": ("on the left side of the frame", "toward the left of the image"),
    "right": ("on the right side of the frame", "toward the right of the image"),
    "top": ("near the top of the image", "in the upper part of the frame"),
    "bottom": ("near the bottom of the picture", "in the lower part of the frame"),
    "center": ("in the center of the frame", "right in the middle of the image"),
    None: ("spread across the frame", "scattered around the image"),
}
_BACKGROUND = {
    "grass": ("a grassy background", "a patch of grass", "a lawn"),
    "sand": ("a sandy background", "sand", "a stretch of sandy ground"),
    "sky": ("a clear sky", "an open sky background", "the sky"),
    "water": ("water", "a rippling water surface", "a background of water"),
    "snow": ("snow", "a snowy background", "a field of snow"),
}
_EXTRAS = (
    "Nothing else is visible in the scene.",
    "The picture is small and slightly soft, like a web thumbnail.",
    "The lighting is even and the colors are clear.",
    "The background has a subtle, natural texture.",
    "The composition is simple and uncluttered.",
)


def _dense_caption(
    r: random.Random, concept: Concept, color: str, count: int, position: str | None, background: str, use_name: bool
) -> str:
    """Dense aligned caption (25-45 words): count, color, object, pattern, position, background.

    ``use_name`` puts the species name in the main sentence; otherwise only the generic category
    appears (as a captioner that does not know the long-tail concept would write).
    """
    cat = concept.category
    cat_n = cat if count == 1 else CATEGORY_PLURALS[cat]
    noun = (concept.name if count == 1 else concept.plural) if use_name else cat_n
    mark = _mark_color(COLORS[color])[1]
    cnt = r.choice(("a single", "one")) if count == 1 else COUNT_WORDS[count - 1]
    be, pron = ("is", "It") if count == 1 else ("are", "They")
    pat = r.choice(_PATTERN_WITH[concept.pattern]).format(m=mark)
    pos = r.choice(_POSITION[position if count == 1 else None])
    bg = r.choice(_BACKGROUND[background])
    shape = _TAXONOMY[cat][0]
    mains = (
        (f"A photo of {cnt} {color} {noun} {pat} {pos}, set against {bg}.", True),
        (f"{cnt.capitalize()} {color} {noun} {be} {pos}, shown against {bg}, {pat}.", True),
        (f"This image shows {cnt} {color} {noun} {pos} on {bg}.", False),
        (f"In this picture, {cnt} {color} {noun} {be} {pos} with {bg} behind {'it' if count == 1 else 'them'}.", False),
        (f"Close-up view of {cnt} {color} {noun} {pat}, {pos}, over {bg}.", True),
    )
    main, has_pattern = r.choice(mains)
    sentences = [main]
    if not has_pattern:
        sentences.append(f"{pron} {be} {color}, {pat}.")
    if count == 1:
        shape_s = f"The {cat_n} has {'an' if shape[0] in 'aeiou' else 'a'} {shape} body that stands out clearly."
        count_s = f"There is exactly one {cat_n} in the scene and nothing else."
    else:
        shape_s = f"The {cat_n} have {shape} bodies that stand out clearly."
        count_s = f"There are exactly {COUNT_WORDS[count - 1]} {cat_n} in the scene, all of the same kind."
    optional = [
        shape_s,
        count_s,
        f"The rest of the frame is {bg}, with no other objects.",
        *r.sample(_EXTRAS, 2),
    ]
    r.shuffle(optional)
    target = r.randint(27, 42)
    n_words = sum(len(s.split()) for s in sentences)
    for s in optional:
        if n_words >= target:
            break
        if n_words + len(s.split()) <= 45:
            sentences.append(s)
            n_words += len(s.split())
    return " ".join(sentences)


# ----------------------------------------------------------------------------------------------
# Sampling the corpus
# ----------------------------------------------------------------------------------------------


def _train_concept_probs(seed: int) -> np.ndarray:
    """Zipf-like frequencies over the 64 concepts; every category gets one concept per rank block of 8,
    so the long tail is spread evenly over categories rather than concentrated in a few."""
    rng = np.random.default_rng([seed, 0, 1])
    ranks = np.empty(len(CONCEPTS), dtype=np.int64)
    species_order = [rng.permutation(8) for _ in CATEGORIES]
    for block in range(8):
        cats = rng.permutation(len(CATEGORIES))
        for j, ci in enumerate(cats):
            ranks[ci * 8 + species_order[ci][block]] = block * 8 + j
    weights = 1.0 / (ranks + 1.0) ** 1.1
    return weights / weights.sum()


def _sample_attrs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concept-independent attributes: color, count, position (used for count 1), background."""
    colors = rng.integers(0, len(COLORS), n)
    counts = rng.choice(np.arange(1, 5), size=n, p=[0.55, 0.2, 0.13, 0.12])
    positions = rng.integers(0, len(POSITIONS), n)
    backgrounds = rng.integers(0, len(BACKGROUNDS), n)
    return colors, counts, positions, backgrounds


_TAR_MTIME = 1_700_000_000


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata, so two builds are byte-identical."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = _TAR_MTIME
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "testbed"
    tar.addfile(ti, io.BytesIO(data))


def _build_train_shard(
    shard: int, cfg: TestbedConfig, probs: np.ndarray, textures: dict[str, np.ndarray], tar_path: Path, bar: tqdm
) -> dict[str, Any]:
    """Write one train shard and its sidecars; returns per-shard counts for the manifest.

    Each shard has its own RNG stream (seed, 1, shard), so shards are independent of build order.
    """
    rng = np.random.default_rng([cfg.seed, 1, shard])
    r = random.Random(int(rng.integers(2**62)))
    start = shard * cfg.shard_size
    n = min(cfg.shard_size, cfg.num_train - start)
    concepts = rng.choice(len(CONCEPTS), size=n, p=probs)
    colors, counts, positions, backgrounds = _sample_attrs(rng, n)
    color_names = tuple(COLORS)
    altogether: dict[str, str] = {}
    scratch: dict[str, str] = {}
    stats = {"alt_kind": {"correct": 0, "wrong": 0, "none": 0}, "missing": 0, "empty": 0, "concepts": [0] * 64}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            key = f"{shard:05d}{i:04d}"
            concept = CONCEPTS[int(concepts[i])]
            color = color_names[int(colors[i])]
            count = int(counts[i])
            position = POSITIONS[int(positions[i])] if count == 1 else None
            background = BACKGROUNDS[int(backgrounds[i])]
            jpg = _render(rng, textures, cfg.image_size, concept, color, count, position, background)

            u = r.random()
            kind = "correct" if u < 0.55 else ("wrong" if u < 0.70 else "none")
            if kind == "correct":
                alt_name: str | None = concept.name
            elif kind == "wrong":
                pool = [c for c in CONCEPTS if c.index != concept.index]
                if r.random() < 0.5:
                    pool = [c for c in pool if c.category == concept.category]
                alt_name = r.choice(pool).name
            else:
                alt_name = None
            alt = _alt_text(r, kind, alt_name, color)
            keep = kind == "correct" and r.random() < 0.9
            dense = _dense_caption(r, concept, color, count, position, background, use_name=keep)
            h_color, h_count = color, count
            if r.random() < 0.2:  # scratch captioner hallucinates one detail
                if r.random() < 0.5:
                    h_color = r.choice([c for c in color_names if c != color])
                else:
                    h_count = r.choice([c for c in (count - 1, count + 1) if 1 <= c <= 4])
            h_position = position if h_count == 1 else None
            if h_count == 1 and h_position is None:
                h_position = "center"
            scratch[key] = _dense_caption(r, concept, h_color, h_count, h_position, background, use_name=False)
            gap = r.random()
            if gap < 0.01:
                stats["missing"] += 1
            elif gap < 0.015:
                altogether[key] = ""
                stats["empty"] += 1
            else:
                altogether[key] = dense
            stats["alt_kind"][kind] += 1
            stats["concepts"][concept.index] += 1

            ow, oh = r.choice(((640, 480), (800, 600), (1024, 768), (500, 500), (1200, 800), (480, 640)))
            digest = hashlib.sha1(f"{cfg.seed}/{key}".encode()).hexdigest()[:16]
            meta = {
                "url": f"https://images.example.com/{digest[:2]}/{digest}.jpg",
                "key": key,
                "status": "success",
                "error_message": None,
                "width": cfg.image_size,
                "height": cfg.image_size,
                "original_width": ow,
                "original_height": oh,
                "caption": alt,
                "testbed": {
                    "concept": concept.name,
                    "category": concept.category,
                    "color": color,
                    "count": count,
                    "position": position,
                    "background": background,
                    "alt_kind": kind,
                    "pattern": concept.pattern,
                },
            }
            _tar_add(tar, f"{key}.jpg", jpg)
            _tar_add(tar, f"{key}.txt", alt.encode("utf-8"))
            _tar_add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
            bar.update(1)
    atomic_write_bytes(tar_path, buf.getvalue())
    write_sidecar(sidecar_path(tar_path, "altogether"), tar_path, "altogether", altogether)
    write_sidecar(sidecar_path(tar_path, "scratch"), tar_path, "scratch", scratch)
    return stats


def _eval_items(task: str, cfg: TestbedConfig, rng: np.random.Generator) -> list[tuple[Concept, str, int, int]]:
    """Balanced (concept, color, count, label) list for an eval task, in a deterministic shuffled order."""
    color_names = tuple(COLORS)
    items: list[tuple[Concept, str, int, int]] = []
    if task == "concept":
        for c in CONCEPTS:
            items += [(c, color_names[rng.integers(8)], 1, c.index) for _ in range(cfg.eval_per_class)]
    elif task == "category":
        for ci in range(len(CATEGORIES)):
            for _ in range(cfg.eval_per_class_small):
                items.append((CONCEPTS[ci * 8 + int(rng.integers(8))], color_names[rng.integers(8)], 1, ci))
    elif task == "color":
        for k, col in enumerate(color_names):
            items += [(CONCEPTS[int(rng.integers(64))], col, 1, k) for _ in range(cfg.eval_per_class_small)]
    elif task == "count":
        for k in range(4):
            for _ in range(2 * cfg.eval_per_class_small):
                items.append((CONCEPTS[int(rng.integers(64))], color_names[rng.integers(8)], k + 1, k))
    else:  # retrieval: balanced concepts, random attributes
        for i in range(cfg.num_retrieval):
            items.append((CONCEPTS[i % 64], color_names[rng.integers(8)], int(rng.integers(1, 5)), -1))
    order = rng.permutation(len(items))
    return [items[j] for j in order]


def _build_eval_task(
    task: str, cfg: TestbedConfig, textures: dict[str, np.ndarray], folder: Path, bar: tqdm
) -> dict[str, Any]:
    """Write one clip_benchmark local-wds folder; eval images use their own RNG stream (seed, 2, task)."""
    rng = np.random.default_rng([cfg.seed, 2, EVAL_TASKS.index(task)])
    r = random.Random(int(rng.integers(2**62)))
    items = _eval_items(task, cfg, rng)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (concept, color, count, label) in enumerate(items):
            key = f"{i:06d}"
            position = POSITIONS[int(rng.integers(5))] if count == 1 else None
            background = BACKGROUNDS[int(rng.integers(5))]
            _tar_add(
                tar, f"{key}.jpg", _render(rng, textures, cfg.image_size, concept, color, count, position, background)
            )
            if task == "retrieval":
                caps = [_dense_caption(r, concept, color, count, position, background, use_name=True)]
                if r.random() < 0.5:
                    caps.append(_dense_caption(r, concept, color, count, position, background, use_name=True))
                _tar_add(tar, f"{key}.txt", "\n".join(caps).encode("utf-8"))
            else:
                _tar_add(tar, f"{key}.cls", str(label).encode("ascii"))
            bar.update(1)
    atomic_write_bytes(folder / "test" / "0.tar", buf.getvalue())
    atomic_write_text(folder / "test" / "nshards.txt", "1\n")
    info: dict[str, Any] = {"num_samples": len(items)}
    if task == "retrieval":
        atomic_write_text(folder / "dataset_type.txt", "retrieval\n")
        info["type"] = "retrieval"
    else:
        classnames = {
            "concept": [c.name for c in CONCEPTS],
            "category": list(CATEGORIES),
            "color": list(COLORS),
            "count": list(COUNT_WORDS),
        }[task]
        atomic_write_text(folder / "classnames.txt", "\n".join(classnames) + "\n")
        atomic_write_text(folder / "zeroshot_classification_templates.txt", "\n".join(EVAL_TEMPLATES[task]) + "\n")
        info.update(type="classification", num_classes=len(classnames))
    return info


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

_OWN_ENTRIES = {"train", "eval", MANIFEST_NAME}
_OWN_TRAIN_FILE = re.compile(r"^(\d{5}\.tar|\d{5}\.(altogether|scratch)\.json|\..*\.tmp)$")


def _prepare_root(root: Path) -> None:
    """Make ``root`` ready for a fresh build, deleting only files this module writes.

    The manifest goes first, so an interrupted rebuild never looks complete. A folder holding
    anything else is refused rather than cleaned, in case ``--out`` points somewhere precious.
    """
    root.mkdir(parents=True, exist_ok=True)
    foreign = sorted(
        p.name for p in root.iterdir() if p.name not in _OWN_ENTRIES and not re.match(r"^\..*\.tmp$", p.name)
    )
    if foreign:
        raise FileExistsError(
            f"{root}: refusing to build a testbed into a folder with other content ({', '.join(foreign[:5])})"
        )
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for p in root.glob(".*.tmp"):
        p.unlink()
    train = root / "train"
    if train.is_dir():
        for p in train.iterdir():
            if p.is_file() and _OWN_TRAIN_FILE.match(p.name):
                p.unlink()
    if (root / "eval").is_dir():
        for task in EVAL_TASKS:
            shutil.rmtree(root / "eval" / task, ignore_errors=True)


def build_testbed(root: str | Path, config: TestbedConfig = TestbedConfig(), progress: bool = True) -> Testbed:
    """Build the testbed into ``root`` (always rebuilds); the manifest is written last, on success only."""
    config.validate()
    root = Path(root).expanduser().resolve()
    t0 = time.perf_counter()
    _prepare_root(root)
    textures = _make_textures(np.random.default_rng([config.seed, 0, 0]), config.image_size)
    probs = _train_concept_probs(config.seed)
    sizes = config.eval_sizes()
    totals = {"alt_kind": {"correct": 0, "wrong": 0, "none": 0}, "missing": 0, "empty": 0, "concepts": [0] * 64}
    eval_info: dict[str, Any] = {}
    with tqdm(
        total=config.num_train + sum(sizes.values()), desc="testbed", unit="img", disable=not progress, smoothing=0.1
    ) as bar:
        for shard in range(config.num_shards):
            st = _build_train_shard(shard, config, probs, textures, root / "train" / f"{shard:05d}.tar", bar)
            for k in totals["alt_kind"]:
                totals["alt_kind"][k] += st["alt_kind"][k]
            totals["missing"] += st["missing"]
            totals["empty"] += st["empty"]
            totals["concepts"] = [a + b for a, b in zip(totals["concepts"], st["concepts"], strict=True)]
        for task in EVAL_TASKS:
            folder = root / "eval" / task
            eval_info[task] = {"path": f"eval/{task}", **_build_eval_task(task, config, textures, folder, bar)}
    n_shards = config.num_shards
    pattern = f"train/{{00000..{n_shards - 1:05d}}}.tar" if n_shards > 1 else "train/00000.tar"
    manifest = {
        "notice": NOTICE,
        "generator_version": GENERATOR_VERSION,
        "fingerprint": config.fingerprint(),
        "config": asdict(config),
        "train": {
            "pattern": pattern,
            "num_shards": n_shards,
            "num_samples": config.num_train,
            "alt_kind_counts": totals["alt_kind"],
            "concept_counts": {c.name: totals["concepts"][c.index] for c in CONCEPTS},
            "sidecars": {
                "altogether": {
                    "captions": config.num_train - totals["missing"] - totals["empty"],
                    "missing": totals["missing"],
                    "empty": totals["empty"],
                },
                "scratch": {"captions": config.num_train, "missing": 0, "empty": 0},
            },
        },
        "synthetic_sources": list(SYNTHETIC_SOURCES),
        "eval": eval_info,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(root / MANIFEST_NAME, manifest)
    return Testbed.load(root)


def default_testbed_root(config: TestbedConfig = TestbedConfig()) -> Path:
    """``$CAPTION_MIXING_CACHE`` (or ``~/.cache/caption_mixing``) / ``testbed-{fingerprint}``."""
    cache = os.environ.get("CAPTION_MIXING_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "caption_mixing"
    return base / f"testbed-{config.fingerprint()}"


def _existing(root: Path, config: TestbedConfig) -> Testbed | None:
    """The testbed at ``root`` if its manifest is valid and matches ``config``; else None."""
    try:
        tb = Testbed.load(root)
        doc = tb.manifest()
    except (FileNotFoundError, ValueError):
        return None
    if doc.get("fingerprint") != config.fingerprint() or doc.get("generator_version") != GENERATOR_VERSION:
        return None
    return tb


def ensure_testbed(
    root: str | Path | None = None, config: TestbedConfig = TestbedConfig(), progress: bool = True
) -> Testbed:
    """Reuse the testbed at ``root`` if it was built with the same fingerprint, else (re)build it."""
    root = Path(root).expanduser().resolve() if root is not None else default_testbed_root(config).resolve()
    tb = _existing(root, config)
    if tb is not None:
        print(f"testbed: reusing {root} (fingerprint {config.fingerprint()})", flush=True)
        return tb
    print(f"testbed: building {root} (fingerprint {config.fingerprint()})", flush=True)
    return build_testbed(root, config, progress=progress)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for building the testbed from the command line."""
    d = TestbedConfig()
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: cache folder by fingerprint)")
    parser.add_argument("--num-train", type=int, default=d.num_train, help="number of training samples")
    parser.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per train shard")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=d.seed, help="generator seed")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching testbed exists")


def cli(args: argparse.Namespace) -> int:
    """Build (or reuse unless --force) and print a summary."""
    config = TestbedConfig(
        num_train=args.num_train, shard_size=args.shard_size, image_size=args.image_size, seed=args.seed
    )
    root = args.out if args.out is not None else default_testbed_root(config)
    if args.force:
        print(f"testbed: building {Path(root).resolve()} (--force)", flush=True)
        tb = build_testbed(root, config)
    else:
        tb = ensure_testbed(root, config)
    doc = tb.manifest()
    train = doc["train"]
    print(f"root:        {tb.root}")
    print(f"fingerprint: {doc['fingerprint']}  (built in {doc['build_seconds']} s)")
    print(f"train:       {tb.num_train} samples in {train['num_shards']} shards: {tb.train_shards}")
    print(f"alt-text:    {train['alt_kind_counts']}")
    for src, st in train["sidecars"].items():
        print(f"sidecar:     {src}: {st['captions']} captions, {st['missing']} missing, {st['empty']} empty")
    for task, info in doc["eval"].items():
        print(f"eval:        {task:<10} {info['num_samples']:>5} images  {tb.eval_tasks[task]}")
    print(f"notice:      {NOTICE}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cli_arguments(_parser)
    raise SystemExit(cli(_parser.parse_args()))
