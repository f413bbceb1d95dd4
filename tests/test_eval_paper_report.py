"""`python -m eval report`: Table 6 / Table 7 layouts, deltas, coverage, HTML, and the testbed fallback."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.tasks import PAPER26, PAPER_TASKS


def _cls(v: float, metric: str = "acc1") -> dict:
    return {"status": "ok", "task_type": "classification", "main_metric": metric, metric: v, "acc1": v}


def _ret(v: float) -> dict:
    r = {"status": "ok", "task_type": "retrieval", "main_metric": "mean_recall@1", "mean_recall@1": v}
    r.update({f"{d}_retrieval_recall@{k}": v for d in ("image", "text") for k in (1, 5, 10)})
    return r


def _paper_run(base: Path, p: float, label: str, offset: float, drop: tuple[str, ...] = ()) -> None:
    tasks = {t.name: _cls(0.30 + offset + i / 100, t.metric) for i, t in enumerate(PAPER_TASKS) if t.name not in drop}
    tasks.update(flickr30k=_ret(0.70 + offset), mscoco=_ret(0.40 + offset), svhn=_cls(0.5))
    for t in drop:
        tasks[t] = {"status": "missing", "path": f"/data/wds_{t}"}
    d = base / label.replace("=", "")
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"p": p, "label": label, "tasks": tasks}))


def test_paper_report(tmp_path):
    runs = tmp_path / "sweep"
    _paper_run(runs, 0.0, "alt-text", 0.0)
    _paper_run(runs, 0.15, "p=0.15", 0.011)
    _paper_run(runs, 1.0, "p=1", -0.05, drop=("cub", "ucf101", "kinetics700"))
    assert main(["report", str(runs), "--baseline", "alt-text", "--title", "B/32 sweep"]) == 0
    out = runs / "report"
    md = (out / "report.md").read_text()
    md6, md7 = md.split("## Zero-shot retrieval")
    header = next(line for line in md.splitlines() if line.startswith("| p | run | Average"))
    assert [c.strip() for c in header.strip("|").split("|")][3:] == [t.title for t in PAPER_TASKS]
    rows = {r.split("|")[2].strip(): [c.strip() for c in r.strip("|").split("|")]
            for r in md6.splitlines() if re.match(r"\| (0|0.15|1) \|", r)}  # fmt: skip
    base_avg = 100 * sum(0.30 + i / 100 for i in range(26)) / 26
    assert rows["alt-text"][2] == f"{base_avg:.1f}" and rows["alt-text"][3] == "30.0"
    assert rows["p=0.15"][3] == "31.1 (+1.1)" and rows["p=0.15"][2] == f"{base_avg + 1.1:.1f} (+1.1)"
    assert rows["p=1"][2].endswith("[avg over 23/26]") and "(" not in rows["p=1"][2].split("[")[0]
    assert rows["p=1"][3 + PAPER26.index("cub")] == "—"
    # Table 7: retrieval group over 2/3 members (no WinoGAViL), VTAB over the 12 members present
    t7 = next(ln for ln in md7.splitlines() if ln.startswith("| 0.15 |"))
    cells = [c.strip() for c in t7.strip("|").split("|")]
    assert cells[2] == f"{100 * (0.711 + 0.411) / 2:.1f} (+1.1) [2/3]" and cells[3] == "71.1 (+1.1)"
    assert cells[5] == "—" and cells[6].endswith("[12/13]")  # no IN shifts; VTAB lacks clevr_distance

    with open(out / "table6.csv", newline="") as f:
        t6 = list(csv.DictReader(f))
    assert [r["label"] for r in t6] == ["alt-text", "p=0.15", "p=1"]
    assert t6[2]["num_tasks_averaged"] == "23" and t6[2]["CUB"] == "" and t6[2]["missing"] == "cub;ucf101;kinetics700"
    assert float(t6[1]["ImageNet"]) == pytest.approx(31.1)
    with open(out / "table7.csv", newline="") as f:
        t7c = list(csv.DictReader(f))
    assert t7c[0]["Retrieval coverage"] == "2/3" and t7c[0]["VTAB coverage"] == "12/13"
    assert float(t7c[0]["mscoco text_retrieval_recall@5 (%)"]) == pytest.approx(40.0)

    page = (out / "report.html").read_text()
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1))
    assert png.startswith(b"\x89PNG") and png == (out / "figure4.png").read_bytes()
    assert "<td>31.1 (+1.1)</td>" in page and "src='http" not in page

    assert main(["report", str(runs), "--baseline", "nope"]) == 2


def test_report_falls_back_for_testbed_tasks(tmp_path, capsys):
    runs = tmp_path / "tb"
    for p in (0.0, 1.0):
        d = runs / f"p{p:g}"
        d.mkdir(parents=True)
        tasks = {"concept": _cls(0.2 + p / 10), "retrieval": _ret(0.3)}
        (d / "metrics.json").write_text(json.dumps({"p": p, "label": f"p={p:g}", "tasks": tasks}))
    assert main(["report", str(runs), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "concept (acc1)" in md and "Table 6" not in md
    assert (tmp_path / "r" / "accuracy_vs_p.png").is_file()
    assert "<td>30.0</td>" in (tmp_path / "r" / "report.html").read_text()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no run folders with metrics.json" in capsys.readouterr().err
