"""One evaluation path: a registry task given as NAME=PATH keeps its metric from run_suite to Table 6;
`python -m eval zeroshot` and run_suite + metrics_document (what the training sweep writes) agree; no NaN
reaches metrics.json; `--out` and task names cannot point outside the output folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import open_clip
import pytest
import torch

from eval.__main__ import main
from eval.paper_report import load_runs, write_report
from eval.results import metrics_document
from eval.runner import run_suite
from eval.tasks import PAPER26, parse_task_spec
from tests.test_eval import make_classification
from tests.test_eval_support import TINY_MODEL, write_tiny_model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CLIP checkpoint and an imbalanced 6-class Aircraft-like set (2..9 images per class)."""
    base = tmp_path_factory.mktemp("one_path")
    config_dir, ckpt = write_tiny_model(base)
    make_classification(base / "aircraft_like", seed=5)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=str(ckpt))
    return base, config_dir, ckpt, (model.eval(), open_clip.get_tokenizer(TINY_MODEL), preprocess)


def _cli(world, out, *extra: str) -> int:
    base, config_dir, ckpt, _ = world
    return main(["zeroshot", "--checkpoint", str(ckpt), "--model", TINY_MODEL, "--model-config-dir", str(config_dir),
                 "--dataset-root", str(base), "--out", str(out), "--num-workers", "0", "--batch-size", "7",
                 *extra])  # fmt: skip


def test_registry_task_from_a_path_is_scored_by_its_metric_up_to_table6(world, tmp_path):
    base, _, _, (model, tokenizer, preprocess) = world
    spec = f"fgvc_aircraft={base / 'aircraft_like'}"
    suite = run_suite(model, tokenizer, preprocess, parse_task_spec(spec), None, batch_size=7, progress=False)
    air = suite["tasks"]["fgvc_aircraft"]
    assert air["main_metric"] == "mean_per_class_recall" and air["status"] == "ok"
    acc1, mpc = f"{100 * air['acc1']:.1f}", f"{100 * air['mean_per_class_recall']:.1f}"
    assert acc1 != mpc, "the imbalanced set must make top-1 and mean per-class differ"
    assert suite["summary"]["paper26"]["average"] == air["mean_per_class_recall"]

    # the sweep's metrics.json (run_suite + metrics_document) and the CLI's agree on every number
    sweep = tmp_path / "sweep"
    doc = metrics_document(suite, p=0.15, label="sweep", steps=3)
    (sweep / "sweep").mkdir(parents=True)
    (sweep / "sweep" / "metrics.json").write_text(json.dumps(doc, allow_nan=False))
    assert _cli(world, sweep / "cli", "--extra-task", spec, "--p", "0.5", "--label", "cli") == 0
    cli = json.loads((sweep / "cli" / "metrics.json").read_text())
    assert set(cli) >= set(doc) - {"steps"} and cli["schema"] == doc["schema"]
    numbers = [k for k, v in air.items() if isinstance(v, float) and k != "seconds"]
    assert {k: cli["tasks"]["fgvc_aircraft"][k] for k in numbers} == {k: air[k] for k in numbers}
    assert cli["summary"]["paper26"] == doc["summary"]["paper26"]

    # Table 6 shows mean per-class in the Aircraft column for both runs
    write_report(load_runs(sweep), tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| p | run | Average"))
    col = [c.strip() for c in header.strip("|").split("|")].index("Aircraft")
    for label in ("sweep", "cli"):
        row = next(ln for ln in md.splitlines() if re.match(rf"\| [0-9.]+ \| {label} \|", ln))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[col] == mpc and cells[2].startswith(f"{mpc} [avg over 1/{len(PAPER26)}]"), label


def test_amp_is_opt_in_and_recorded(world, tmp_path):
    base = world[0]
    assert _cli(world, tmp_path / "amp", "--extra-task", f"planes={base / 'aircraft_like'}", "--amp") == 0
    res = json.loads((tmp_path / "amp" / "tasks" / "planes.json").read_text())
    assert res["precision"] == "amp" and res["main_metric"] == "acc1"  # not a registry name: top-1
    assert json.loads((tmp_path / "amp" / "summary.json").read_text())["precision"] == "amp"


def test_metrics_document_never_holds_nan(world, tmp_path):
    model, tokenizer, preprocess = world[3]
    suite = run_suite(model, tokenizer, preprocess, parse_task_spec("cub,flickr30k"), tmp_path, progress=False)
    doc = metrics_document(suite, p=0.0, label="nothing ran", loss=float("nan"))
    text = json.dumps(doc, allow_nan=False)  # strict JSON: no NaN anywhere
    assert json.loads(text) == doc
    summary = doc["summary"]
    assert summary["average"] is None and summary["average_note"] == "no task ran"
    assert summary["paper26"]["average"] is None and summary["paper26"]["average_note"] == "none of the 26 tasks ran"
    assert doc["tasks"]["cub"]["status"] == "missing" and doc["tasks"]["cub"]["reason"].startswith("no data found")
    assert doc["loss"] is None  # a writer's stray NaN becomes null too
    with pytest.raises(ValueError, match="'tasks'"):
        metrics_document(suite, tasks={})


def test_out_naming_a_file_and_escaping_task_names_are_refused(world, tmp_path, capsys):
    base = world[0]
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    assert _cli(world, a_file, "--extra-task", f"planes={base / 'aircraft_like'}") == 2
    assert f"error: --out: {a_file} exists and is not a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(a_file)]) == 2
    assert f"--out: {a_file} exists and is not a folder" in capsys.readouterr().err
    before = sorted(p for p in tmp_path.parent.rglob("*"))
    out = tmp_path / "deep" / "out"
    assert _cli(world, out, "--extra-task", f"../../../escaped_task={base / 'aircraft_like'}") == 2
    err = capsys.readouterr().err
    assert "--extra-task task name: '../../../escaped_task' is not a valid name" in err and "Traceback" not in err
    assert sorted(p for p in tmp_path.parent.rglob("*")) == before  # nothing written anywhere


def test_project_model_needs_no_config_dir(world, tmp_path):
    """`--model EmbeddedCLIP-Tiny` works in a fresh interpreter without --model-config-dir (issue 13, item 13)."""
    import subprocess
    import sys

    import testbed.models

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model(testbed.models.EMBEDDED_CLIP_MODEL).state_dict(), ckpt)
    base = world[0]
    cmd = [sys.executable, "-m", "eval", "zeroshot", "--checkpoint", str(ckpt), "--model", "EmbeddedCLIP-Tiny",
           "--extra-task", f"planes={base / 'aircraft_like'}", "--dataset-root", str(base), "--out",
           str(tmp_path / "out"), "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "tasks" / "planes.json").read_text())
    assert res["status"] == "ok" and res["num_samples"] == 30
