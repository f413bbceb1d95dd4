"""Seeds as a sweep axis: run-folder names, skip on rerun, Slurm array size, and reports with mean ± std."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from eval.results import summarize
from eval.seed_report import format_table, write_sweep_report
from eval.seeds import RULE, differs, format_delta, format_spread, spread
from experiments.status import finished_runs
from experiments.sweep_ratio import main as sweep_main
from experiments.sweep_ratio import parse_seed_list
from experiments.tasks import get_task
from testbed import TestbedConfig, build_testbed
from training.rundir import run_dir_for, seed_label

TINY = TestbedConfig(num_train=192, shard_size=96, eval_per_class=1, eval_per_class_small=2, num_retrieval=8, seed=4)
FAST = {"batch_size": 16, "samples_seen": 32, "workers": 0, "checkpoint_every": 1, "log_every": 1, "warmup_steps": 1}


def fast_args() -> list[str]:
    return [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def testbed_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("testbed")
    build_testbed(root, TINY, progress=False)
    return str(root)


def test_run_folders_carry_the_seed_and_seed_0_keeps_its_name(tmp_path: Path) -> None:
    assert seed_label(0) is None and seed_label(2) == "s2"
    assert run_dir_for(tmp_path, "clip", "embedded", 0.15, seed_label(0)).name == "clip-embedded-p0.15"
    assert run_dir_for(tmp_path, "clip", "embedded", 0.15, seed_label(1)).name == "clip-embedded-p0.15-s1"
    for task in ("clip", "t2i"):
        t = get_task(task)
        names = {s: t.run_dir_for(tmp_path, t.load_config("embedded", {"p": 1.0, "seed": s})).name for s in (0, 3)}
        assert names == {0: f"{task}-embedded-p1", 3: f"{task}-embedded-p1-s3"}
    with pytest.raises(ValueError, match="run label"):
        run_dir_for(tmp_path, "clip", "embedded", 0.15, "s/1")


def test_seed_flag_parsing_names_the_flag(tmp_path: Path, capsys) -> None:
    assert parse_seed_list(None) is None
    assert parse_seed_list("2, 0,2,1") == [2, 0, 1]
    for bad in ("", "0,,1", "-1", "a", "1.5"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seed_list(bad)
    base = ["--p", "0", "--out", str(tmp_path / "s"), "--dry-run"]
    for extra, needle in ((["--seeds", "x"], "--seeds"), (["--seeds", "0,1", "--set", "seed=3"], "--set seed")):
        with pytest.raises(SystemExit) as exc:
            sweep_main(base + extra)
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_slurm_dry_run_asks_for_one_array_of_points_times_seeds(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = ["--p", "0,0.15,1", "--seeds", "0,1", "--out", str(out), "--launcher", "slurm", "--dry-run"]
    assert sweep_main([*argv, "--partition", "gpu"]) == 0
    text = capsys.readouterr().out
    assert text.count("would run") == 6 and "6 job(s) as one Slurm job array" in text
    assert "--array=0-5" in text
    for name in ("clip-embedded-p0", "clip-embedded-p0-s1", "clip-embedded-p0.15-s1", "clip-embedded-p1-s1"):
        assert f"{name}: would run" in text, name
    assert "p=0.15 seed=1" in text and not out.exists()


def test_seed_sweep_runs_every_pair_reports_spread_and_skips_on_rerun(testbed_dir: str, tmp_path: Path, capsys):
    out = tmp_path / "sweep"
    argv = ["--p", "0.5", "--seeds", "0,1", "--out", str(out), "--testbed-dir", testbed_dir, *fast_args()]
    assert sweep_main(argv) == 0
    capsys.readouterr()
    names = {0: "clip-embedded-p0.5", 1: "clip-embedded-p0.5-s1"}
    runs = {s: json.loads((out / name / "metrics.json").read_text()) for s, name in names.items()}
    assert {s: m["seed"] for s, m in runs.items()} == {0: 0, 1: 1}
    manifest = json.loads((out / "sweep.json").read_text())
    assert [(pt["p"], pt["seed"]) for pt in manifest["points"]] == [(0.5, 0), (0.5, 1)]
    # One p with two seeds is a sweep worth a report: mean ± std of the two runs.
    md = (out / "report.md").read_text()
    averages = [summarize(m["tasks"])["average"] for m in runs.values()]
    want = format_spread(spread(averages))
    row = next(line for line in md.splitlines() if line.startswith("| 0.5 | 0,1 |"))
    assert row.rstrip(" |").endswith(want) and "±" in want
    assert RULE in md

    assert sweep_main(["status", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["p", "seed", "run_dir"] and [ln.split()[1] for ln in lines[1:3]] == ["0", "1"]

    # The same sweep again runs nothing; one more seed runs only the new pair.
    assert sweep_main(argv) == 0
    assert capsys.readouterr().out.count("skip (finished)") == 2
    argv[3] = "0,1,2"
    assert sweep_main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.count("skip (finished)") == 2 and "clip-embedded-p0.5-s2: would run (new)" in text


def _run(p: float, seed: int, values: dict[str, float]) -> dict:
    tasks = {t: {"status": "ok", "acc1": v, "mean_recall@1": v} for t, v in values.items()}
    return {"p": p, "seed": seed, "label": f"p={p:g}", "tasks": tasks, "run_dir": f"r{p}-{seed}"}


def test_report_aggregates_seeds_with_std_and_marks_only_what_exceeds_the_spread(tmp_path: Path) -> None:
    # color: p=1 is 30 points above p=0 with a spread of ~1 -> marked; concept: +1 with a spread of ~5 -> not.
    color = {0.0: [0.20, 0.21, 0.22], 1.0: [0.50, 0.51, 0.52]}
    concept = {0.0: [0.30, 0.40, 0.35], 1.0: [0.36, 0.31, 0.41]}
    runs = [_run(p, s, {"concept": concept[p][s], "color": color[p][s]}) for p in (0.0, 1.0) for s in range(3)]
    paths = write_sweep_report(runs, tmp_path / "report", title="seeds", notice="testbed")
    md = paths["markdown"].read_text()
    mean_row = next(line for line in md.splitlines() if line.startswith("| 0 | 0,1,2"))
    assert f"{100 * statistics.fmean(color[0.0]):.1f} ± {100 * statistics.stdev(color[0.0]):.1f}" in mean_row
    deltas = [line for line in md.splitlines() if line.startswith("| 1 | 0,1,2")][-1]
    cells = [c.strip() for c in deltas.strip().strip("|").split("|")]
    assert cells[2] == "+1.0" and cells[3] == "+30.0 *"  # concept within the spread, color beyond it
    assert RULE in md

    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["p"]) for r in table] == [0.0, 1.0] and table[0]["seeds"] == "0;1;2"
    assert float(table[1]["color (acc1) std (%)"]) == pytest.approx(100 * statistics.stdev(color[1.0]))
    assert int(table[1]["average n"]) == 3
    per_run = list(csv.DictReader(paths["runs_csv"].open()))
    assert [(r["p"], r["seed"]) for r in per_run] == [(repr(p), str(s)) for p in (0.0, 1.0) for s in range(3)]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert format_table(runs) in md


def test_spread_rule_and_single_seed_reports() -> None:
    a, b = spread([0.5, 0.52, 0.54]), spread([0.40, 0.41, 0.42])
    assert a.std == pytest.approx(0.02) and differs(a, b) is True
    assert differs(a, spread([0.49, 0.51, 0.53])) is False
    assert differs(a, spread([0.1])) is None  # one seed: the spread is unknown, nothing is marked
    assert format_delta(spread([0.1]), a) == "-42.0" and format_spread(spread([None, math.nan])) == "—"
    # The same seed twice at one p is not a repeat: refused, naming p and the seed.
    with pytest.raises(ValueError, match="p=0.5 has 2 runs with seed 1"):
        format_table([_run(0.5, 1, {"color": 0.1}), _run(0.5, 1, {"color": 0.2})])


def test_single_seed_report_adds_testbed_groups_and_says_nothing_is_marked(tmp_path: Path) -> None:
    values = {"concept": 0.3, "concept_bird": 0.5, "color": 0.8, "count": 0.4, "category": 0.6, "retrieval": 0.2}
    runs = [_run(0.0, 0, values), _run(1.0, 0, {**values, "color": 0.9})]
    md = write_sweep_report(runs, tmp_path / "r")["markdown"].read_text()
    assert "## Groups" in md and "concepts (9 tasks)" in md and "no difference between p values" in md
    row = next(line for line in md.splitlines() if line.startswith("| 1 | 0 |"))
    assert [c.strip() for c in row.strip().strip("|").split("|")][2:5] == ["40.0", "63.3", "20.0"]


def test_finished_runs_carry_the_seed_of_each_point(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps({"state": "finished"}))
        (tmp_path / name / "metrics.json").write_text(json.dumps({"p": 0.1, "seed": seed, "tasks": {}}))
    points = [{"p": 0.1, "run_dir": "a", "seed": 0}, {"p": 0.1, "run_dir": "b"}]  # b: a sweep.json before seeds
    runs = finished_runs(tmp_path, points)
    assert [(r["seed"], r["label"]) for r in runs] == [(0, "p=0.1"), (4, "p=0.1")]


def test_t2i_report_aggregates_seeds(tmp_path: Path) -> None:
    from t2i.report import format_table as t2i_table

    def run(p: float, seed: int, orig: float, syn: float) -> dict:
        return {"p": p, "seed": seed, "clip_score": {"original": orig, "synthetic": syn}, "eval_prompts": 8}

    runs = [run(0.0, 0, 20.0, 21.0), run(0.0, 1, 22.0, 21.5), run(1.0, 0, 30.0, 21.0), run(1.0, 1, 30.5, 22.0)]
    table = t2i_table(runs)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1].split("|")[2].strip() == "0,1" and "21.0 ± 1.4" in rows[1]
    cells = [c.strip() for c in rows[2].strip().strip("|").split("|")]
    assert cells[2] == "30.2 ± 0.4" and cells[4] == "+9.2 *" and cells[5] == "+0.2"
    assert RULE in table


def test_paper_layout_tells_seeds_apart_and_adds_mean_and_std(tmp_path: Path) -> None:
    from eval.paper_report import write_report

    runs = [_run(p, s, {"imagenet1k": 0.3 + p / 10 + s / 100, "cifar10": 0.5}) for p in (0.0, 1.0) for s in (0, 1)]
    md = write_report(runs, tmp_path / "r")["markdown"].read_text()
    assert "| 0 | p=0 s1 |" in md and "| 1 | p=1 s0 |" in md  # Table 6 rows, one per run
    assert "## Mean ± std over seeds" in md and RULE in md
    row = next(line for line in md.splitlines() if line.startswith("| 1 | 0,1 |"))
    assert "40.5 ± 0.7" in row  # imagenet1k at p=1: 0.40 and 0.41
