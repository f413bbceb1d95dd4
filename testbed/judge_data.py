"""Labelled testbed scenes for the GenEval-style judge: fresh renderings and the labels stored in train shards.

The judge (``eval.judge``) learns category, colour and count from scenes drawn by the testbed's own
renderer, so its labels are the ground truth and nothing is downloaded. Its random streams are
``[seed, JUDGE_STREAM, split, stream]``: the testbed's own streams use 0 (textures), 1 (train shards)
and 2 (eval tasks) as second word, so no judge scene is a testbed image. Splits:

* ``train`` -- the judge's training scenes, on background textures of their own (seeded per split);
* ``holdout`` -- "real testbed renderings": the testbed's own background textures (the default
  build's), a stream the judge never trains on; the judge's card accuracy and the GenEval ceiling
  are measured on these.

:func:`read_shard_scenes` reads real testbed images with their stored labels (``{key}.json`` ->
``"testbed"``) from built train shards, e.g. the last shard that the embedded text-to-image run holds out.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from caption_mixing.shards import expand_shards
from testbed.render import make_textures, render
from testbed.world import BACKGROUNDS, CATEGORIES, COLORS, CONCEPTS, POSITIONS, TestbedConfig

JUDGE_STREAM = 1017
SPLITS = ("train", "holdout")
COUNTS = (1, 2, 3, 4)
SCENE_FIELDS = ("category", "color", "count")  # what a spec may fix (the judge's heads)


@dataclass(frozen=True)
class Scene:
    """One labelled testbed image (RGB, at the testbed's size) and its ground truth."""

    image: Image.Image
    category: str
    concept: str
    color: str
    count: int
    position: str | None
    background: str

    def labels(self) -> dict[str, Any]:
        """The ground truth as a plain dict (no image)."""
        return {
            "category": self.category,
            "concept": self.concept,
            "color": self.color,
            "count": self.count,
            "position": self.position,
            "background": self.background,
        }


def _textures(split: str, seed: int, size: int) -> dict[str, np.ndarray]:
    """Background textures: the default testbed's for ``holdout`` (real renderings), the judge's own for ``train``."""
    if split == "holdout":
        return make_textures(np.random.default_rng([TestbedConfig().seed, 0, 0]), size)
    return make_textures(np.random.default_rng([seed, JUDGE_STREAM, SPLITS.index(split), 0, 0]), size)


def check_spec(spec: Mapping[str, Any] | None, where: str = "spec") -> dict[str, Any]:
    """A scene constraint {category?, color?, count?} with known values; the error names the bad field."""
    spec = dict(spec or {})
    allowed = {"category": CATEGORIES, "color": tuple(COLORS), "count": COUNTS}
    for field, value in spec.items():
        if field not in allowed:
            raise ValueError(f"{where}: unknown field {field!r} (allowed: {', '.join(SCENE_FIELDS)})")
        if value not in allowed[field]:
            raise ValueError(f"{where}: {field}={value!r} is not a testbed {field} ({allowed[field]})")
    return spec


def render_scenes(
    n: int,
    seed: int,
    split: str = "train",
    spec: Mapping[str, Any] | None = None,
    stream: int = 0,
    size: int | None = None,
) -> list[Scene]:
    """``n`` scenes with uniform category, colour, count 1-4, position (count 1) and background.

    ``spec`` fixes some of category/color/count (scenes matching a GenEval record); ``stream`` selects an
    independent sub-stream (one per record). Deterministic in (seed, split, spec, stream, size).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    spec = check_spec(spec)
    size = size or TestbedConfig().image_size
    textures = _textures(split, seed, size)
    rng = np.random.default_rng([seed, JUDGE_STREAM, SPLITS.index(split), 1, stream])
    by_category = {cat: [c for c in CONCEPTS if c.category == cat] for cat in CATEGORIES}
    color_names = tuple(COLORS)
    scenes = []
    for _ in range(n):
        category = spec.get("category", CATEGORIES[int(rng.integers(len(CATEGORIES)))])
        concept = by_category[category][int(rng.integers(8))]
        color = spec.get("color", color_names[int(rng.integers(len(color_names)))])
        count = int(spec.get("count", COUNTS[int(rng.integers(len(COUNTS)))]))
        position = POSITIONS[int(rng.integers(len(POSITIONS)))] if count == 1 else None
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        jpg = render(rng, textures, size, concept, color, count, position, background)
        with Image.open(io.BytesIO(jpg)) as img:
            image = img.convert("RGB")
        scenes.append(Scene(image, category, concept.name, color, count, position, background))
    return scenes


def _scene_from_members(members: dict[str, bytes], where: str) -> Scene:
    """A Scene from one sample's ``jpg`` and ``json`` members; errors name the shard and key."""
    if "jpg" not in members or "json" not in members:
        raise ValueError(f"{where}: needs .jpg and .json members, has {sorted(members)}")
    try:
        truth = json.loads(members["json"])["testbed"]
        fields = {k: truth[k] for k in ("category", "concept", "color", "count", "position", "background")}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: .json has no testbed ground truth ({type(e).__name__}: {e})") from e
    with Image.open(io.BytesIO(members["jpg"])) as img:
        image = img.convert("RGB")
    return Scene(image=image, **{**fields, "count": int(fields["count"])})


def _tar_samples(path: Path) -> Iterable[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar, in member order."""
    current, members = None, {}
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext] = tar.extractfile(info).read()
    if current is not None:
        yield current, members


def read_shard_scenes(shards: str | list[str], limit: int | None = None) -> list[Scene]:
    """Real testbed images with their stored labels, from built train shards (brace pattern or list)."""
    urls = expand_shards(shards) if isinstance(shards, str) else list(shards)
    scenes: list[Scene] = []
    for url in urls:
        path = Path(url)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: testbed shard not found")
        for key, members in _tar_samples(path):
            scenes.append(_scene_from_members(members, f"{path} sample {key}"))
            if limit is not None and len(scenes) >= limit:
                return scenes
    return scenes
