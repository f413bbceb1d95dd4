"""Planning and launching a sweep's points: in-process, as submitit local jobs or as a Slurm job array.

``plan_point`` decides per point (run / skip / conflict) from its run folder. Jobs started by a
launcher import the code snapshot the sweep took (``CodeSnapshot.job_setup`` runs before their
Python starts), so a requeue days later runs the submitted code, not whatever the checkout holds then.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import submitit

from experiments.job import PointJob, PointSpec
from experiments.resources import Resources, executor_params, sbatch_args
from experiments.scheduler import job_alive
from experiments.snapshot import CodeSnapshot
from experiments.state import ACTIVE, now_iso, read_state, update_state


def plan_point(spec: PointSpec) -> tuple[str, str]:
    """(action, reason): action is 'run', 'skip' or 'conflict'."""
    run_dir = Path(spec.run_dir)
    st = read_state(run_dir)
    cfg_file = run_dir / "config.json"
    saved_hash = json.loads(cfg_file.read_text()).get("config_hash") if cfg_file.exists() else st.get("config_hash")
    if saved_hash and saved_hash != spec.config_hash and not spec.force:
        return "conflict", f"{run_dir} was made by a different config (hash {saved_hash} vs {spec.config_hash})"
    if (run_dir / "metrics.json").exists() and saved_hash == spec.config_hash and not spec.force:
        return "skip", "finished"
    if st.get("state") in ACTIVE and job_alive(st):
        return "skip", f"already {st['state']} as {st.get('launcher')} job {st.get('job_id')}"
    if st.get("state") == "failed":
        return "run", "failed before; resubmitting"
    return "run", "resuming from its checkpoint" if (run_dir / "checkpoints").is_dir() else "new"


def job_folder(out: Path) -> Path:
    """Where submitit keeps pickles and logs (%j is the job id)."""
    return Path(out).resolve() / ".submitit" / "%j"


def describe_submission(res: Resources, launcher: str, n: int) -> str:
    """What would be asked of the scheduler, in sbatch terms (the same options that are submitted)."""
    lines = [f"launcher: {launcher}; {n} job(s)" + (" as one Slurm job array" if launcher == "slurm" and n > 1 else "")]
    if launcher == "slurm":
        lines += [f"  sbatch {a}" for a in sbatch_args(res, n)]
    elif launcher == "local":
        lines.append(
            f"  tasks={res.tasks_per_node} gpus/job={res.gpus_per_node} timeout={res.time_min} min "
            f"concurrent={len(local_slots(res))}"
        )
    return "\n".join(lines)


def mark_submitted(spec: PointSpec, launcher: str, job_id: str | None) -> None:
    """Record in the point's state.json that it was handed to a launcher, under which job id, with which code."""
    update_state(
        Path(spec.run_dir),
        state="submitted",
        launcher=launcher,
        job_id=job_id,
        submitted_at=now_iso(),
        config_hash=spec.config_hash,
        p=spec.p,
        seed=spec.seed,
        task=spec.task,
        code=spec.code,
        error=None,
    )


def slurm_executor(
    folder: Path, res: Resources, max_requeues: int, name: str, code: CodeSnapshot | None = None
) -> submitit.SlurmExecutor:
    """A SlurmExecutor asking for ``res`` (``executor_params``) and running from ``code`` when given."""
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    params = executor_params(res, name)
    if code is not None:
        params["setup"] = code.job_setup()
    ex.update_parameters(**params)
    return ex


def submit_slurm(specs: list[PointSpec], res: Resources, folder: Path, code: CodeSnapshot) -> list[str]:
    """Submit the points as one job array; record 'submitted' + job id in each state.json."""
    ex = slurm_executor(folder, res, specs[0].max_requeues, name=f"sweep-{specs[0].task}", code=code)
    with ex.batch():
        jobs = [ex.submit(PointJob(spec)) for spec in specs]
    for spec, job in zip(specs, jobs, strict=True):
        mark_submitted(spec, "slurm", job.job_id)
    return [job.job_id for job in jobs]


def local_gpu_ids() -> list[int]:
    """GPUs this machine may use (CUDA_VISIBLE_DEVICES if set, else all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(d) for d in visible.split(",") if d.strip().isdigit()]
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # torch without CUDA support
        return []


def local_slots(res: Resources) -> list[tuple[int, ...]]:
    """Disjoint GPU sets, one per concurrent local job (CPU jobs: empty tuples, one per free core set)."""
    if res.nodes > 1:
        raise ValueError(f"--launcher local runs on one machine; --nodes {res.nodes} needs --launcher slurm")
    if res.gpus_per_node:
        gpus = local_gpu_ids()
        if res.gpus_per_node > len(gpus):
            raise ValueError(f"--gpus-per-node {res.gpus_per_node}: this machine has {len(gpus)} usable GPU(s)")
        slots = [tuple(gpus[i : i + res.gpus_per_node]) for i in range(0, len(gpus), res.gpus_per_node)]
        slots = [s for s in slots if len(s) == res.gpus_per_node]
    else:
        per_job = max(1, res.cpus_per_task * res.tasks_per_node)
        slots = [()] * max(1, (os.cpu_count() or 1) // per_job)
    if res.max_parallel:
        slots = slots[: res.max_parallel]
    return slots


def _local_executor(folder: Path, res: Resources, slot: tuple[int, ...], code: CodeSnapshot, max_requeues: int):
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
    # LocalExecutor's default timeout is 2 minutes and it shows every job the same GPUs: set both.
    ex.update_parameters(
        timeout_min=res.time_min,
        tasks_per_node=res.tasks_per_node,
        gpus_per_node=res.gpus_per_node,
        visible_gpus=slot,
        signal_delay_s=min(res.signal_delay_s, max(1, res.time_min * 60 // 4)),
        setup=code.job_setup(),
    )
    return ex


def run_local(specs: list[PointSpec], res: Resources, folder: Path, code: CodeSnapshot, poll_s: float = 1.0) -> None:
    """Run points as submitit local jobs, never more at once than there are disjoint GPU sets / core sets."""
    slots = local_slots(res)
    free = list(range(len(slots)))
    pending = list(specs)
    running: list[tuple[Any, int]] = []
    while pending or running:
        while pending and free:
            spec, slot = pending.pop(0), free.pop(0)
            job = _local_executor(folder, res, slots[slot], code, spec.max_requeues).submit(PointJob(spec))
            mark_submitted(spec, "local", job.job_id)
            print(
                f"  local job {job.job_id}: p={spec.p:g} seed={spec.seed} gpus={list(slots[slot]) or 'none'}",
                flush=True,
            )
            running.append((job, slot))
        time.sleep(poll_s)
        for job, slot in list(running):
            if job.done():
                running.remove((job, slot))
                free.append(slot)


def run_inprocess(specs: list[PointSpec]) -> None:
    """Sequential: call each point's job here, one after the other (the live code, no snapshot)."""
    for i, spec in enumerate(specs):
        print(f"=== {spec.task} p={spec.p:g} seed={spec.seed} ({i + 1}/{len(specs)})", flush=True)
        mark_submitted(spec, "inprocess", None)
        PointJob(spec)()
