"""testbed: a small, deterministic, web-like image-text corpus built on the fly.

THIS IS A SYNTHETIC TESTBED. It exists so that the whole suite (caption mixing, CLIP training,
text-to-image training, zero-shot evaluation) can be exercised end to end on a laptop without
downloading anything. Numbers measured on it are never paper results and must not be reported as such.

It is written in exactly the layout real data uses, so the same code paths run on it:

* ``train/00000.tar ...`` -- img2dataset-style WebDataset shards with the alt-text as ``.txt``;
* ``train/00000.altogether.json``, ``train/00000.scratch.json`` -- one caption sidecar per shard and
  synthetic source (see :mod:`caption_mixing.sidecar`), with the gaps real re-captioning runs have;
* ``eval/{task}/`` -- clip_benchmark local-WebDataset folders (``wds/{task}``): the 64-way ``concept``
  task, one 8-way fine-grained ``concept_<category>`` task per category, ``category``, ``color``,
  ``count`` and ``retrieval`` (EVAL_TASKS), so concept recognition is most of the average, as in the paper;
* ``testbed.json`` -- the manifest, written last and atomically, so a killed build is redone.

The world is built so the phenomenon the project studies exists: images show 1-4 objects of one of
64 fine "species" (8 generic categories drawn as distinct shapes, species told apart by a marking
pattern), with a colour, a position and a background. Alt-text carries long-tail concept knowledge,
synthetic captions carry attributes, and mixing ratio p trades one for the other.

Modules, one job each: :mod:`testbed.world` (concepts, constants, config), :mod:`testbed.render`
(images), :mod:`testbed.captions` (caption text), :mod:`testbed.write` (shards and eval folders),
:mod:`testbed.cache` (manifest, build, reuse), :mod:`testbed.cli` (``python -m testbed``) and
:mod:`testbed.models` (the tiny open_clip model config, registered on import; it pulls in torch,
so it is not imported here).
"""

from testbed.cache import Testbed, build_testbed, default_testbed_root, ensure_testbed, load_testbed
from testbed.world import (
    CATEGORIES,
    CATEGORY_PLURALS,
    COLORS,
    CONCEPTS,
    EVAL_TASKS,
    FINE_TASKS,
    GENERATOR_VERSION,
    NOTICE,
    SYNTHETIC_SOURCES,
    Concept,
    TestbedConfig,
)

__all__ = [
    "CATEGORIES",
    "CATEGORY_PLURALS",
    "COLORS",
    "CONCEPTS",
    "EVAL_TASKS",
    "FINE_TASKS",
    "GENERATOR_VERSION",
    "NOTICE",
    "SYNTHETIC_SOURCES",
    "Concept",
    "Testbed",
    "TestbedConfig",
    "build_testbed",
    "default_testbed_root",
    "ensure_testbed",
    "load_testbed",
]
