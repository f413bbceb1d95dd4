"""GenEval prompts written from the testbed's world, in GenEval's own ``evaluation_metadata.jsonl`` schema.

Schema and prompt wording follow GenEval (Ghosh et al., 2023), github.com/djghosh13/geneval at commit
af4902f (``prompts/evaluation_metadata.jsonl``, ``prompts/create_prompts.py``,
``evaluation/evaluate_images.py``): one JSON object per line, ``{"tag", "include": [{"class", "count",
("color"), ("position")}], ("exclude": [{"class", "count"}]), "prompt"}``; an include clause asks for at
least ``count`` objects of ``class`` (of ``color`` when given), an exclude clause for fewer than
``count``. Counting records ask for 2-4 and exclude one more; single-object and colour records ask for one.

A testbed scene holds ONE species in ONE colour (1-4 objects, an absolute position for a single one), so
three GenEval categories are written and three cannot be: see ``NOT_APPLICABLE``. The testbed generator is
left as it is (changing it would change every number of the running study).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from testbed.world import CATEGORIES, CATEGORY_PLURALS, COLORS, COUNT_WORDS

# GenEval's six tags, in the order its metadata file lists them.
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SUPPORTED: tuple[str, ...] = ("single_object", "counting", "colors")
NOT_APPLICABLE: dict[str, str] = {
    "two_object": "needs two object classes in one image; every testbed scene shows objects of a single species",
    "position": "GenEval's position is relative to a second object ('a dog right of a teddy bear'); testbed "
    "scenes have one species, placed at an absolute position (left/right/top/bottom/center) when single",
    "color_attr": "needs two objects of different classes and colours in one image; every testbed scene has one "
    "species in one colour",
}
COUNTING_RANGE = (2, 3, 4)  # GenEval's counting prompts: 2..max_count=4, as the testbed's counts allow


def with_article(word: str) -> str:
    """'a bird', 'an orange bird': GenEval's ``with_article``."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _single_object(category: str) -> dict[str, Any]:
    return {
        "tag": "single_object",
        "include": [{"class": category, "count": 1}],
        "prompt": f"a photo of {with_article(category)}",
    }


def _counting(category: str, count: int) -> dict[str, Any]:
    return {
        "tag": "counting",
        "include": [{"class": category, "count": count}],
        "exclude": [{"class": category, "count": count + 1}],
        "prompt": f"a photo of {COUNT_WORDS[count - 1]} {CATEGORY_PLURALS[category]}",
    }


def colors_record(category: str, color: str) -> dict[str, Any]:
    return {
        "tag": "colors",
        "include": [{"class": category, "count": 1, "color": color}],
        "prompt": f"a photo of {with_article(color)} {category}",
    }


def all_records() -> dict[str, list[dict[str, Any]]]:
    """Every distinct record the testbed supports, per tag: 8 single-object, 24 counting, 64 colour."""
    return {
        "single_object": [_single_object(cat) for cat in CATEGORIES],
        "counting": [_counting(cat, n) for cat in CATEGORIES for n in COUNTING_RANGE],
        "colors": [colors_record(cat, col) for cat in CATEGORIES for col in COLORS],
    }


def geneval_metadata(seed: int = 0, per_tag: int | None = None) -> list[dict[str, Any]]:
    """GenEval records for the testbed, supported tags in GenEval's order, each tag's records in a seeded order.

    ``per_tag=None`` keeps every distinct record (96); ``per_tag=k`` the first ``k`` of each tag (all of a tag
    that has fewer). The prompts are templates, not training captions; the scenes the judge's ceiling
    is measured on are held-out renderings (``testbed.judge_data``).
    """
    if per_tag is not None and per_tag < 1:
        raise ValueError(f"per_tag={per_tag}: must be >= 1 or None (all records)")
    records: list[dict[str, Any]] = []
    for k, (_, recs) in enumerate(all_records().items()):
        order = np.random.default_rng([seed, 17, k]).permutation(len(recs))
        records += [recs[i] for i in order[: per_tag or len(recs)]]
    return records


def record_scene_spec(record: dict[str, Any]) -> dict[str, Any]:
    """The testbed scene a record literally describes: {category, count, (color)} for ``render_scenes(spec=)``.

    Raises ValueError for a record no testbed scene can show (two classes, a position, an unknown class or colour).
    """
    tag = record.get("tag")
    if tag in NOT_APPLICABLE:
        raise ValueError(f"tag {tag!r} is not applicable to the testbed: {NOT_APPLICABLE[tag]}")
    include = record.get("include") or []
    if len(include) != 1:
        raise ValueError(f"record {record.get('prompt')!r}: a testbed scene shows one class, record has {len(include)}")
    req = include[0]
    if req.get("class") not in CATEGORIES:
        raise ValueError(f"record {record.get('prompt')!r}: class {req.get('class')!r} is not a testbed category")
    if "position" in req:
        raise ValueError(f"record {record.get('prompt')!r}: relative positions need two objects (n/a on the testbed)")
    spec: dict[str, Any] = {"category": req["class"], "count": int(req.get("count", 1))}
    if spec["count"] not in (1, *COUNTING_RANGE):
        raise ValueError(f"record {record.get('prompt')!r}: count {spec['count']} is outside the testbed's 1-4")
    if "color" in req:
        if req["color"] not in COLORS:
            raise ValueError(f"record {record.get('prompt')!r}: colour {req['color']!r} is not a testbed colour")
        spec["color"] = req["color"]
    return spec
