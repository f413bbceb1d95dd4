"""Coverage of a caption source and the synthetic share a p realizes with it.

A published caption set covers part of a user's shards (URL matches of 91-97% and dead links are
normal), and under the paper's rule a sample whose drawn synthetic caption is missing falls back
to its alt-text, so p = 0.15 realizes 0.15 x coverage. ``attach`` reports that share per source;
``p_mode: effective`` (``caption_mixing.mixconfig``) reads the coverage back from the attach
reports beside the sidecars (``read_coverage``) and raises the draw to p / coverage
(``caption_mixing.mixing.effective_mixture``) so the realized share is p where coverage allows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from caption_mixing import storage
from caption_mixing.shards import shard_location
from caption_mixing.sidecar import shard_name

REPORT_SUFFIX = ".attach.json"


class CoverageError(ValueError):
    """No attach report says how much of the shards a source covers."""


def realized_share(p: float, coverage: float) -> float:
    """The synthetic share p realizes under the paper's rule (missing captions fall back to alt-text)."""
    return p * coverage


def effective_draw(p: float, coverage: float) -> float | None:
    """The draw probability that realizes p (None when coverage is below p: it cannot)."""
    if p == 0:
        return 0.0
    if coverage <= 0 or p > coverage:
        return None
    return p / coverage


def share_table(counts: dict, ps: Iterable[float]) -> dict:
    """Per p: the share realized by the paper's rule and the draw ``p_mode: effective`` would use."""
    cov = counts["coverage"]
    return {f"{p:g}": {"paper": realized_share(p, cov), "effective_draw": effective_draw(p, cov)} for p in ps}


def _reports(folder: storage.Location) -> list[dict]:
    out = []
    for path in storage.glob(folder, f"*{REPORT_SUFFIX}"):
        try:
            doc = json.loads(storage.read_bytes(path).decode("utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("state") == "installed" and isinstance(doc.get("shards"), dict):
            doc["_path"] = str(path)
            out.append(doc)
    return out


def _folder(shard: str, sidecar_dir: str | os.PathLike | None) -> storage.Location:
    if sidecar_dir is not None:
        return storage.location(sidecar_dir)
    where = shard_location(shard)
    if where is None:
        raise CoverageError(f"shard {shard!r}: the pipe: command names no .tar file; set sidecar_dir")
    return storage.parent(where)


def read_coverage(
    shards: Iterable[str], sources: Iterable[str], sidecar_dir: str | os.PathLike | None = None
) -> dict[str, float]:
    """Share of the given shards' samples each source has a caption for, from the attach reports.

    Reports are the ``*.attach.json`` files ``attach`` writes beside the sidecars; only shards a
    report lists count (matched by file name), so the coverage is that of the shards trained on.
    """
    shards = list(shards)
    folders: dict[str, storage.Location] = {}
    for s in shards:
        folder = _folder(s, sidecar_dir)
        folders.setdefault(str(folder), folder)
    reports = [r for f in folders.values() for r in _reports(f)]
    out = {}
    for source in sources:
        samples = matched = 0
        wanted = {shard_name(s) for s in shards}
        for report in reports:
            for shard, entry in report["shards"].items():
                counts = entry.get("sources", {}).get(source)
                if counts is None or shard_name(shard) not in wanted:
                    continue
                wanted.discard(shard_name(shard))
                samples += entry.get("samples", 0)
                matched += counts.get("matched", 0)
        if samples == 0:
            where = ", ".join(map(str, folders.values()))
            raise CoverageError(
                f"p_mode=effective needs the coverage of caption source {source!r}, but no attach report in {where} "
                f"({source}{REPORT_SUFFIX} or another *{REPORT_SUFFIX}) lists these shards for it: run "
                "`python -m caption_mixing attach` for it, or set p_mode=paper"
            )
        out[source] = matched / samples
    return out
