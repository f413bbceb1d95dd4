"""DataComp aggregate groups (IN dist. shift, VTAB, Retrieval) over whichever members were evaluated.

A group average over fewer members than the group has is not DataComp's number; every group therefore
carries its coverage ("2/3") and the names of the members it lacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from eval.tasks import DATACOMP_GROUPS
from eval.zeroshot import main_metric_value


def group_averages(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group: unweighted mean of members' main metrics (fractions), coverage and missing members."""
    out: dict[str, dict[str, Any]] = {}
    for group, members in DATACOMP_GROUPS.items():
        values = {m: main_metric_value(results[m]) for m in members if m in results}
        present = [m for m, v in values.items() if v is not None]
        vals = [values[m] for m in present]
        out[group] = {
            "average": sum(vals) / len(vals) if vals else math.nan,  # type: ignore[arg-type]
            "num_members": len(present),
            "num_total": len(members),
            "coverage": f"{len(present)}/{len(members)}",
            "missing": [m for m in members if m not in present],
        }
    return out
