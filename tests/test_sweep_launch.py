"""Sweep launching without a cluster: dry runs, flag parsing, local submitit jobs, state and status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caption_mixing.testbed import TestbedConfig, build_testbed
from experiments import launch
from experiments.sweep_ratio import main as sweep_main
from experiments.tasks import get_task

TINY = TestbedConfig(num_train=384, shard_size=96, eval_per_class=2, eval_per_class_small=4, num_retrieval=16, seed=3)
# 2 steps of 16: the 2 shared cores run a step in 1-3 s under load.
FAST = {"batch_size": 16, "samples_seen": 32, "workers": 0, "checkpoint_every": 1, "log_every": 1, "warmup_steps": 1}


def fast_args() -> list[str]:
    return [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def testbed_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("testbed")
    build_testbed(root, TINY, progress=False)
    return str(root)


def test_dry_run_merges_duplicates_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = ["--p", "0,0.15,0,1", "--out", str(out), "--launcher", "slurm", "--dry-run"]
    argv += ["--partition", "gpu", "--account", "acct", "--qos", "high", "--constraint", "a100"]
    argv += ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6", "--mem-gb", "64", "--time", "1-00:00:00"]
    argv += ["--sbatch", "exclusive", "--sbatch", "mail-type=END", "--max-parallel", "2"]
    assert sweep_main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("would run") == 3  # 0 appears twice, merged
    for expected in (
        "--partition=gpu",
        "--account=acct",
        "--qos=high",
        "--constraint=a100",
        "--nodes=2",
        "--gpus-per-node=4",
        "--cpus-per-task=6",
        "--mem=65536M",
        "--time=1440",
        "--array=0-2%2",
        "--exclusive",
        "--mail-type=END",
    ):
        assert expected in text, expected
    assert "nothing submitted" in text
    assert not out.exists()


def test_time_limit_shorter_than_a_checkpoint_interval_warns(tmp_path: Path, capsys) -> None:
    argv = ["--p", "0", "--out", str(tmp_path / "s"), "--launcher", "slurm", "--dry-run", "--time", "2"]
    assert sweep_main([*argv, "--set", "checkpoint_every=1000"]) == 0
    err = capsys.readouterr().err
    assert "warning: --time 2 min" in err and "checkpoint_every=1000" in err
    assert sweep_main([*argv, "--set", "checkpoint_every=10", "--signal-delay-s", "30"]) == 0
    assert "warning" not in capsys.readouterr().err

    # A measured rate in an earlier run's train_log.jsonl wins over the preset's guess.
    cfg = get_task("clip").load_config("embedded", {"batch_size": 100, "checkpoint_every": 20})
    run = tmp_path / "prev"
    run.mkdir()
    (run / "train_log.jsonl").write_text(json.dumps({"step": 2, "samples_per_s": 50.0}) + "\n")
    sps, source = launch.sec_per_step_estimate(cfg, [run], "embedded")
    assert sps == pytest.approx(2.0) and "train_log.jsonl" in source
    res = launch.Resources(time_min=1, signal_delay_s=30)
    assert "train_log.jsonl" in launch.time_limit_warning(cfg, res, [run], "embedded")


def test_bad_flags_name_the_flag(tmp_path: Path, capsys) -> None:
    base = ["--p", "0", "--out", str(tmp_path / "s"), "--launcher", "slurm", "--dry-run"]
    for extra, flag in (
        (["--time", "soon"], "--time"),
        (["--sbatch", "=x"], "--sbatch"),
        (["--nodes", "0"], "--nodes"),
        (["--mem-gb", "-1"], "--mem-gb"),
        (["--max-requeues", "-1"], "--max-requeues"),
    ):
        with pytest.raises(SystemExit) as exc:
            sweep_main(base + extra)
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err, flag
    with pytest.raises(SystemExit):
        sweep_main(["--p", "0", "--out", str(tmp_path / "s"), "--wait"])
    assert "--wait" in capsys.readouterr().err


def test_parse_time_and_sbatch_options() -> None:
    assert launch.parse_time_min("90") == 90
    assert launch.parse_time_min("1:30:00") == 90
    assert launch.parse_time_min("10:30") == 11  # MM:SS, rounded up
    assert launch.parse_time_min("2-12") == 3600
    assert launch.parse_time_min("1-00:00:01") == 1441
    with pytest.raises(ValueError, match="--time"):
        launch.parse_time_min("0")
    assert launch.parse_sbatch_extra(["exclusive", "--mail-type=END", "gres=gpu:2"]) == {
        "exclusive": True,
        "mail_type": "END",
        "gres": "gpu:2",
    }
    with pytest.raises(ValueError, match="--sbatch"):
        launch.parse_sbatch_extra(["a b=1"])


def test_local_gpu_slots_never_share_a_gpu(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7,8")
    assert launch.local_slots(launch.Resources(gpus_per_node=2)) == [(4, 5), (6, 7)]
    assert launch.local_slots(launch.Resources(gpus_per_node=1, max_parallel=3)) == [(4,), (5,), (6,)]
    with pytest.raises(ValueError, match="--gpus-per-node 6"):
        launch.local_slots(launch.Resources(gpus_per_node=6))
    with pytest.raises(ValueError, match="--nodes 2"):
        launch.local_slots(launch.Resources(nodes=2))
    assert all(s == () for s in launch.local_slots(launch.Resources(gpus_per_node=0, cpus_per_task=1)))


def test_tasks_resolve_to_their_own_code_and_unknown_tasks_are_named() -> None:
    import clip_train.experiment
    import t2i.experiment

    assert get_task("t2i").run_point is t2i.experiment.run_point
    assert get_task("clip").run_point is clip_train.experiment.run_point
    with pytest.raises(ValueError, match="--task: unknown task 'dit'; choose from clip, t2i"):
        get_task("dit")


def test_local_launcher_sweep_state_status_and_rerun(testbed_dir: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = ["--p", "0,1", "--out", str(out), "--testbed-dir", testbed_dir, "--launcher", "local"]
    argv += ["--cpus-per-task", "1", "--time", "30", *fast_args()]
    assert sweep_main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("local job") == 2
    for p in ("0", "1"):
        run = out / f"clip-embedded-p{p}"
        state = json.loads((run / "state.json").read_text())
        assert state["state"] == "finished" and state["launcher"] == "local" and state["steps"] == 2
        assert state["config_hash"] == json.loads((run / "config.json").read_text())["config_hash"]
        assert state["job_id"] and state["started_at"] <= state["finished_at"]
        assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert (out / "report.md").exists() and (out / "report.csv").exists()
    manifest = json.loads((out / "sweep.json").read_text())
    assert [pt["p"] for pt in manifest["points"]] == [0.0, 1.0]

    assert sweep_main(["status", "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["p", "run_dir", "state", "job_id"]
    assert [line.split()[2] for line in table[1:3]] == ["finished", "finished"]

    # Same sweep again: nothing runs. A different config in the same folder is refused as a whole.
    assert sweep_main(argv) == 0
    text = capsys.readouterr().out
    assert "local job" not in text and text.count("skip (finished)") == 2
    assert sweep_main([*argv, "--set", "lr=5e-4"]) == 2
    assert "different config" in capsys.readouterr().err
    assert sweep_main([*argv, "--set", "lr=5e-4", "--force", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("would run") == 2


def test_status_of_a_folder_that_is_not_a_sweep(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        sweep_main(["status", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def _spec(tmp_path: Path, max_requeues: int = 1) -> launch.PointSpec:
    run = tmp_path / "sweep" / "clip-embedded-p0"
    args = ("clip", "embedded", {"p": 0.0}, str(run.parent), str(run), 0.0, "h")
    return launch.PointSpec(*args, max_requeues=max_requeues)


def test_requeues_are_bounded_by_max_requeues(tmp_path: Path) -> None:
    job = launch.PointJob(_spec(tmp_path, max_requeues=1))
    run = Path(job.spec.run_dir)
    assert job.checkpoint() is not None  # submitit requeues the same call
    assert launch.read_state(run)["state"] == "requeued" and launch.read_state(run)["requeues"] == 1
    assert job.checkpoint() is None  # the 2nd preemption: submitit ends the job instead
    state = launch.read_state(run)
    assert state["state"] == "failed" and state["requeues"] == 1
    assert "not requeued" in state["error"] and "--max-requeues 1" in state["error"]


def test_trainer_signals_include_submitits(monkeypatch) -> None:
    import signal

    from clip_train.preemption import preempt_signals

    assert {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2} <= set(preempt_signals())
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "HUP")
    assert signal.SIGHUP in preempt_signals()


def test_preempted_point_hands_submitits_signal_back_after_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import signal

    from clip_train.preemption import Preempted

    job = launch.PointJob(_spec(tmp_path))
    run = Path(job.spec.run_dir)
    error = Preempted(3, run / "checkpoints" / "step_00000003.pt", signal.SIGUSR2)

    # A plain run (no submitit): the state says requeued at step 3 and the error goes up (exit 75 in the CLI).
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    with pytest.raises(Preempted):
        job._preempted(error, rank=0)
    assert launch.read_state(run)["state"] == "requeued" and launch.read_state(run)["preempted_at_step"] == 3

    # In a submitit job: submitit's handler gets the signal now that the checkpoint exists.
    got: list[int] = []

    def submitit_handler(signum: int, frame: object) -> None:
        got.append(signum)
        raise SystemExit(-1)  # as submitit's handler does after requeueing

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    old = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            job._preempted(error, rank=0)
        # SIGTERM is Slurm's own preemption/requeue: nothing to hand on, Slurm requeues.
        with pytest.raises(Preempted):
            job._preempted(Preempted(4, None, signal.SIGTERM), rank=0)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert got == [signal.SIGUSR2]


def test_status_of_a_t2i_sweep(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    points = [{"p": p, "run_dir": f"t2i-embedded-p{p:g}", "config_hash": "h"} for p in (0.0, 1.0)]
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"task": "t2i", "preset": "embedded", "points": points}))
    launch.update_state(out / "t2i-embedded-p0", state="finished", launcher="inprocess", job_id=None)
    launch.update_state(out / "t2i-embedded-p1", state="failed", launcher="local", job_id="123", error="boom")
    (out / "t2i-embedded-p1" / "checkpoints").mkdir()
    (out / "t2i-embedded-p1" / "checkpoints" / "step_00000040.pt").write_bytes(b"")
    assert sweep_main(["status", "--out", str(out)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:3] == ["0", "t2i-embedded-p0", "finished"]
    assert rows[2].split()[:6] == ["1", "t2i-embedded-p1", "failed", "123", "0", "step_00000040"]
    assert rows[2].endswith("boom")
