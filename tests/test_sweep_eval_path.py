"""One evaluation path end to end: a sweep point and `python -m eval zeroshot` on its checkpoint give the same
per-task numbers, and a registry task given by path (an imbalanced Aircraft-like set) reaches the sweep's
Table 6 as mean per-class accuracy, not top-1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eval.__main__ import main as eval_main
from experiments.sweep_ratio import main as sweep_main
from testbed import EVAL_TASKS, TestbedConfig, build_testbed
from tests.test_eval import make_classification

TINY = TestbedConfig(num_train=384, shard_size=96, eval_per_class=2, eval_per_class_small=4, num_retrieval=16, seed=3)
FAST = {"batch_size": 32, "samples_seen": 320, "workers": 0, "checkpoint_every": 5, "log_every": 2, "warmup_steps": 2}
NUMBERS = ("acc1", "acc5", "mean_per_class_recall", "mean_recall@1", "num_samples")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path, str]:
    """(sweep folder, testbed root, eval task spec) after one embedded point at p=0.15."""
    base = tmp_path_factory.mktemp("sweep_eval")
    testbed = base / "testbed"
    build_testbed(testbed, TINY, progress=False)
    make_classification(base / "aircraft_like", seed=5)  # 6 classes, 2..9 images each
    spec = f"testbed,fgvc_aircraft={base / 'aircraft_like'}"
    argv = ["--p", "0.15", "--out", str(base / "sweep"), "--testbed-dir", str(testbed)]
    overrides = {**FAST, "eval_tasks": spec, "eval_dataset_root": str(testbed / "eval")}
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    assert sweep_main(argv) == 0
    return base / "sweep", testbed, spec


def test_sweep_and_eval_cli_give_identical_numbers(sweep, tmp_path):
    out, testbed, spec = sweep
    run = out / "clip-embedded-p0.15"
    swept = json.loads((run / "metrics.json").read_text())
    ckpt = run / swept["checkpoint"]
    argv = ["zeroshot", "--checkpoint", str(ckpt), "--model", "EmbeddedCLIP-Tiny", "--tasks", spec,
            "--dataset-root", str(testbed / "eval"), "--out", str(tmp_path / "cli"), "--p", "0.15",
            "--num-workers", "0"]  # fmt: skip
    assert eval_main(argv) == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())

    assert swept["schema"] == cli["schema"]
    assert set(swept["tasks"]) == set(cli["tasks"]) == {*EVAL_TASKS, "fgvc_aircraft"}
    for name, result in cli["tasks"].items():
        mine = swept["tasks"][name]
        assert mine["main_metric"] == result["main_metric"], name
        assert {k: mine.get(k) for k in NUMBERS} == {k: result.get(k) for k in NUMBERS}, name
        assert mine["precision"] == result["precision"] == "fp32"
    assert swept["summary"]["average"] == cli["summary"]["average"]


def _table6_cell(sweep_dir: Path, column: str) -> float:
    """The p=0.15 row's cell of `column` in the Table 6 CSV that `eval report` writes for a sweep folder."""
    assert eval_main(["report", str(sweep_dir), "--out", str(sweep_dir / "paper")]) == 0
    table6 = (sweep_dir / "paper" / "table6.csv").read_text().splitlines()
    header = table6[0].split(",")
    row = next(line.split(",") for line in table6[1:] if line.split(",")[header.index("label")] == "p=0.15")
    return float(row[header.index(column)])


def test_sweep_table6_scores_aircraft_by_mean_per_class(sweep, tmp_path):
    out, _, _ = sweep
    metrics = json.loads((out / "clip-embedded-p0.15" / "metrics.json").read_text())
    air = metrics["tasks"]["fgvc_aircraft"]
    assert air["main_metric"] == "mean_per_class_recall"
    assert _table6_cell(out, "Aircraft") == pytest.approx(100 * air["mean_per_class_recall"], abs=0.051)

    # A trained model can score the same on both metrics by chance; a copy of the sweep whose Aircraft numbers
    # are set apart shows which one the table reads.
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "paper"))
    air.update(acc1=0.125, mean_per_class_recall=0.625)
    (copy / "clip-embedded-p0.15" / "metrics.json").write_text(json.dumps(metrics))
    assert _table6_cell(copy, "Aircraft") == pytest.approx(62.5, abs=0.051)
