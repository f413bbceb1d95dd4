"""One evaluation path end to end: a sweep point and `python -m eval zeroshot` on its checkpoint give the same
per-task numbers, and a registry task given by path (an imbalanced Aircraft-like set) reaches the sweep's
Table 6 as mean per-class accuracy, not top-1."""

from __future__ import annotations

import json
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


def test_sweep_table6_scores_aircraft_by_mean_per_class(sweep):
    out, _, _ = sweep
    metrics = json.loads((out / "clip-embedded-p0.15" / "metrics.json").read_text())
    air = metrics["tasks"]["fgvc_aircraft"]
    assert air["main_metric"] == "mean_per_class_recall"
    assert air["acc1"] != air["mean_per_class_recall"]  # the imbalance makes the two differ

    assert eval_main(["report", str(out), "--out", str(out / "paper")]) == 0
    table6 = (out / "paper" / "table6.csv").read_text().splitlines()
    header = table6[0].split(",")
    row = next(line.split(",") for line in table6[1:] if line.split(",")[header.index("label")] == "p=0.15")
    cell = float(row[header.index("Aircraft")])
    assert cell == pytest.approx(100 * air["mean_per_class_recall"], abs=0.051)
    assert cell != pytest.approx(100 * air["acc1"], abs=0.051)
