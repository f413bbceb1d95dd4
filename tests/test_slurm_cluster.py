"""Sweeps on a real Slurm cluster: job arrays, preemption + requeue + resume, DDP jobs, idempotent reruns.

Needs a running cluster (``sudo scripts/slurm/start_cluster.sh`` starts a single-node one).
Without one these tests skip; with ``CAPTION_MIXING_REQUIRE_SLURM=1`` (CI) they fail instead.
Every job is a few steps of the tiny testbed model; the tests poll the queue every 0.2-0.5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments import snapshot, submit
from experiments.job import PointJob, rendezvous_probe
from experiments.resources import Resources
from experiments.scheduler import slurm_available, squeue_states
from experiments.state import read_state
from experiments.sweep_ratio import main as sweep_main
from testbed import TestbedConfig, build_testbed
from tests.conftest import assert_same_t2i_training, t2i_equivalence_overrides, tiny_t2i_world

REPO = Path(__file__).resolve().parent.parent
# Shards of 8 samples: with shuffle_buffer=0, a 2-rank job's per-rank batches of 8 are whole shards,
# the same samples as one process's micro-batches (see the DDP test).
TINY = TestbedConfig(num_train=384, shard_size=8, eval_per_class=2, eval_per_class_small=4, num_retrieval=16, seed=3)
FAST = {"batch_size": 16, "samples_seen": 32, "workers": 0, "checkpoint_every": 1, "log_every": 1, "warmup_steps": 1}
JOB = ["--cpus-per-task", "1", "--mem-gb", "2", "--time", "20", "--wait", "--wait-timeout", "400"]


def _cluster_problem() -> str | None:
    if not slurm_available():
        return "sbatch/srun/squeue are not on PATH"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable Slurm node (sinfo: {(proc.stdout + proc.stderr).strip() or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    msg = f"{problem}; start a local cluster with: sudo {REPO}/scripts/slurm/start_cluster.sh"
    if os.environ.get("CAPTION_MIXING_REQUIRE_SLURM") == "1":
        pytest.fail(f"CAPTION_MIXING_REQUIRE_SLURM=1 but {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def testbed_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("testbed")
    build_testbed(root, TINY, progress=False)
    return str(root)


def fast_args(**extra: Any) -> list[str]:
    return [a for k, v in {**FAST, **extra}.items() for a in ("--set", f"{k}={v}")]


def _queued(job_id: str) -> dict[str, str]:
    return squeue_states([job_id])


def _state(run: Path) -> dict[str, Any]:
    return read_state(run)


def _wait_for(what: str, cond: Callable[[], Any], deadline: float, poll_s: float = 0.2) -> Any:
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(poll_s)
    return value


def _logged_steps(run: Path) -> list[int]:
    """Steps in train_log.jsonl (a half-written last line is skipped)."""
    steps = []
    path = run / "train_log.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass
    return steps


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))


def _job_logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / ".submitit").rglob("*_log.*")))


def test_embedded_sweep_as_job_array_then_rerun_submits_nothing(slurm, testbed_dir: str, tmp_path: Path, capsys):
    out = tmp_path / "sweep"
    argv = ["--p", "0,1", "--out", str(out), "--testbed-dir", testbed_dir, "--launcher", "slurm", *JOB]
    argv += fast_args()
    assert sweep_main(argv) == 0
    text = capsys.readouterr().out
    array_id = text.split("submitted Slurm job array ")[1].split(":")[0]
    ids = []
    for i, p in enumerate(("0", "1")):
        state = json.loads((out / f"clip-embedded-p{p}" / "state.json").read_text())
        assert state["state"] == "finished" and state["launcher"] == "slurm", state
        assert state["job_id"] == f"{array_id}_{i}"  # one array, one task per point
        ids.append(state["job_id"])
        assert json.loads((out / f"clip-embedded-p{p}" / "metrics.json").read_text())["steps"] == 2
    assert (out / "report.md").exists() and (out / "report.csv").read_text().count("\n") == 3
    assert (out / "accuracy_vs_p.png").read_bytes()[:4] == b"\x89PNG"

    assert sweep_main(["status", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for jid in ids:
        assert jid in table
    assert table.count("finished") == 2

    # Same sweep again: nothing is submitted and the job ids stay.
    assert sweep_main(argv) == 0
    text = capsys.readouterr().out
    assert "nothing to submit" in text and "submitted Slurm job array" not in text
    assert [_state(out / f"clip-embedded-p{p}")["job_id"] for p in ("0", "1")] == ids


def test_preempted_job_checkpoints_at_the_signal_resumes_there_and_stops_after_max_requeues(
    slurm, testbed_dir: str, tmp_path: Path
):
    out = tmp_path / "sweep"
    steps = 16
    argv = ["--p", "0.5", "--out", str(out), "--testbed-dir", testbed_dir, "--launcher", "slurm"]
    argv += ["--cpus-per-task", "2", "--mem-gb", "2", "--time", "20", "--max-requeues", "1"]
    # No periodic checkpoint before the end: any checkpoint mid-run was written at a signal.
    argv += fast_args(samples_seen=16 * steps, checkpoint_every=1000)
    assert sweep_main(argv) == 0
    run = out / "clip-embedded-p0.5"
    job_id = _state(run)["job_id"]
    deadline = time.monotonic() + 420

    # Signal 1 (submitit's pre-timeout signal, as Slurm sends it) once training runs: the trainer
    # checkpoints the step it is on, then submitit requeues the job (requeue 1 of --max-requeues 1).
    _wait_for("the job logs a step", lambda: _logged_steps(run) or not _queued(job_id), deadline)
    assert _queued(job_id), f"job {job_id} ended early:\n{_job_logs(out)}"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    _wait_for("the job requeues itself", lambda: _state(run).get("requeues") == 1, deadline)
    first = _state(run)["preempted_at_step"]
    assert 1 <= first < steps and _checkpoint_steps(run) == [first]
    assert _logged_steps(run) == list(range(1, first + 1))  # stopped at the step the signal arrived in

    # A requeued job waits for its BeginTime (~2 min); release it now. It resumes at that step.
    def resumed() -> bool:
        if _queued(job_id).get(job_id) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        return len(_logged_steps(run)) > first or not _queued(job_id)

    _wait_for("the requeued job trains again", resumed, deadline)
    assert _state(run)["state"] == "running", _state(run)
    assert f"at step {first} " in _job_logs(out)  # "resuming from .../step_N.pt at step N (epoch ...)"

    # Signal 2: the requeue budget is spent, so the job checkpoints and ends as failed.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    _wait_for("the job leaves the queue", lambda: not _queued(job_id), deadline)
    state = _state(run)
    second = state["preempted_at_step"]
    assert state["state"] == "failed" and state["requeues"] == 1, state
    assert "not requeued" in state["error"] and "--max-requeues 1" in state["error"]
    assert first < second < steps and _checkpoint_steps(run) == [first, second]
    assert _logged_steps(run) == list(range(1, second + 1))  # no step redone or skipped across the requeue
    assert not (run / "metrics.json").exists()
    assert "Requeued job" in _job_logs(out)
    assert sweep_main(["status", "--out", str(out)]) == 0


def test_two_task_job_gets_distinct_ranks_and_rendezvous(slurm, tmp_path: Path):
    res = Resources(tasks_per_node=2, cpus_per_task=1, mem_gb=2, time_min=5)
    code = snapshot.take(tmp_path)  # the job imports experiments.job from this copy of the code
    ex = submit.slurm_executor(tmp_path / "submitit" / "%j", res, max_requeues=0, name="ddp-probe", code=code)
    job = ex.submit(rendezvous_probe, str(tmp_path))
    _wait_for("the probe job ends", lambda: not _queued(job.job_id), time.monotonic() + 180, poll_s=0.5)
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["RANK"] for i in infos] == ["0", "1"] and {i["WORLD_SIZE"] for i in infos} == {"2"}
    assert {i["LOCAL_RANK"] for i in infos} == {"0", "1"}
    assert infos[0]["MASTER_ADDR"] == infos[1]["MASTER_ADDR"] and infos[0]["MASTER_PORT"] == infos[1]["MASTER_PORT"]
    assert all(i["all_reduce_sum"] == 3.0 for i in infos)  # 1 + 2: both tasks joined one gloo group
    assert {i["code_dir"] for i in infos} == {code.dir}  # the job ran the snapshot, not the checkout


def _train_without_random_crops() -> None:
    """Train with the eval transform. The train transform's random crops draw from each process's
    RNG (seeded alike on every rank), so rank 1 would crop its images unlike one process does."""
    import clip_train.train as train_mod
    from clip_train.model import create_model

    def create_without_crops(*args: Any, **kwargs: Any) -> tuple:
        model, _, preprocess_val, tokenizer = create_model(*args, **kwargs)
        return model, preprocess_val, preprocess_val, tokenizer

    train_mod.create_model = create_without_crops


class NoCropPointJob(PointJob):
    """The sweep's job with deterministic image preprocessing (pickled by reference: ``tests`` is a package)."""

    def __call__(self) -> dict[str, Any]:
        _train_without_random_crops()
        return super().__call__()


