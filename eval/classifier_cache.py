"""Zero-shot classifier (class-embedding matrix) cache.

Encoding every class x template through the text tower is the costly, repeated part of zero-shot
evaluation (ImageNet: 1000 x 80 prompts). The matrix depends only on the model weights, the class
names (several per class with MetaCLIP's prompts), the templates and the prompt source they came from
(``metaclip`` or ``clip_benchmark``), so it is keyed by exactly those and reused across runs and tasks
(ImageNet, ImageNet-V2 and ImageNet-Sketch share one).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch

from caption_mixing.atomic import atomic_write_bytes


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content hash of a checkpoint, so a retrained file at the same path never reuses stale classifiers."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def classifier_key(
    model_id: str, classnames: list[str] | list[list[str]], templates: list[str], prompt_source: str = ""
) -> str:
    """Stable key over everything the classifier depends on (not the task name: same prompts, same matrix).

    A class with one name is keyed by the name itself, with several by the list of its names.
    """
    names = [c[0] if isinstance(c, list | tuple) and len(c) == 1 else c for c in classnames]
    doc = json.dumps({"model": model_id, "prompts": prompt_source, "classnames": names, "templates": templates})
    return hashlib.sha256(doc.encode()).hexdigest()


class ClassifierCache:
    """In-memory + optional on-disk cache of classifiers (``{cache_dir}/{task}-{key}.pt``, any task's file reused)."""

    def __init__(self, model_id: str, cache_dir: str | Path | None = None) -> None:
        self.model_id = model_id
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._mem: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def get(
        self,
        task: str,
        classnames: list[str] | list[list[str]],
        templates: list[str],
        compute: Callable[[], torch.Tensor],
        prompt_source: str = "",
    ) -> torch.Tensor:
        """The cached classifier, or ``compute()`` stored under the key when absent."""
        key = classifier_key(self.model_id, classnames, templates, prompt_source)
        if key in self._mem:
            self.hits += 1
            return self._mem[key]
        path = self.cache_dir / f"{task.replace('/', '-')}-{key[:24]}.pt" if self.cache_dir else None
        if path is not None and not path.is_file():
            path = next(self.cache_dir.glob(f"*-{key[:24]}.pt"), path)  # written under another task's name
        if path is not None and path.is_file():
            clf = torch.load(path, map_location="cpu", weights_only=True)
            if clf.shape[1] != len(classnames):
                raise ValueError(f"classifier cache {path} has {clf.shape[1]} classes, expected {len(classnames)}")
            self.hits += 1
        else:
            clf = compute().float().cpu()
            self.misses += 1
            if path is not None:
                buf = io.BytesIO()
                torch.save(clf, buf)
                atomic_write_bytes(path, buf.getvalue())
        self._mem[key] = clf
        return clf
