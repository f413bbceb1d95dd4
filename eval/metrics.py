"""Classification metrics as MetaCLIP's clipeval reports them, computed from logits and labels.

All values are fractions in [0, 1]. Top-k follows clip_benchmark's rule but stays in torch, since
clip_benchmark 1.6.2's ``accuracy`` crashes on numpy >= 2.4 (upstream issue #147); ``eval.cb_launcher``
patches this same :func:`topk_accuracy` into clip_benchmark's CLI. A value that cannot be computed is None
with a ``<key>_note`` saying why, never NaN, so results go to JSON unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from eval.tasks import ACC1, MEAN_PER_CLASS, ROC_AUC, TOP1_TOP5_MEAN


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Share of samples whose label is among the k largest logits (k clamped to the class count).

    Same signature and result as clip_benchmark's ``metrics.zeroshot_classification.accuracy``.
    """
    k_max = min(max(topk), logits.shape[1])
    pred = logits.topk(k_max, dim=1, largest=True, sorted=True).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, : min(k, k_max)].any(dim=1).float().mean().item() for k in topk]


def hateful_roc_auc(logits: torch.Tensor, target: torch.Tensor) -> float:
    """ROC AUC of logit[hateful] - logit[not hateful]; class 1 is "hatespeech meme"."""
    if logits.shape[1] != 2:
        raise ValueError(f"ROC AUC needs exactly 2 classes (not hateful, hateful), got {logits.shape[1]}")
    if target.unique().numel() < 2:
        raise ValueError("ROC AUC needs both hateful and non-hateful samples in the split")
    return float(roc_auc_score(target.numpy(), (logits[:, 1] - logits[:, 0]).float().numpy()))


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, main_metric: str = ACC1) -> dict[str, Any]:
    """acc1, acc5 (None below 5 classes, where clip_benchmark reports NaN), mean per-class recall, main metric."""
    num_classes = logits.shape[1]
    acc1, acc5 = topk_accuracy(logits, target, (1, 5))
    out: dict[str, Any] = {
        "acc1": acc1,
        "acc5": acc5 if num_classes >= 5 else None,
        "mean_per_class_recall": float(balanced_accuracy_score(target.numpy(), logits.argmax(dim=1).numpy())),
    }
    if num_classes < 5:
        out["acc5_note"] = f"top-5 of {num_classes} classes is trivially 1; not reported"
    if main_metric == TOP1_TOP5_MEAN:
        if num_classes < 5:
            raise ValueError(f"(top-1 + top-5) / 2 needs at least 5 classes, got {num_classes}")
        out[TOP1_TOP5_MEAN] = (acc1 + acc5) / 2
    elif main_metric == ROC_AUC:
        out[ROC_AUC] = hateful_roc_auc(logits, target)
    elif main_metric not in (ACC1, MEAN_PER_CLASS):
        raise ValueError(f"unknown classification metric {main_metric!r}")
    out["main_metric"] = main_metric
    return out
