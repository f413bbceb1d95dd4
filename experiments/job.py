"""Inside a job: what one point of a sweep does where it runs (in-process, local or Slurm job).

A job is a :class:`PointJob` (submitit ``Checkpointable``) holding a :class:`PointSpec`: the
resolved config's fields, not a preset and a second copy of p. It rebuilds the config, checks it
hashes as the sweep's did, trains and evaluates through the task's ``run_point`` and keeps the run
folder's state.json current. submitit's pre-timeout signal (USR2, ``sbatch --signal``; also how
Slurm tests preemption) first reaches the trainer, which writes a checkpoint at the current step
and raises ``Preempted``; the job then hands the signal to submitit, which requeues it (up to
``max_requeues`` times). Started again, ``run_point`` resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import submitit

from caption_mixing.atomic import atomic_write_json
from experiments.snapshot import source_root
from experiments.state import now_iso, read_state, update_state
from experiments.status import maybe_write_report
from experiments.tasks import get_task
from training.preemption import Preempted


@dataclass(frozen=True)
class PointSpec:
    """One point of a sweep: everything its job needs, as plain picklable values."""

    task: str
    config: dict[str, Any]  # the resolved config's fields (Task.config_dict); the job rebuilds it from them
    out: str
    run_dir: str
    config_hash: str
    testbed_dir: str | None = None
    force: bool = False
    max_requeues: int = 3
    workdir: str | None = None  # the sweep's working folder: the job works there (relative config paths)
    code: dict[str, Any] = field(default_factory=dict)  # CodeSnapshot.record() of the code the job runs

    @property
    def p(self) -> float:
        return float(self.config["p"])

    @property
    def seed(self) -> int:
        """The training seed (a sweep axis with ``--seeds``); every task's config has one."""
        return int(self.config.get("seed", 0))


def setup_distributed() -> tuple[int, int]:
    """In a submitit job, export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; return (rank, world).

    ``torch.distributed.init_process_group(init_method="env://")`` (training.distributed) then
    rendezvous; outside a submitit job the variables are read as they are.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # CUDA_VISIBLE_DEVICES is left whole: the trainer picks cuda:LOCAL_RANK (training.distributed).
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
        info["code_dir"] = str(source_root())
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


@contextlib.contextmanager
def working_dir(path: str | None) -> Iterator[None]:
    """Run the block in ``path`` (if given and still there), then return.

    Relative paths in a config (a preset file, ``train_shards``) then mean what they meant to the sweep.
    Imports are unaffected: the job's ``sys.path`` was fixed when it started (``CodeSnapshot.job_setup``).
    """
    if not path or not os.path.isdir(path):
        yield
        return
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class PointJob(submitit.helpers.Checkpointable):
    """Train and evaluate one point; checkpointable so submitit can requeue it on its timeout signal."""

    def __init__(self, spec: PointSpec) -> None:
        self.spec = spec

    def __call__(self) -> dict[str, Any]:
        with working_dir(self.spec.workdir):  # the job started in its code snapshot; it works where the sweep did
            return self._run()

    def _run(self) -> dict[str, Any]:
        spec = self.spec
        run_dir = Path(spec.run_dir)
        rank, _ = setup_distributed()
        if rank == 0:
            self._started(run_dir)
        task = get_task(spec.task)
        try:
            cfg = self._config(task)
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
        return {"p": spec.p, "seed": spec.seed, "run_dir": spec.run_dir, "summary": metrics.get("summary")}

    def _started(self, run_dir: Path) -> None:
        """state.json: running here, from this code; fail at once past the requeue budget (Slurm's own requeues)."""
        spec = self.spec
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        requeues = max(int(read_state(run_dir).get("requeues", 0)), restarts)
        fields: dict[str, Any] = dict(state="running", host=socket.gethostname(), started_at=now_iso())
        fields.update(requeues=requeues, error=None, code_ran_from=str(source_root()))
        if (jid := job_id_from_env()) is not None:
            fields["job_id"] = jid
        update_state(run_dir, **fields)
        if requeues > spec.max_requeues:
            msg = f"requeued {requeues} times, more than --max-requeues {spec.max_requeues}"
            update_state(run_dir, state="failed", error=msg, finished_at=now_iso())
            raise RuntimeError(f"{run_dir}: {msg}")

    def _config(self, task: Any) -> Any:
        """The sweep's config rebuilt from its fields; a different hash means different code and stops the job."""
        cfg = task.from_dict(self.spec.config)
        got = task.config_hash(cfg)
        if got != self.spec.config_hash:
            raise RuntimeError(
                f"the config rebuilt in the job hashes to {got}, the sweep's to {self.spec.config_hash}: "
                f"the job's code ({source_root()}) resolves configs differently from the sweep's; "
                "run the sweep again to resubmit with the current code"
            )
        return cfg

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
