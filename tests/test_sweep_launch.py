"""Sweep launching without a cluster: dry runs, flag parsing, job shapes, code snapshots, local jobs, state, status."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experiments import resources, snapshot, submit
from experiments.job import PointJob, PointSpec
from experiments.resources import Resources
from experiments.state import read_state, update_state
from experiments.sweep_ratio import main as sweep_main
from experiments.tasks import get_task
from testbed import TestbedConfig, build_testbed

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
    res = resources.job_resources(get_task("clip").preset_dir, "embedded")
    assert res.sec_per_step == 0.5 and "'embedded' preset" in resources.sec_per_step_estimate(cfg, [], res)[1]
    sps, source = resources.sec_per_step_estimate(cfg, [run], res)
    assert sps == pytest.approx(2.0) and "train_log.jsonl" in source
    res = Resources(time_min=1, signal_delay_s=30)
    assert "train_log.jsonl" in resources.time_limit_warning(cfg, res, [run])
    # --sec-per-step wins over a measurement.
    res = Resources(time_min=1, signal_delay_s=30, sec_per_step=0.01, sec_per_step_source=resources.FLAG_SOURCE)
    assert resources.time_limit_warning(cfg, res, [run]) is None


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
    assert resources.parse_time_min("90") == 90
    assert resources.parse_time_min("1:30:00") == 90
    assert resources.parse_time_min("10:30") == 11  # MM:SS, rounded up
    assert resources.parse_time_min("2-12") == 3600
    assert resources.parse_time_min("1-00:00:01") == 1441
    with pytest.raises(ValueError, match="--time"):
        resources.parse_time_min("0")
    assert resources.parse_sbatch_extra(["exclusive", "--mail-type=END", "gres=gpu:2"]) == {
        "exclusive": True,
        "mail_type": "END",
        "gres": "gpu:2",
    }
    with pytest.raises(ValueError, match="--sbatch"):
        resources.parse_sbatch_extra(["a b=1"])


def test_local_gpu_slots_never_share_a_gpu(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7,8")
    assert submit.local_slots(Resources(gpus_per_node=2)) == [(4, 5), (6, 7)]
    assert submit.local_slots(Resources(gpus_per_node=1, max_parallel=3)) == [(4,), (5,), (6,)]
    with pytest.raises(ValueError, match="--gpus-per-node 6"):
        submit.local_slots(Resources(gpus_per_node=6))
    with pytest.raises(ValueError, match="--nodes 2"):
        submit.local_slots(Resources(nodes=2))
    assert all(s == () for s in submit.local_slots(Resources(gpus_per_node=0, cpus_per_task=1)))


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
        # The job imported the code snapshot taken at submission, not the checkout.
        assert Path(state["code"]["dir"]).parent == out / ".code" and state["code_ran_from"] == state["code"]["dir"]
    assert (out / "report.md").exists() and (out / "report.csv").exists()
    manifest = json.loads((out / "sweep.json").read_text())
    assert [pt["p"] for pt in manifest["points"]] == [0.0, 1.0]
    assert manifest["code"] == state["code"] and manifest["code"]["commit"] == snapshot.describe().commit

    assert sweep_main(["status", "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["p", "seed", "run_dir", "state", "job_id"]
    assert [line.split()[3] for line in table[1:3]] == ["finished", "finished"]

    # Same sweep again: nothing runs. A different config in the same folder is refused as a whole.
    assert sweep_main(argv) == 0
    text = capsys.readouterr().out
    assert "local job" not in text and text.count("skip (finished)") == 2
    assert sweep_main([*argv, "--set", "lr=1.234e-3"]) == 2
    assert "different config" in capsys.readouterr().err
    assert sweep_main([*argv, "--set", "lr=1.234e-3", "--force", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("would run") == 2


def test_status_of_a_folder_that_is_not_a_sweep(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        sweep_main(["status", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def _spec(tmp_path: Path, max_requeues: int = 1) -> PointSpec:
    run = tmp_path / "sweep" / "clip-embedded-p0"
    config = {"preset": "embedded", "p": 0.0}
    return PointSpec("clip", config, str(run.parent), str(run), "h", max_requeues=max_requeues)


def test_requeues_are_bounded_by_max_requeues(tmp_path: Path) -> None:
    job = PointJob(_spec(tmp_path, max_requeues=1))
    run = Path(job.spec.run_dir)
    assert job.checkpoint() is not None  # submitit requeues the same call
    assert read_state(run)["state"] == "requeued" and read_state(run)["requeues"] == 1
    assert job.checkpoint() is None  # the 2nd preemption: submitit ends the job instead
    state = read_state(run)
    assert state["state"] == "failed" and state["requeues"] == 1
    assert "not requeued" in state["error"] and "--max-requeues 1" in state["error"]


def test_trainer_signals_include_submitits(monkeypatch) -> None:
    import signal

    from training.preemption import preempt_signals

    assert {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2} <= set(preempt_signals())
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "HUP")
    assert signal.SIGHUP in preempt_signals()


def test_preempted_point_hands_submitits_signal_back_after_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import signal

    from training.preemption import Preempted

    job = PointJob(_spec(tmp_path))
    run = Path(job.spec.run_dir)
    error = Preempted(3, run / "checkpoints" / "step_00000003.pt", signal.SIGUSR2)

    # A plain run (no submitit): the state says requeued at step 3 and the error goes up (exit 75 in the CLI).
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    with pytest.raises(Preempted):
        job._preempted(error, rank=0)
    assert read_state(run)["state"] == "requeued" and read_state(run)["preempted_at_step"] == 3

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
    update_state(out / "t2i-embedded-p0", state="finished", launcher="inprocess", job_id=None)
    update_state(out / "t2i-embedded-p1", state="failed", launcher="local", job_id="123", error="boom")
    (out / "t2i-embedded-p1" / "checkpoints").mkdir()
    (out / "t2i-embedded-p1" / "checkpoints" / "step_00000040.pt").write_bytes(b"")
    assert sweep_main(["status", "--out", str(out)]) == 0
    rows = capsys.readouterr().out.splitlines()
    # A sweep.json written before seeds were an axis names no seed: shown as "-".
    assert rows[1].split()[:4] == ["0", "-", "t2i-embedded-p0", "finished"]
    assert rows[2].split()[:7] == ["1", "-", "t2i-embedded-p1", "failed", "123", "0", "step_00000040"]
    assert rows[2].endswith("boom")


# ---------------------------------------------------------------------------------------------
# One rendering of resources, job shapes in the presets, package data, code snapshots, --out
# ---------------------------------------------------------------------------------------------


def _sbatch_lines(script: str) -> set[str]:
    return {line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")}


def test_one_rendering_feeds_submission_test_only_and_dry_run(tmp_path: Path, monkeypatch) -> None:
    """What the dry run shows, what sbatch --test-only checks and what submitit submits are the same options."""
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    from experiments import scheduler

    res = Resources(nodes=2, gpus_per_node=4, tasks_per_node=4, cpus_per_task=6, mem_gb=64, time_min=90)
    res.partition, res.account, res.qos, res.constraint, res.max_parallel = "gpu", "acct", "high", "a100", 2
    res.extra = resources.parse_sbatch_extra(["exclusive", "mail-type=END", "gres=gpu:4", "setup=x"])
    args = resources.sbatch_args(res, 3)
    assert "--mem=65536M" in args and "--array=0-2%2" in args and "--requeue" in args and "--setup=x" in args

    # submitit's own sbatch file for a 3-job array, from the executor's parameters: exactly these options.
    params = resources.executor_params(res, "sweep-clip")
    script = _make_sbatch_string(command="true", folder=tmp_path / "%j", map_count=3, **params)
    own = {"--job-name=sweep-clip", "--open-mode=append", "--wckey=submitit"}  # submitit's, not a resource
    own |= {line for line in _sbatch_lines(script) if line.startswith(("--output=", "--error="))}
    assert _sbatch_lines(script) - own == set(args)

    # The executor the launcher builds writes that file, plus the code snapshot's setup lines.
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun here
    code = snapshot.CodeSnapshot(commit="abc", dirty=False, dir=str(tmp_path / "code dir"))
    ex = submit.slurm_executor(tmp_path / "%j", res, 1, "sweep-clip", code=code)
    text = ex._make_submission_file_text("true", "uid")
    assert set(args) - {"--array=0-2%2"} <= _sbatch_lines(text)
    assert f"cd '{tmp_path / 'code dir'}'" in text and "export PYTHONPATH=" in text

    # sbatch --test-only gets the same arguments; the dry run prints them.
    calls: list[list[str]] = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(scheduler, "slurm_available", lambda: True)
    monkeypatch.setattr(scheduler.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    scheduler.validate_slurm(res, 3)
    assert calls == [["sbatch", "--test-only", *args, "--wrap=true"]]
    described = submit.describe_submission(res, "slurm", 3).splitlines()
    assert [line.removeprefix("  sbatch ") for line in described[1:]] == args


def _raw_preset(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("task_name", ["clip", "t2i"])
def test_every_preset_carries_a_job_shape_that_fits_its_batch(task_name: str) -> None:
    from caption_mixing import presets

    task = get_task(task_name)
    names = presets.list_presets(task.preset_dir)
    assert "embedded" in names and len(names) >= 3
    for name in names:
        raw = _raw_preset(task.preset_dir / f"{name}.yaml")
        res = resources.job_resources(task.preset_dir, name)
        assert {k: getattr(res, k) for k in resources.JOB_KEYS} == raw["job"], name
        # One process per GPU, and the global batch splits evenly over the ranks.
        assert res.gpus_per_node in (0, res.tasks_per_node), name
        accum = raw.get("accum_freq", raw.get("grad_accum", 1))
        assert raw["batch_size"] % (res.world_size * accum) == 0, (name, res.world_size)
    # The config loader skips the block; it is not a config key.
    cfg = task.load_config("embedded", {})
    assert "job" not in cfg.to_dict() and task.config_dict(cfg)["preset"] == "embedded"


def test_job_shape_of_a_yaml_preset_defaults_and_bad_keys_name_the_preset(tmp_path: Path, capsys) -> None:
    import yaml

    task = get_task("clip")
    raw = _raw_preset(task.preset_dir / "embedded.yaml")
    plain = tmp_path / "mine.yaml"
    plain.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "job"}))
    assert resources.job_resources(task.preset_dir, str(plain)) == Resources()
    assert task.load_config(str(plain), {}).preset == str(plain)

    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump({**raw, "job": {"nodes": 3, "gpus_per_node": 2, "time_min": "1:00:00"}}))
    res = resources.job_resources(task.preset_dir, str(big))
    assert (res.nodes, res.gpus_per_node, res.time_min, res.cpus_per_task) == (3, 2, 60, Resources().cpus_per_task)
    assert sweep_main(["--preset", str(big), "--out", str(tmp_path / "s"), "--launcher", "slurm", "--dry-run"]) == 0
    assert "--nodes=3" in capsys.readouterr().out

    for job, needle in (({"gpus": 1}, "unknown job key 'gpus'"), ({"nodes": 0}, "job.nodes=0"), ([1], "mapping")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**raw, "job": job}))
        with pytest.raises(ValueError, match=needle):
            resources.job_resources(task.preset_dir, str(bad))
        with pytest.raises(SystemExit) as exc:
            sweep_main(["--preset", str(bad), "--out", str(tmp_path / "s"), "--launcher", "slurm", "--dry-run"])
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_package_data_and_console_script_are_declared() -> None:
    """A non-editable install carries the presets, eval data and the experiments package (pyproject says so)."""
    import fnmatch
    import importlib
    import importlib.resources

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert any(fnmatch.fnmatch("experiments", pat) for pat in setuptools["packages"]["find"]["include"])
    for pkg, pattern in (("clip_train", "presets/*.yaml"), ("t2i", "presets/*.yaml"), ("eval", "data/*.json")):
        assert pattern in setuptools["package-data"][pkg], pkg
        folder, glob = pattern.split("/")
        files = [f.name for f in (importlib.resources.files(pkg) / folder).iterdir()]
        assert fnmatch.filter(files, glob), (pkg, pattern)
    for name in ("embedded.yaml", "dit-xl-2.yaml"):
        assert (importlib.resources.files("t2i") / "presets" / name).is_file()
    eval_data = {f.name for f in (importlib.resources.files("eval") / "data").iterdir()}
    assert {"classnames.json", "templates.json"} <= eval_data
    module, func = project["project"]["scripts"]["caption-mixing-sweep"].split(":")
    assert getattr(importlib.import_module(module), func) is sweep_main


def test_code_snapshot_holds_the_checkout_and_jobs_import_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = snapshot.source_root()
    if not snapshot.git_checkout(root):
        pytest.skip("not a git checkout")
    snap = snapshot.take(tmp_path / "out")
    info = snapshot.read_info(Path(snap.dir))
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True).stdout
    assert snap.commit == info["commit"] == head.strip() and snap.dirty == bool(dirty.strip())
    assert Path(snap.dir).parent == tmp_path / "out" / ".code" and Path(snap.dir).name.startswith(head[:12])
    for rel in ("experiments/job.py", "caption_mixing/presets.py", "clip_train/presets/embedded.yaml", "README.md"):
        assert (Path(snap.dir) / rel).read_bytes() == (root / rel).read_bytes(), rel
    assert snapshot.take(tmp_path / "out") == snap  # the same code: the same snapshot, reused
    # A job's setup lines make it, and the processes it starts from the checkout folder, import the snapshot.
    probe = f"{sys.executable} -c 'import experiments.job as j; print(j.__file__)'"
    script = "; ".join([*snap.job_setup(), probe, f"cd {root}", probe])
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.stdout.split() == [str(Path(snap.dir) / "experiments" / "job.py")] * 2, proc.stderr

    # Outside git (an installed copy): the project's packages are copied, no commit.
    fake = tmp_path / "site"
    (fake / "experiments").mkdir(parents=True)
    (fake / "experiments" / "x.py").write_text("X = 1\n")
    (fake / "other_pkg").mkdir()
    (fake / "other_pkg" / "y.py").write_text("")
    snap = snapshot.take(tmp_path / "out2", root=fake)
    assert (snap.commit, snap.dirty) == (None, None) and (Path(snap.dir) / "experiments" / "x.py").exists()
    assert not (Path(snap.dir) / "other_pkg").exists()


def test_resolved_config_travels_to_the_job_and_a_changed_one_is_refused(tmp_path: Path, monkeypatch) -> None:
    for name in ("clip", "t2i"):
        task = get_task(name)
        cfg = task.load_config("embedded", {"p": 0.3, "seed": 4})
        fields = json.loads(json.dumps(task.config_dict(cfg)))  # plain values
        assert "steps" not in fields and fields["p"] == 0.3
        again = task.from_dict(fields)
        assert again == cfg and task.config_hash(again) == task.config_hash(cfg)
        assert task.from_dict(cfg.to_dict()) == cfg  # derived keys are dropped

    # A job whose code rebuilds a different config stops before training, and says why.
    job = PointJob(_spec(tmp_path))
    with pytest.raises(RuntimeError, match="hashes to"):
        job()
    state = read_state(Path(job.spec.run_dir))
    assert state["state"] == "failed" and "resolves configs differently" in state["error"]

    # A job works in the sweep's folder (it starts in its code snapshot): a relative preset path still resolves.
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    (work / "mine.yaml").write_text((get_task("clip").preset_dir / "embedded.yaml").read_text())
    monkeypatch.chdir(elsewhere)
    spec = dataclasses.replace(_spec(tmp_path), config={"preset": "mine.yaml", "p": 0.0}, workdir=str(work))
    with pytest.raises(RuntimeError, match="hashes to"):  # rebuilt (else: "neither a preset nor a YAML file")
        PointJob(spec)()
    assert Path.cwd() == elsewhere


@pytest.mark.parametrize("extra", [["--dry-run"], ["--launcher", "local", "--dry-run"], []])
def test_out_naming_a_file_is_refused_and_nothing_is_written(tmp_path: Path, capsys, extra: list[str]) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        sweep_main(["--p", "0,1", "--out", str(target), *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--out" in err and str(target) in err and "Traceback" not in err
    assert target.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [target]
