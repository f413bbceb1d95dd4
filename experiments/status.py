"""Where a sweep stands (``sweep_ratio.py status``) and its report once every point has finished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.scheduler import job_alive, squeue_states
from experiments.state import ACTIVE, locked, read_manifest, read_state
from experiments.tasks import get_task

GONE = "job is gone from the queue without finishing; re-run the sweep to resubmit"


def finished_runs(out: Path, points: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Each point's metrics.json with its p, seed and label, or None while any point has not finished.

    The label is the p and the mixing mode (``caption_mixing.mixconfig.run_label``), never the seed: the runs
    of one label with different seeds are repeats the report aggregates.
    """
    runs = []
    for point in points:
        run_dir = Path(out) / point["run_dir"]
        metrics_file = run_dir / "metrics.json"
        if read_state(run_dir).get("state") != "finished" or not metrics_file.exists():
            return None
        metrics = json.loads(metrics_file.read_text())
        seed = point.get("seed", metrics.get("seed", 0))  # sweep.json before the seed axis: the run's own seed
        label = metrics.get("label") or f"p={point['p']:g}"  # p and mode ("p=0.15 gate", "both w=0.5"), not seed
        runs.append({**metrics, "p": point["p"], "seed": seed, "label": label})
    return runs


def maybe_write_report(out: Path) -> dict[str, Path] | None:
    """Write the sweep report once every point of sweep.json has finished; None otherwise."""
    out = Path(out)
    try:
        manifest = read_manifest(out)
    except FileNotFoundError:
        return None
    if len(manifest["points"]) < 2:  # one (p, seed) point has no sweep to report; one p with 3 seeds has
        return None
    runs = finished_runs(out, manifest["points"])
    if runs is None:
        return None
    task = get_task(manifest["task"])
    notice = task.notice if any("notice" in r for r in runs) else None
    with locked(out / ".report.lock"):
        return task.report(runs, out, f"Caption-mixing sweep ({manifest['task']}, {manifest['preset']})", notice)


def _note(st: dict[str, Any], queued: dict[str, str]) -> str:
    """The status table's note: the error, the Slurm queue state, or that an active job vanished."""
    note = st.get("error") or ""
    jid = str(st.get("job_id") or "")
    if st.get("state", "pending") in ACTIVE:
        alive = (jid in queued) if st.get("launcher") == "slurm" else job_alive(st)
        if st.get("launcher") == "slurm" and alive:
            note = queued[jid].lower()
        elif not alive and st.get("launcher") in ("slurm", "local"):
            note = GONE
    return note


def status_rows(out: Path) -> list[dict[str, Any]]:
    """One row per point of the sweep: p, seed, run folder, state, job id, requeues, progress, note."""
    out = Path(out)
    manifest = read_manifest(out)
    states = [read_state(out / pt["run_dir"]) for pt in manifest["points"]]
    queued = squeue_states([str(s.get("job_id") or "") for s in states if s.get("launcher") == "slurm"])
    rows = []
    for point, st in zip(manifest["points"], states, strict=True):
        ckpts = sorted((out / point["run_dir"] / "checkpoints").glob("step_*.pt"))
        rows.append(
            {
                "p": point["p"],
                "seed": point.get("seed", st.get("seed", "-")),
                "run_dir": point["run_dir"],
                "state": st.get("state", "pending"),
                "job_id": str(st.get("job_id") or "") or "-",
                "requeues": st.get("requeues", 0),
                "last_checkpoint": ckpts[-1].stem if ckpts else "-",
                "updated": st.get("updated_at", "-"),
                "note": _note(st, queued),
            }
        )
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of status_rows."""
    cols = ["p", "seed", "run_dir", "state", "job_id", "requeues", "last_checkpoint", "updated", "note"]
    cells = [[f"{r['p']:g}" if c == "p" else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)
