"""Run a sweep's points in-process, as submitit local jobs, or as a Slurm job array.

Every run folder gets a ``state.json`` (pending/submitted/running/requeued/finished/failed, the
job id, requeue count, timestamps), written atomically. The sweep folder gets ``sweep.json``
(the task, preset, overrides and points), which is what ``status`` and the final report read.
A job is a :class:`PointJob` (submitit ``Checkpointable``). submitit's pre-timeout signal (USR2,
``sbatch --signal``; also how Slurm tests preemption) first reaches the trainer, which writes a
checkpoint at the current step and raises ``Preempted``; the job then hands the signal to
submitit, which requeues it (up to ``max_requeues`` times). Started again, ``run_point`` resumes
from that checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import submitit

from caption_mixing.atomic import atomic_write_json
from clip_train.preemption import Preempted
from experiments.tasks import Task, get_task

REPO = Path(__file__).resolve().parent.parent
ACTIVE = ("submitted", "running", "requeued")
STATES = ("pending", *ACTIVE, "finished", "failed")


# ---------------------------------------------------------------------------------------------
# state.json and sweep.json
# ---------------------------------------------------------------------------------------------


def now_iso() -> str:
    """UTC timestamp with seconds, for state files."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run folder's state.json, or {} when there is none."""
    path = Path(run_dir) / "state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def update_state(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into state.json (locked read-modify-write, atomic replace)."""
    run_dir = Path(run_dir)
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"unknown run state {fields['state']!r}")
    with _locked(run_dir / ".state.lock"):
        state = read_state(run_dir)
        state.update(fields, updated_at=now_iso())
        atomic_write_json(run_dir / "state.json", state)
    return state


