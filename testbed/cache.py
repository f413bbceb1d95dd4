"""The built testbed on disk: its manifest handle, the build, and the fingerprint-keyed cache.

``testbed.json`` is the manifest, written last and atomically, so a killed build is redone rather
than half-used. A build is keyed by its config fingerprint: :func:`ensure_testbed` reuses a folder
whose manifest has the same fingerprint and rebuilds otherwise; :func:`load_testbed` is the one
rule the applications use to find their testbed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from caption_mixing.atomic import atomic_write_json
from testbed.render import make_textures
from testbed.world import (
    CONCEPTS,
    EVAL_TASKS,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    NOTICE,
    SYNTHETIC_SOURCES,
    TestbedConfig,
)
from testbed.write import empty_stats, prepare_root, train_concept_probs, write_eval_task, write_train_shard


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
            raise FileNotFoundError(f"{path}: no testbed manifest (build one with `python -m testbed --out {root}`)")
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


def _manifest(config: TestbedConfig, totals: dict[str, Any], eval_info: dict[str, Any], seconds: float) -> dict:
    """The ``testbed.json`` document: notice, fingerprint, config, train counts and eval folders."""
    n_shards = config.num_shards
    pattern = f"train/{{00000..{n_shards - 1:05d}}}.tar" if n_shards > 1 else "train/00000.tar"
    return {
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
        "build_seconds": round(seconds, 2),
    }


def build_testbed(root: str | Path, config: TestbedConfig = TestbedConfig(), progress: bool = True) -> Testbed:
    """Build the testbed into ``root`` (always rebuilds); the manifest is written last, on success only."""
    config.validate()
    root = Path(root).expanduser().resolve()
    t0 = time.perf_counter()
    prepare_root(root)
    textures = make_textures(np.random.default_rng([config.seed, 0, 0]), config.image_size)
    probs = train_concept_probs(config.seed)
    sizes = config.eval_sizes()
    totals = empty_stats()
    eval_info: dict[str, Any] = {}
    with tqdm(
        total=config.num_train + sum(sizes.values()), desc="testbed", unit="img", disable=not progress, smoothing=0.1
    ) as bar:
        for shard in range(config.num_shards):
            st = write_train_shard(shard, config, probs, textures, root / "train" / f"{shard:05d}.tar", bar)
            for k in totals["alt_kind"]:
                totals["alt_kind"][k] += st["alt_kind"][k]
            totals["missing"] += st["missing"]
            totals["empty"] += st["empty"]
            totals["concepts"] = [a + b for a, b in zip(totals["concepts"], st["concepts"], strict=True)]
        for task in EVAL_TASKS:
            folder = root / "eval" / task
            eval_info[task] = {"path": f"eval/{task}", **write_eval_task(task, config, textures, folder, bar)}
    atomic_write_json(root / MANIFEST_NAME, _manifest(config, totals, eval_info, time.perf_counter() - t0))
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


def load_testbed(testbed_dir: str | os.PathLike | None = None) -> Testbed:
    """The testbed an application runs on: a folder the user points at that holds a manifest is
    used as built (any size or config); otherwise the default testbed is built there or reused."""
    if testbed_dir and (Path(testbed_dir) / MANIFEST_NAME).exists():
        return Testbed.load(testbed_dir)
    return ensure_testbed(testbed_dir)
