"""What a resumed run restores besides the weights: its data position and its running counts.

``TrainState`` is the small object a trainer advances and saves; a checkpoint holds
``state.to_dict()`` beside the model and optimizer. Counts are flat keys ("used/alt",
"fallbacks/altogether", "data_errors/corrupt_image", "truncated_prompts", ...): each rank counts
its own samples since it started (``local``), the checkpoint stores the global total, and on
resume rank 0 carries that total on (``base``), so the sum over ranks is exact across restarts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from caption_mixing.mixing import MixStats
from caption_mixing.pipeline import iter_batches
from training.distributed import DistEnv, sum_counters

COUNT_GROUPS = ("used", "fallbacks", "data_errors")


@dataclass
class TrainState:
    """Optimizer steps done, the epoch, and micro-batches of that epoch consumed (on every rank)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    local: Counter = field(default_factory=Counter)  # this rank, this process
    base: Counter = field(default_factory=Counter)  # global totals restored from the checkpoint (rank 0 only)

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any], is_main: bool) -> TrainState:
        """The position of a checkpoint; its global counts go to rank 0's ``base``."""
        state = cls(saved["step"], saved["epoch"], saved["batch_in_epoch"])
        if is_main:
            state.base.update(flatten_counts(saved))
        return state

    def count_batch(self, batch: Mapping[str, Any]) -> None:
        """Add a batch's caption choices (``sources``/``wanted``) and data-error counts."""
        mix = MixStats()
        mix.update(batch["sources"], batch["wanted"])
        self.local.update({f"used/{k}": n for k, n in mix.used.items()})
        self.local.update({f"fallbacks/{k}": n for k, n in mix.fallbacks.items()})
        for kind, n in batch.get("data_errors", {}).items():
            self.local[f"data_errors/{kind}"] += n

    def epoch_batches(self, loader: Any, limit: int | None = None) -> Iterator[tuple[int, dict]]:
        """(1-based index, batch) of one epoch from this state's data position, at most ``limit`` of them.

        Batches a resumed run already trained on are skipped (``iter_batches``); each batch's caption
        choices and every data-error count, including those of the pipeline's errors-only items after a
        worker's last batch, are added to ``local``.
        """
        errors: Counter = Counter()
        for i, batch in iter_batches(loader, self.batch_in_epoch, errors):
            if limit is not None and i > limit:
                return
            self.count_batch({"sources": batch["sources"], "wanted": batch["wanted"], "data_errors": errors})
            errors.clear()
            yield i, batch
        self.count_batch({"sources": [], "wanted": [], "data_errors": errors})  # counts after the last batch

    def roll_over(self, micro_per_epoch: int | None) -> None:
        """A checkpoint taken at an epoch's last micro-batch resumes at the start of the next epoch."""
        if micro_per_epoch is not None and self.batch_in_epoch >= micro_per_epoch:
            self.next_epoch()

    def next_epoch(self) -> None:
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def totals(self, env: DistEnv) -> Counter:
        """Global counts (a collective: every rank must call it)."""
        total = sum_counters(env, self.local)
        total.update(self.base)
        return total

    def to_dict(self, totals: Counter) -> dict[str, Any]:
        """Checkpoint and metrics fields: position plus nested counts."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **nest_counts(totals)}


def nest_counts(flat: Mapping[str, int]) -> dict[str, Any]:
    """{"used/alt": 3, "data_errors/x": 1, "truncated_prompts": 2} -> {"mixing": {...}, "data_errors": {...}, ...}."""
    out: dict[str, Any] = {"mixing": {"used": {}, "fallbacks": {}}, "data_errors": {}}
    for key, n in sorted(flat.items()):
        group, sep, name = key.partition("/")
        if sep and group in ("used", "fallbacks"):
            out["mixing"][group][name] = n
        elif sep and group == "data_errors":
            out["data_errors"][name] = n
        else:
            out[key] = n
    return out


def flatten_counts(saved: Mapping[str, Any]) -> Counter:
    """Inverse of ``nest_counts`` for the count fields of a checkpoint (position keys are ignored)."""
    flat: Counter = Counter()
    mixing = saved.get("mixing", {})
    for group in ("used", "fallbacks"):
        flat.update({f"{group}/{k}": v for k, v in mixing.get(group, {}).items()})
    flat.update({f"data_errors/{k}": v for k, v in saved.get("data_errors", {}).items()})
    if "truncated_prompts" in saved:
        flat["truncated_prompts"] = saved["truncated_prompts"]
    return flat


def mix_stats(totals: Mapping[str, int]) -> MixStats:
    """The mixing part of the counts as ``MixStats`` (realized shares, fallbacks)."""
    nested = nest_counts(totals)["mixing"]
    return MixStats(Counter(nested["used"]), Counter(nested["fallbacks"]))
