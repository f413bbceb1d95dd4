"""Seeds as repeated measurements: mean ± std per p, and the one rule for calling two p values different.

A sweep run with ``--seeds 0,1,2`` trains every p once per seed. What a reader may conclude depends on
how far runs that differ only in their seed spread, so both applications' reports (``eval.seed_report``
for CLIP, ``t2i.report`` for text-to-image) aggregate here and mark a difference between two p values
only when it clears that spread (:data:`RULE`). Values stay in the units they come in (fractions for
CLIP metrics, CLIP-score points for t2i); formatting scales them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MISSING = "—"
MARK = "*"
RULE = (
    f"A difference between two p values is marked {MARK} only when it exceeds the seed spread: "
    "|mean(a) − mean(b)| > std(a) + std(b), std being the sample standard deviation over seeds (n − 1); "
    "with fewer than 2 seeds on either side no difference is marked."
)


@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one quantity: mean, sample std (None below 2 values), count, the values."""

    mean: float | None
    std: float | None
    n: int
    values: tuple[float, ...] = ()


def spread(values: Iterable[float | None]) -> Spread:
    """Mean and sample standard deviation (n − 1) of the finite values; None and NaN are left out."""
    kept = tuple(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if not kept:
        return Spread(None, None, 0)
    std = statistics.stdev(kept) if len(kept) > 1 else None
    return Spread(statistics.fmean(kept), std, len(kept), kept)


def differs(a: Spread, b: Spread) -> bool | None:
    """Whether a and b differ by more than their seed spread (:data:`RULE`); None when it cannot be told."""
    if a.mean is None or b.mean is None or a.std is None or b.std is None:
        return None
    return abs(a.mean - b.mean) > a.std + b.std


def format_spread(s: Spread, scale: float = 100.0, digits: int = 1) -> str:
    """``"52.3 ± 1.2"``; a single value without ±; ``"—"`` when nothing was measured."""
    if s.mean is None:
        return MISSING
    text = f"{scale * s.mean:.{digits}f}"
    return text if s.std is None else f"{text} ± {scale * s.std:.{digits}f}"


def format_delta(a: Spread, base: Spread, scale: float = 100.0, digits: int = 1) -> str:
    """``a − base`` with a sign, followed by :data:`MARK` when it exceeds the seed spread."""
    if a.mean is None or base.mean is None:
        return MISSING
    text = f"{scale * (a.mean - base.mean):+.{digits}f}"
    return f"{text} {MARK}" if differs(a, base) else text


def by_p(runs: Sequence[Mapping[str, Any]]) -> dict[float, list[Mapping[str, Any]]]:
    """Runs grouped by p (ascending), each group ordered by seed."""
    groups: dict[float, list[Mapping[str, Any]]] = {}
    for run in sorted(runs, key=lambda r: (float(r["p"]), int(r.get("seed") or 0))):
        groups.setdefault(float(run["p"]), []).append(run)
    return groups


def has_repeats(runs: Sequence[Mapping[str, Any]]) -> bool:
    """True when some p was run more than once (several seeds): the report then aggregates."""
    return any(len(group) > 1 for group in by_p(runs).values())


def check_seeds(runs: Sequence[Mapping[str, Any]]) -> None:
    """Two runs of one p must differ in their seed, or they are not repeats; ValueError names p and seed."""
    for p, group in by_p(runs).items():
        seeds = [int(r.get("seed") or 0) for r in group]
        dupes = sorted({s for s in seeds if seeds.count(s) > 1})
        if dupes:
            raise ValueError(
                f"p={p:g} has {seeds.count(dupes[0])} runs with seed {dupes[0]}: runs of one p in a report must "
                "differ in their seed (sweep with --seeds, or report the folders separately)"
            )


def aggregate(
    runs: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None]
) -> dict[float, Spread]:
    """``value`` of every run, aggregated per p: {p: Spread}."""
    return {p: spread(value(r) for r in group) for p, group in by_p(runs).items()}


def seeds_of(runs: Sequence[Mapping[str, Any]]) -> dict[float, list[int]]:
    """{p: the seeds it was run with}."""
    return {p: [int(r.get("seed") or 0) for r in group] for p, group in by_p(runs).items()}
