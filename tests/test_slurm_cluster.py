"""Sweeps on a real Slurm cluster: job arrays, requeue + resume, multi-task jobs, idempotent reruns.

Needs a running cluster (``sudo scripts/slurm/start_cluster.sh`` starts a single-node one).
Without one these tests skip; with ``CAPTION_MIXING_REQUIRE_SLURM=1`` (CI) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from caption_mixing.testbed import TestbedConfig, build_testbed
from experiments import launch
from experiments.sweep_ratio import main as sweep_main
from experiments.tasks import get_task

REPO = Path(__file__).resolve().parent.parent
TINY = TestbedConfig(num_train=384, shard_size=96, eval_per_class=2, eval_per_class_small=4, num_retrieval=16, seed=3)
FAST = {"batch_size": 16, "samples_seen": 32, "workers": 0, "checkpoint_every": 1, "log_every": 1, "warmup_steps": 1}
JOB = ["--cpus-per-task", "1", "--mem-gb", "2", "--time", "20", "--wait", "--wait-timeout", "400"]


def _cluster_problem() -> str | None:
    if not launch.slurm_available():
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


def fast_args(**extra: int) -> list[str]:
    return [a for k, v in {**FAST, **extra}.items() for a in ("--set", f"{k}={v}")]


def _queued(job_id: str) -> dict[str, str]:
    return launch.squeue_states([job_id])


def test_embedded_sweep_as_job_array_then_rerun_submits_nothing(slurm, testbed_dir: str, tmp_path: Path, capsys):
    out = tmp_path / "sweep"
    argv = ["--p", "0,0.5,1", "--out", str(out), "--testbed-dir", testbed_dir, "--launcher", "slurm", *JOB]
    argv += fast_args()
    assert sweep_main(argv) == 0
    text = capsys.readouterr().out
    array_id = text.split("submitted Slurm job array ")[1].split(":")[0]
    ids = []
    for i, p in enumerate(("0", "0.5", "1")):
        state = json.loads((out / f"clip-embedded-p{p}" / "state.json").read_text())
        assert state["state"] == "finished" and state["launcher"] == "slurm", state
        assert state["job_id"] == f"{array_id}_{i}"  # one array, one task per point
        ids.append(state["job_id"])
        assert json.loads((out / f"clip-embedded-p{p}" / "metrics.json").read_text())["steps"] == 2
    report = (out / "report.md").read_text()
    assert "p" in report and (out / "report.csv").read_text().count("\n") == 4
    assert (out / "accuracy_vs_p.png").read_bytes()[:4] == b"\x89PNG"

    assert sweep_main(["status", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for jid in ids:
        assert jid in table
    assert table.count("finished") == 3

    # Same sweep again: nothing is submitted and the job ids stay.
    assert sweep_main(argv) == 0
    text = capsys.readouterr().out
    assert "nothing to submit" in text and "submitted Slurm job array" not in text
    states = [json.loads((out / f"clip-embedded-p{p}" / "state.json").read_text()) for p in ("0", "0.5", "1")]
    assert [s["job_id"] for s in states] == ids


def test_requeued_job_resumes_from_its_checkpoint(slurm, testbed_dir: str, tmp_path: Path, capsys):
    out = tmp_path / "sweep"
    argv = ["--p", "0.5", "--out", str(out), "--testbed-dir", testbed_dir, "--launcher", "slurm"]
    argv += ["--cpus-per-task", "2", "--mem-gb", "2", "--time", "20", "--max-requeues", "2"]
    argv += fast_args(samples_seen=16 * 8, checkpoint_every=2, keep_last=10)  # 8 steps
    assert sweep_main(argv) == 0
    run = out / "clip-embedded-p0.5"
    job_id = json.loads((run / "state.json").read_text())["job_id"]

    # Once a mid-run checkpoint exists, send submitit's timeout signal: the job checkpoints its
    # call, requeues itself (scontrol requeue) and exits.
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("step_*.pt")):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        assert _queued(job_id), f"job {job_id} ended before its first checkpoint"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    signalled_at = max(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))
    assert signalled_at < 8

    # Requeued jobs wait ~2 min (Slurm's BeginTime); release it now. Then wait for the end.
    requeued = False
    while _queued(job_id):
        assert time.monotonic() < deadline + 240, "requeued job did not finish"
        if json.loads((run / "state.json").read_text()).get("state") == "requeued":
            requeued = True
        if _queued(job_id).get(job_id) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(0.5)
    state = json.loads((run / "state.json").read_text())
    assert requeued and state["state"] == "finished" and state["requeues"] == 1, state
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 8
    logs = "".join(p.read_text() for p in (out / ".submitit").rglob("*_log.out"))
    assert "resuming from" in logs and "Requeued job" in (
        logs + "".join(p.read_text() for p in (out / ".submitit").rglob("*_log.err"))
    )


def test_two_task_job_gets_distinct_ranks_and_rendezvous(slurm, tmp_path: Path):
    res = launch.Resources(tasks_per_node=2, cpus_per_task=1, mem_gb=2, time_min=5)
    ex = launch.slurm_executor(tmp_path / "submitit" / "%j", res, max_requeues=0, name="ddp-probe")
    launch._job_env_path()
    job = ex.submit(launch.rendezvous_probe, str(tmp_path))
    deadline = time.monotonic() + 180
    while _queued(job.job_id):
        assert time.monotonic() < deadline, "probe job did not finish"
        time.sleep(0.5)
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["RANK"] for i in infos] == ["0", "1"] and {i["WORLD_SIZE"] for i in infos} == {"2"}
    assert {i["LOCAL_RANK"] for i in infos} == {"0", "1"}
    assert infos[0]["MASTER_ADDR"] == infos[1]["MASTER_ADDR"] and infos[0]["MASTER_PORT"] == infos[1]["MASTER_PORT"]
    assert all(i["all_reduce_sum"] == 3.0 for i in infos)  # 1 + 2: both tasks joined one gloo group


@pytest.mark.skipif(not get_task("clip").supports_distributed(), reason="clip_train has no DDP training yet")
def test_two_task_sweep_point_trains_with_ddp(slurm, testbed_dir: str, tmp_path: Path):
    out = tmp_path / "sweep"
    argv = ["--p", "0", "--out", str(out), "--testbed-dir", testbed_dir, "--launcher", "slurm"]
    argv += ["--tasks-per-node", "2", *JOB, *fast_args()]
    assert sweep_main(argv) == 0
    run = out / "clip-embedded-p0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2  # same global batch and step count as 1 process
    assert json.loads((run / "state.json").read_text())["state"] == "finished"


def test_unknown_partition_fails_before_any_work(slurm, tmp_path: Path, capsys):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exc:
        sweep_main(["--p", "0,1", "--out", str(out), "--launcher", "slurm", "--partition", "no-such-part"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--partition no-such-part" in err and "invalid partition" in err.lower()
    assert not out.exists()
    assert shutil.which("sbatch")
