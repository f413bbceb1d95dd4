"""WinoGAViL, scored the way DataComp scores it (its ``eval_utils/wino_eval.py``), from a local wds folder.

Each instance is a cue word, 5 to 12 candidate images and the subset of candidates humans associate with
the cue. The model encodes the prompt "A <cue>" / "An <cue>" (cue lower-cased; "An" before a vowel),
ranks the candidates by cosine similarity, predicts the top k with k = the number of true associations,
and scores the instance by the Jaccard index of predicted and true sets. DataComp reports the mean over
all instances and per candidate count; its main metric (and this task's) is the mean over instances with
10 or 12 candidates, ``jaccard_score_10-12``. DataComp evaluates under autocast; here the precision is the
suite's (fp32 unless ``--amp``).

The folder is written by ``python -m eval prepare winogavil`` (``eval.prepare``)::

    ROOT/dataset_type.txt                  "association"
    ROOT/test/nshards.txt, ROOT/test/0.tar ({key}.json: cue, candidates, associations; {key}.cNN.jpg)
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from eval.locate import DataSource
from eval.tasks import JACCARD_10_12, Task
from eval.wds_folder import TYPE_FILE, shard_paths
from eval.zeroshot import autocast_device

ASSOCIATION = "association"
GROUPS = {"5": (5,), "6": (6,), "10": (10,), "12": (12,), "5-6": (5, 6), "10-12": (10, 12)}


@dataclass(frozen=True)
class Instance:
    key: str
    cue: str
    candidates: tuple[str, ...]
    associations: tuple[str, ...]
    images: tuple[bytes, ...]  # one per candidate, in candidate order

    @property
    def truth(self) -> np.ndarray:
        """Which candidates are associations (DataComp: ``np.isin(candidates, associations)``)."""
        return np.isin(np.array(self.candidates), np.array(self.associations))


def is_association_dataset(root: str | Path) -> bool:
    type_file = Path(root) / TYPE_FILE
    return type_file.is_file() and type_file.read_text().strip().lower() == ASSOCIATION


def cue_prompt(cue: str) -> str:
    """DataComp's text for a cue: lower case, "An" before a vowel, else "A"."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in "aeiou" else f"A {cue}"


def jaccard(truth: np.ndarray, pred: np.ndarray) -> float:
    """|truth and pred| / |truth or pred| of two boolean masks (0 when both are empty)."""
    union = np.logical_or(truth, pred).sum()
    return float(np.logical_and(truth, pred).sum() / union) if union else 0.0


def instance_score(similarity: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard of the top-k candidates by ``similarity`` (k = number of true associations) and the truth."""
    k = int(truth.sum())
    if k < 1:
        raise ValueError("a WinoGAViL instance needs at least one association")
    pred = np.isin(np.arange(len(similarity)), np.argsort(similarity)[-k:])
    return jaccard(truth, pred)


def association_metrics(scores: list[float], n_candidates: list[int]) -> dict[str, Any]:
    """DataComp's WinoGAViL metrics: mean Jaccard overall and per candidate-count group (None when empty)."""
    s, n = np.asarray(scores, dtype=float), np.asarray(n_candidates)
    out: dict[str, Any] = {"avg_jaccard_score": float(s.mean()) if len(s) else None}
    for name, sizes in GROUPS.items():
        mask = np.isin(n, sizes)
        out[f"jaccard_score_{name}"] = float(s[mask].mean()) if mask.any() else None
        if not mask.any():
            out[f"jaccard_score_{name}_note"] = f"no instance with {' or '.join(map(str, sizes))} candidates"
    return out


def read_instances(shards: list[Path]) -> Iterator[Instance]:
    """Instances from the shards, in order; a member that does not fit the layout is named."""
    for shard in shards:
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.isfile() and (data := tar.extractfile(member)) is not None:
                        key, _, rest = member.name.partition(".")
                        groups.setdefault(key, {})[rest] = data.read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{shard}: not a readable tar shard ({type(e).__name__}: {e})") from e
        for key, members in groups.items():
            yield _instance(shard, key, members)


def _instance(shard: Path, key: str, members: dict[str, bytes]) -> Instance:
    if "json" not in members:
        raise ValueError(f"{shard}: sample {key!r} has no {key}.json (cue, candidates, associations)")
    try:
        meta = json.loads(members["json"])
        cue, candidates, associations = str(meta["cue"]), list(meta["candidates"]), list(meta["associations"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{shard}: {key}.json must hold cue, candidates and associations ({e})") from e
    images = []
    for j in range(len(candidates)):
        found = [v for k, v in members.items() if k.startswith(f"c{j:02d}.")]
        if not found:
            raise ValueError(f"{shard}: sample {key!r} lacks the image of candidate {j} ({key}.c{j:02d}.jpg)")
        images.append(found[0])
    if not set(associations) <= set(candidates) or not associations:
        raise ValueError(f"{shard}: sample {key!r}: associations {associations} must be a non-empty subset of "
                         f"its candidates {candidates}")  # fmt: skip
    return Instance(key, cue, tuple(candidates), tuple(associations), tuple(images))


def _score_batch(
    batch: list[Instance], model: torch.nn.Module, tokenizer: Any, preprocess: Any, device: str, amp: bool
) -> list[float]:
    """Encode the candidates and cues of several instances at once; one Jaccard per instance."""
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for inst in batch for b in inst.images])
    tokens = tokenizer([cue_prompt(inst.cue) for inst in batch])
    with torch.no_grad(), torch.autocast(device, enabled=amp):
        img = F.normalize(model.encode_image(pixels.to(device)).float(), dim=-1).cpu()
        txt = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1).cpu()
    scores, start = [], 0
    for i, inst in enumerate(batch):
        n = len(inst.images)
        sims = (txt[i : i + 1] @ img[start : start + n].t()).squeeze(0).numpy()
        scores.append(instance_score(sims, inst.truth))
        start += n
    return scores


def evaluate_association(
    task: Task,
    src: DataSource,
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: Any,
    *,
    device: str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """WinoGAViL metrics for ``src`` (``num_workers`` unused: shards are read in this process)."""
    if src.kind != "wds" or not is_association_dataset(src.path):
        raise ValueError(f"{task.name}: {src.path / TYPE_FILE} must say 'association' (`python -m eval prepare "
                         f"winogavil` writes it)")  # fmt: skip
    dev = autocast_device(device)
    scores: list[float] = []
    sizes: list[int] = []
    batch: list[Instance] = []
    with tqdm(desc=task.name, unit="inst", dynamic_ncols=True, leave=False, disable=not progress) as bar:
        for inst in read_instances(shard_paths(src.path, src.split)):
            batch.append(inst)
            sizes.append(len(inst.images))
            if sum(len(b.images) for b in batch) >= batch_size:
                scores += _score_batch(batch, model, tokenizer, preprocess, dev, amp)
                bar.update(len(batch))
                batch = []
        if batch:
            scores += _score_batch(batch, model, tokenizer, preprocess, dev, amp)
            bar.update(len(batch))
    if not scores:
        raise ValueError(f"{task.name}: no instances in {src.path / src.split}")
    metrics = association_metrics(scores, sizes)
    if metrics[JACCARD_10_12] is None and task.metric == JACCARD_10_12:
        raise ValueError(f"{task.name}: no instance with 10 or 12 candidates in {src.path}; the main metric needs some")
    return {"task_type": ASSOCIATION, **metrics, "num_samples": len(scores), "main_metric": task.metric}