def _params(run: Path, step: int) -> dict[str, torch.Tensor]:
    """Trained parameters of a checkpoint; BatchNorm's running statistics are left out (each rank
    keeps those of its own batches, there is no SyncBN, as in open_clip)."""
    state = torch.load(run / "checkpoints" / f"step_{step:08d}.pt", map_location="cpu", weights_only=True)
    return {k: v for k, v in state["state_dict"].items() if v.is_floating_point() and "running_" not in k}


def test_two_task_sweep_point_trains_with_ddp_like_one_process(
    slurm, testbed_dir: str, tmp_path: Path, monkeypatch, capsys
):
    """A 2-task job (gloo on CPU) == one process accumulating 2 micro-batches of the same global batch.

    Same seed, same global batch of 16 (2 ranks x 8 vs 2 micro-batches x 8, so BatchNorm sees the
    same 8-sample batches), same samples in each step (shards of 8, no shuffling); eps=1e-3 keeps
    float noise in near-zero gradients from flipping Adam's first ~sign(g) step.
    """
    import clip_train.train as train_mod
    from clip_train.model import create_model

    common = ["--p", "0.5", "--testbed-dir", testbed_dir, *fast_args(shuffle_buffer=0, eps=1e-3)]
    monkeypatch.setattr(train_mod, "create_model", train_mod.create_model)  # restored after the test
    monkeypatch.setattr(submit, "PointJob", NoCropPointJob)
    assert sweep_main([*common, "--out", str(tmp_path / "one"), "--set", "accum_freq=2"]) == 0  # in-process
    capsys.readouterr()
    slurm_args = ["--launcher", "slurm", "--tasks-per-node", "2", *JOB]
    assert sweep_main([*common, "--out", str(tmp_path / "ddp"), *slurm_args]) == 0
    one, ddp = tmp_path / "one" / "clip-embedded-p0.5", tmp_path / "ddp" / "clip-embedded-p0.5"

    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, ddp))
    assert (m1["world_size"], m2["world_size"]) == (1, 2) and m1["steps"] == m2["steps"] == 2
    assert _state(ddp)["state"] == "finished" and _state(ddp)["launcher"] == "slurm"
    # The same samples, step by step: the caption draw is a function of the sample key, and the
    # counts are summed over ranks.
    assert m2["mixing"] == m1["mixing"] and sum(m1["mixing"]["used"].values()) == 32
    logs = [[json.loads(x)["realized"] for x in (r / "train_log.jsonl").read_text().splitlines()] for r in (one, ddp)]
    assert logs[0] == logs[1] and len(logs[0]) == 2

    # The same weights: step 1 with test_clip_train_scale's tolerance on the update, step 2 overall.
    torch.manual_seed(0)  # the trainer's seed before it builds the model
    init = {k: v for k, v in create_model("EmbeddedCLIP-Tiny")[0].state_dict().items() if k in _params(one, 1)}
    a, b = _params(one, 1), _params(ddp, 1)
    assert a.keys() == b.keys() == init.keys() and "logit_scale" in a
    for name in init:
        da, db = a[name] - init[name], b[name] - init[name]
        assert torch.allclose(db, da, atol=2e-6, rtol=1e-3), (name, (da - db).abs().max().item())
    a, b = _params(one, 2), _params(ddp, 2)
    diff = sum(((a[k] - b[k]).double() ** 2).sum() for k in init) ** 0.5
    moved = sum(((a[k] - init[k]).double() ** 2).sum() for k in init) ** 0.5
    assert diff < 1e-3 * moved, (diff.item(), moved.item())  # ~2e-5 measured; random crops alone give ~0.6