def read_manifest(out: Path) -> dict[str, Any]:
    """The sweep folder's sweep.json; FileNotFoundError names the folder."""
    path = Path(out) / "sweep.json"
    if not path.exists():
        raise FileNotFoundError(f"--out: {out} holds no sweep.json (not a sweep folder, or nothing was launched yet)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Points and resources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointSpec:
    """One point of a sweep: enough to rebuild its config inside a job (plain, picklable values)."""

    task: str
    preset: str
    overrides: dict[str, Any]
    out: str
    run_dir: str
    p: float
    config_hash: str
    testbed_dir: str | None = None
    force: bool = False
    max_requeues: int = 3


@dataclass
class Resources:
    """What one job asks for; defaults come from the preset, flags override them."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    mem_gb: float = 8.0
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {"exclusive": True}
    signal_delay_s: int = 90  # submitit sends its checkpoint signal this long before the time limit
    max_parallel: int | None = None  # array throttle (slurm) / concurrent jobs (local)
    sec_per_step: float | None = None  # time-limit sanity check; None: estimate

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


# Per-preset job shapes. The real presets follow the paper (B/32: 64 GPUs as 8 nodes x 8; H/14 on
# 32 nodes); time is one Slurm allocation, the run continues across requeues. sec_per_step is a
# rough estimate used only to warn about time limits shorter than a checkpoint interval.
PRESET_RESOURCES: dict[str, dict[str, Any]] = {
    "embedded": dict(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=2, mem_gb=8, time_min=60),
    "vit-b-32": dict(nodes=8, gpus_per_node=8, tasks_per_node=8, cpus_per_task=10, mem_gb=480, time_min=72 * 60),
    "vit-h-14": dict(nodes=32, gpus_per_node=8, tasks_per_node=8, cpus_per_task=10, mem_gb=480, time_min=72 * 60),
    # t2i trains in one process (no DDP yet): one GPU per job.
    **{
        name: dict(nodes=1, gpus_per_node=1, tasks_per_node=1, cpus_per_task=10, mem_gb=64, time_min=72 * 60)
        for name in ("dit-s-2", "dit-b-2", "dit-xl-2")
    },
}
PRESET_SEC_PER_STEP = {"embedded": 0.5, "vit-b-32": 1.5, "vit-h-14": 6.0}
DEFAULT_SEC_PER_STEP = 1.0


def preset_resources(preset: str) -> Resources:
    """Default resources for a preset name (a YAML path gets the embedded shape)."""
    return Resources(**PRESET_RESOURCES.get(Path(preset).stem, PRESET_RESOURCES["embedded"]))


_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time_min(text: str, flag: str = "--time") -> int:
    """Slurm time formats (``90``, ``1:30:00``, ``2-00:00:00``, ``2-12``) -> whole minutes (rounded up)."""
    m = _TIME_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"{flag}: {text!r} is not a Slurm time (minutes, HH:MM:SS, D-HH[:MM[:SS]])")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b) if b else None, int(c) if c else None
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"{flag}: {text!r} must be a positive time")
    return math.ceil(seconds / 60)


def parse_sbatch_extra(items: list[str] | None, flag: str = "--sbatch") -> dict[str, Any]:
    """``["exclusive", "mail-type=END"]`` -> {"exclusive": True, "mail_type": "END"} for submitit."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ValueError(f"{flag}: {item!r} is not OPTION or OPTION=VALUE (an sbatch long option without --)")
        out[key.replace("-", "_")] = value if sep else True
    return out


def sec_per_step_estimate(cfg: Any, run_dirs: list[Path], preset: str) -> tuple[float, str]:
    """Seconds per optimizer step: last measured samples/s in a train_log.jsonl, else the preset's guess."""
    for run_dir in run_dirs:
        log = run_dir / "train_log.jsonl"
        if not log.exists():
            continue
        for line in reversed(log.read_text().splitlines()):
            try:
                sps = float(json.loads(line).get("samples_per_s") or 0)
            except (ValueError, AttributeError):
                continue
            if sps > 0:
                return cfg.batch_size / sps, f"measured in {log}"
    stem = Path(preset).stem
    return PRESET_SEC_PER_STEP.get(stem, DEFAULT_SEC_PER_STEP), f"the {stem!r} preset's estimate"


def time_limit_warning(cfg: Any, res: Resources, run_dirs: list[Path], preset: str) -> str | None:
    """A warning when the job time limit cannot fit one checkpoint interval.

    The trainers write a checkpoint when the signal arrives, so progress is kept as long as that
    save fits in the signal delay; the warning says that every allocation then depends on it.
    """
    every = getattr(cfg, "checkpoint_every", None)
    if not every:
        return None
    if res.sec_per_step is not None:
        sps, source = res.sec_per_step, "--sec-per-step"
    else:
        sps, source = sec_per_step_estimate(cfg, run_dirs, preset)
    interval = every * sps
    usable = res.time_min * 60 - res.signal_delay_s
    if usable >= interval:
        return None
    return (
        f"warning: --time {res.time_min} min leaves {max(usable, 0):.0f} s before the checkpoint signal, "
        f"shorter than one checkpoint interval (checkpoint_every={every} steps x {sps:.3g} s/step from "
        f"{source} = {interval:.0f} s); "
        "every allocation then relies on the checkpoint written at the signal, and loses its steps "
        f"if that save does not finish within --signal-delay-s {res.signal_delay_s}. "
        "Raise --time or lower --set checkpoint_every."
    )


# ---------------------------------------------------------------------------------------------
# Slurm helpers (subprocess with argument lists only)
# ---------------------------------------------------------------------------------------------


def slurm_available() -> bool:
    """Whether the Slurm client commands are on PATH."""
    return all(shutil.which(cmd) for cmd in ("sbatch", "squeue", "srun", "scontrol"))


def sbatch_test_args(res: Resources) -> list[str]:
    """sbatch options equivalent to what submitit will submit, for ``sbatch --test-only``."""
    args = [f"--nodes={res.nodes}", f"--ntasks-per-node={res.tasks_per_node}", f"--time={res.time_min}"]
    args.append(f"--cpus-per-task={res.cpus_per_task}")
    args.append(f"--mem={int(math.ceil(res.mem_gb * 1024))}M")
    if res.gpus_per_node:
        args.append(f"--gpus-per-node={res.gpus_per_node}")
    for flag, value in (
        ("partition", res.partition),
        ("account", res.account),
        ("qos", res.qos),
        ("constraint", res.constraint),
    ):
        if value:
            args.append(f"--{flag}={value}")
    return args


def validate_slurm(res: Resources) -> None:
    """Ask Slurm (``sbatch --test-only``) whether this job shape can run; ValueError quotes sbatch."""
    if not slurm_available():
        raise ValueError(
            "--launcher slurm: sbatch/srun/squeue are not on PATH (no Slurm client here; "
            "for a local test cluster run scripts/slurm/start_cluster.sh)"
        )
    cmd = ["sbatch", "--test-only", *sbatch_test_args(res), "--wrap=true"]
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


# ---------------------------------------------------------------------------------------------
# Inside a job
# ---------------------------------------------------------------------------------------------


def setup_distributed() -> tuple[int, int]:
    """In a submitit job, export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; return (rank, world).

    ``torch.distributed.init_process_group(init_method="env://")`` (clip_train.distributed) then
    rendezvous; outside a submitit job the variables are read as they are.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # CUDA_VISIBLE_DEVICES is left whole: the trainer picks cuda:LOCAL_RANK (clip_train.distributed).
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return env.rank, env.world_size


def rendezvous_probe(out_dir: str) -> dict[str, Any]:
    """Diagnostic job: export the distributed env, join a gloo group, all_reduce, write ``rank<N>.json``."""
    import torch
    import torch.distributed as dist

    rank, world = setup_distributed()
    dist.init_process_group(backend="gloo", init_method="env://")
    try:
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        info = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        info.update(rank=rank, world_size=world, all_reduce_sum=t.item(), job_id=job_id_from_env())
    finally:
        dist.destroy_process_group()
    atomic_write_json(Path(out_dir) / f"rank{rank}.json", info)
    return info


def submitit_signal() -> int:
    """The signal submitit's job handler requeues on (USR2 unless ``$SUBMITIT_PREEMPT_SIGNAL`` says otherwise)."""
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def job_id_from_env() -> str | None:
    """This job's id as submitit names it (``ARRAY_TASK`` for arrays), or None outside a job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return submitit.JobEnvironment().job_id


class PointJob(submitit.helpers.Checkpointable):
    """Train and evaluate one point; checkpointable so submitit can requeue it on its timeout signal."""

    def __init__(self, spec: PointSpec) -> None:
        self.spec = spec

    def __call__(self) -> dict[str, Any]:
        spec = self.spec
        run_dir = Path(spec.run_dir)
        rank, _ = setup_distributed()
        task = get_task(spec.task)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        if rank == 0:
            previous = read_state(run_dir)
            requeues = max(int(previous.get("requeues", 0)), restarts)
            fields: dict[str, Any] = dict(
                state="running", host=socket.gethostname(), started_at=now_iso(), requeues=requeues, error=None
            )
            if (jid := job_id_from_env()) is not None:
                fields["job_id"] = jid
            update_state(run_dir, **fields)
            if requeues > spec.max_requeues:
                msg = f"requeued {requeues} times, more than --max-requeues {spec.max_requeues}"
                update_state(run_dir, state="failed", error=msg, finished_at=now_iso())
                raise RuntimeError(f"{run_dir}: {msg}")
        cfg = task.load_config(spec.preset, spec.overrides)
        try:
            metrics = task.run_point(cfg, Path(spec.out), testbed_dir=spec.testbed_dir, force=spec.force)
        except Exception as e:
            if isinstance(e, Preempted):
                self._preempted(e, rank)
            if rank == 0:
                update_state(run_dir, state="failed", error=f"{type(e).__name__}: {e}", finished_at=now_iso())
            raise
        if rank == 0:
            update_state(run_dir, state="finished", finished_at=now_iso(), steps=metrics.get("steps"))
            maybe_write_report(Path(spec.out))
        return {"p": spec.p, "run_dir": spec.run_dir, "summary": metrics.get("summary")}

    def _preempted(self, error: BaseException, rank: int) -> NoReturn:
        """The trainer stopped on a signal after writing a checkpoint at that step: get the job requeued."""
        signum, step = int(getattr(error, "signum", 0) or 0), getattr(error, "step", None)
        if rank == 0:
            update_state(Path(self.spec.run_dir), state="requeued", error=None, preempted_at_step=step)
        if signum and signum == submitit_signal() and os.environ.get("SUBMITIT_EXECUTOR"):
            # The trainer held submitit's signal back until its checkpoint was written; its handler
            # is back in place: on rank 0 it calls checkpoint() below, requeues and exits (on other
            # ranks it returns). SIGTERM (Slurm's own preemption/requeue) needs nothing: Slurm requeues.
            signal.raise_signal(signum)
        raise error

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """submitit's timeout/preemption hook: requeue the same call unless the requeue budget is spent."""
        run_dir = Path(self.spec.run_dir)
        done = int(read_state(run_dir).get("requeues", 0))
        if done >= self.spec.max_requeues:
            update_state(
                run_dir,
                state="failed",
                finished_at=now_iso(),
                error=(
                    f"stopped, not requeued: already requeued {done} time(s) (--max-requeues "
                    f"{self.spec.max_requeues}); its checkpoint is kept, run the sweep again to continue"
                ),
            )
            return None
        update_state(run_dir, state="requeued", requeues=done + 1, requeued_at=now_iso())
        return super().checkpoint(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Report and status
# ---------------------------------------------------------------------------------------------


def maybe_write_report(out: Path) -> dict[str, Path] | None:
    """Write the sweep report once every point of sweep.json has finished; None otherwise."""
    out = Path(out)
    try:
        manifest = read_manifest(out)
    except FileNotFoundError:
        return None
    points = manifest["points"]
    if len(points) < 2:  # a single point has no sweep to report (as the in-process sweep always did)
        return None
    runs = []
    for point in points:
        run_dir = out / point["run_dir"]
        metrics_file = run_dir / "metrics.json"
        if read_state(run_dir).get("state") != "finished" or not metrics_file.exists():
            return None
        metrics = json.loads(metrics_file.read_text())
        runs.append({**metrics, "p": point["p"], "label": f"p={point['p']:g}"})
    task = get_task(manifest["task"])
    notice = task.notice if any("notice" in r for r in runs) else None
    with _locked(out / ".report.lock"):
        return task.report(runs, out, f"Caption-mixing sweep ({manifest['task']}, {manifest['preset']})", notice)


def status_rows(out: Path) -> list[dict[str, Any]]:
    """One row per point of the sweep: p, run folder, state, job id, requeues, progress, note."""
    out = Path(out)
    manifest = read_manifest(out)
    states = [read_state(out / pt["run_dir"]) for pt in manifest["points"]]
    queued = squeue_states([str(s.get("job_id") or "") for s in states if s.get("launcher") == "slurm"])
    rows = []
    for point, st in zip(manifest["points"], states, strict=True):
        run_dir = out / point["run_dir"]
        state = st.get("state", "pending")
        note = st.get("error") or ""
        jid = str(st.get("job_id") or "")
        if state in ACTIVE:
            alive = (jid in queued) if st.get("launcher") == "slurm" else job_alive(st)
            if st.get("launcher") == "slurm" and alive:
                note = queued[jid].lower()
            elif not alive and st.get("launcher") in ("slurm", "local"):
                note = "job is gone from the queue without finishing; re-run the sweep to resubmit"
        ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
        rows.append(
            {
                "p": point["p"],
                "run_dir": point["run_dir"],
                "state": state,
                "job_id": jid or "-",
                "requeues": st.get("requeues", 0),
                "last_checkpoint": ckpts[-1].stem if ckpts else "-",
                "updated": st.get("updated_at", "-"),
                "note": note,
            }
        )
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of status_rows."""
    cols = ["p", "run_dir", "state", "job_id", "requeues", "last_checkpoint", "updated", "note"]
    cells = [[f"{r['p']:g}" if c == "p" else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Planning and launching
# ---------------------------------------------------------------------------------------------


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


def write_manifest(out: Path, task: Task, preset: str, overrides: dict, specs: list[PointSpec], **extra: Any) -> None:
    """sweep.json: what this sweep is, so jobs and ``status`` know all of its points."""
    atomic_write_json(
        Path(out) / "sweep.json",
        {
            "task": task.name,
            "preset": preset,
            "overrides": overrides,
            "points": [{"p": s.p, "run_dir": Path(s.run_dir).name, "config_hash": s.config_hash} for s in specs],
            "written_at": now_iso(),
            **extra,
        },
    )


def _job_env_path() -> None:
    """Jobs unpickle ``experiments.launch.PointJob``: make the checkout importable in them (env is inherited)."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *parts])


def slurm_executor(folder: Path, res: Resources, max_requeues: int, name: str) -> submitit.AutoExecutor:
    """AutoExecutor with the cluster named (never auto-detected), resources set."""
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues)
    params: dict[str, Any] = dict(
        name=name,
        timeout_min=res.time_min,
        nodes=res.nodes,
        tasks_per_node=res.tasks_per_node,
        cpus_per_task=res.cpus_per_task,
        mem_gb=res.mem_gb,
        slurm_signal_delay_s=res.signal_delay_s,
        slurm_additional_parameters={"requeue": True, **res.extra},
    )
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            params[f"slurm_{key}"] = getattr(res, key)
    if res.max_parallel:
        params["slurm_array_parallelism"] = res.max_parallel
    ex.update_parameters(**params)
    return ex


def mark_submitted(spec: PointSpec, launcher: str, job_id: str) -> None:
    """Record in the point's state.json that it was handed to a launcher, under which job id."""
    update_state(
        Path(spec.run_dir),
        state="submitted",
        launcher=launcher,
        job_id=job_id,
        submitted_at=now_iso(),
        config_hash=spec.config_hash,
        p=spec.p,
        task=spec.task,
        error=None,
    )


def submit_slurm(specs: list[PointSpec], res: Resources, folder: Path, max_requeues: int) -> list[str]:
    """Submit the points as one job array; record 'submitted' + job id in each state.json."""
    _job_env_path()
    ex = slurm_executor(folder, res, max_requeues, name=f"sweep-{specs[0].task}")
    with ex.batch():
        jobs = [ex.submit(PointJob(spec)) for spec in specs]
    for spec, job in zip(specs, jobs, strict=True):
        mark_submitted(spec, "slurm", job.job_id)
    return [job.job_id for job in jobs]


def wait_slurm(job_ids: list[str], timeout_s: float | None = None, poll_s: float = 0.5) -> None:
    """Block until none of the jobs is queued or running (requeued ones come back as pending)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while squeue_states(job_ids).keys() & set(job_ids):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"--wait-timeout: jobs {', '.join(job_ids)} still queued after {timeout_s:.0f} s")
        time.sleep(poll_s)


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


def run_local(specs: list[PointSpec], res: Resources, folder: Path, max_requeues: int, poll_s: float = 1.0) -> None:
    """Run points as submitit local jobs, never more at once than there are disjoint GPU sets / core sets."""
    _job_env_path()
    slots = local_slots(res)
    free = list(range(len(slots)))
    pending = list(specs)
    running: list[tuple[Any, int]] = []
    while pending or running:
        while pending and free:
            spec, slot = pending.pop(0), free.pop(0)
            ex = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
            # LocalExecutor's default timeout is 2 minutes and it shows every job the same GPUs: set both.
            ex.update_parameters(
                timeout_min=res.time_min,
                tasks_per_node=res.tasks_per_node,
                gpus_per_node=res.gpus_per_node,
                visible_gpus=slots[slot],
                signal_delay_s=min(res.signal_delay_s, max(1, res.time_min * 60 // 4)),
            )
            job = ex.submit(PointJob(spec))
            mark_submitted(spec, "local", job.job_id)
            print(f"  local job {job.job_id}: p={spec.p:g} gpus={list(slots[slot]) or 'none'}", flush=True)
            running.append((job, slot))
        time.sleep(poll_s)
        for job, slot in list(running):
            if job.done():
                running.remove((job, slot))
                free.append(slot)


def run_inprocess(specs: list[PointSpec]) -> None:
    """The original sequential behaviour: call each point here, one after the other."""
    for i, spec in enumerate(specs):
        print(f"=== {spec.task} p={spec.p:g} ({i + 1}/{len(specs)})", flush=True)
        update_state(
            Path(spec.run_dir),
            launcher="inprocess",
            job_id=None,
            config_hash=spec.config_hash,
            p=spec.p,
            task=spec.task,
        )
        PointJob(spec)()


def describe_submission(res: Resources, launcher: str, n: int) -> str:
    """What would be asked of the scheduler, in sbatch terms."""
    lines = [f"launcher: {launcher}; {n} job(s)" + (" as one Slurm job array" if launcher == "slurm" else "")]
    if launcher == "slurm":
        lines += [f"  sbatch {a}" for a in sbatch_test_args(res)]
        lines += [f"  sbatch --signal=USR2@{res.signal_delay_s}", "  sbatch --requeue"]
        if n > 1:
            lines.append(f"  sbatch --array=0-{n - 1}%{min(n, res.max_parallel or 256)}")
        lines += [f"  sbatch --{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in res.extra.items()]
    elif launcher == "local":
        lines.append(
            f"  tasks={res.tasks_per_node} gpus/job={res.gpus_per_node} timeout={res.time_min} min "
            f"concurrent={len(local_slots(res))}"
        )
    return "\n".join(lines)


def job_folder(out: Path) -> Path:
    """Where submitit keeps pickles and logs (%j is the job id)."""
    return Path(out).resolve() / ".submitit" / "%j"
