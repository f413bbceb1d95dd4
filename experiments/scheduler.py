"""Asking the scheduler: is Slurm here, would it accept this job, which jobs are still queued.

Subprocesses with argument lists only; every answer degrades to "not queued" when Slurm is gone
(a job slurmctld forgot has finished one way or another, and state.json says which).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

from experiments.resources import Resources, sbatch_args


def slurm_available() -> bool:
    """Whether the Slurm client commands are on PATH."""
    return all(shutil.which(cmd) for cmd in ("sbatch", "squeue", "srun", "scontrol"))


def validate_slurm(res: Resources, array_size: int = 1) -> None:
    """Ask Slurm (``sbatch --test-only``) whether this job shape can run; ValueError quotes sbatch."""
    if not slurm_available():
        raise ValueError(
            "--launcher slurm: sbatch/srun/squeue are not on PATH (no Slurm client here; "
            "for a local test cluster run scripts/slurm/start_cluster.sh)"
        )
    cmd = ["sbatch", "--test-only", *sbatch_args(res, array_size), "--wrap=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split())
        which = [f for f in ("partition", "account", "qos", "constraint") if getattr(res, f) and f in msg.lower()]
        flags = ", ".join(f"--{f} {getattr(res, f)}" for f in which) or "the resource flags"
        raise ValueError(f"sbatch rejects {flags}: {msg}")


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm state per job id (``123`` or ``123_4``) for jobs still in the queue; finished ones are absent."""
    ids = sorted({j.split("_")[0] for j in job_ids if j})
    if not ids or not shutil.which("squeue"):
        return {}
    proc = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(ids)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:  # e.g. "Invalid job id specified" once slurmctld forgot them
        return {}
    states = {}
    for line in proc.stdout.splitlines():
        jid, _, st = line.strip().partition("|")
        if jid:
            states[jid] = st
    return states


def job_alive(state: dict[str, Any]) -> bool:
    """Whether the job recorded in a state.json is still queued or running."""
    jid = str(state.get("job_id") or "")
    if not jid:
        return False
    if state.get("launcher") == "local":
        try:
            os.kill(int(jid), 0)
        except (OSError, ValueError):
            return False
        return True
    if state.get("launcher") == "slurm":
        return jid in squeue_states([jid])
    return False


def wait_slurm(job_ids: list[str], timeout_s: float | None = None, poll_s: float = 0.5) -> None:
    """Block until none of the jobs is queued or running (requeued ones come back as pending)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while squeue_states(job_ids).keys() & set(job_ids):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"--wait-timeout: jobs {', '.join(job_ids)} still queued after {timeout_s:.0f} s")
        time.sleep(poll_s)