def test_two_task_t2i_point_trains_through_accelerate_like_one_process(slurm, tmp_path: Path, capsys):
    """The t2i task in a 2-task job: accelerate joins the gloo group submitit's variables describe,
    and the run equals one process accumulating 2 micro-batches (see assert_same_t2i_training)."""
    common = t2i_equivalence_overrides(tiny_t2i_world(_mkdir(tmp_path / "world")), tmp_path / "shards")
    argv = ["--task", "t2i", "--p", str(common.pop("p"))]
    argv += [arg for k, v in common.items() for arg in ("--set", f"{k}={v}")]
    assert sweep_main([*argv, "--out", str(tmp_path / "one"), "--set", "grad_accum=2"]) == 0  # in-process
    capsys.readouterr()
    slurm_args = ["--launcher", "slurm", "--tasks-per-node", "2", *JOB]
    assert sweep_main([*argv, "--out", str(tmp_path / "ddp"), *slurm_args]) == 0
    one, ddp = tmp_path / "one" / "t2i-embedded-p0.5", tmp_path / "ddp" / "t2i-embedded-p0.5"
    assert _state(ddp)["state"] == "finished" and _state(ddp)["launcher"] == "slurm"
    assert_same_t2i_training(one, ddp)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_unknown_partition_fails_before_any_work(slurm, tmp_path: Path, capsys):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exc:
        sweep_main(["--p", "0,1", "--out", str(out), "--launcher", "slurm", "--partition", "no-such-part"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--partition no-such-part" in err and "invalid partition" in err.lower()
    assert not out.exists()
    assert shutil.which("sbatch")
