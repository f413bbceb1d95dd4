"""Reports across a sweep over the synthetic-caption ratio p: markdown, CSV and a plot.

Each run is a ``metrics.json`` (``eval.results.metrics_document``: ``{"p", "label", "tasks", "summary", ...}``)
written by the training sweep or ``python -m eval zeroshot --p``. Each task is shown by its registry metric
(``eval.tasks``; a task outside the registry by the ``main_metric`` its result names).
Values are shown as percentages; a task a run did not evaluate is shown as "—", never as 0, and an
average over fewer tasks than the table has is flagged, since it is not comparable across rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caption_mixing.atomic import atomic_write, atomic_write_text
from eval.results import main_metric_value, summarize
from eval.tasks import REGISTRY

MISSING = "—"
RETRIEVAL_KS = (1, 5, 10)
RETRIEVAL_DIRECTIONS = ("image_retrieval", "text_retrieval")


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run_dir/metrics.json`` into the shape the report functions take."""
    run_dir = Path(run_dir)
    doc = json.loads((run_dir / "metrics.json").read_text())
    p = float(doc["p"])
    label = str(doc.get("label") or f"p={p:g}")
    seed = int(doc.get("seed") or 0)  # a sweep with --seeds has several runs per p, told apart by their seed
    return {"p": p, "label": label, "seed": seed, "tasks": doc.get("tasks", {}), "run_dir": str(run_dir)}


def _sorted_runs(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(runs, key=lambda r: (float(r["p"]), str(r.get("label", ""))))


def _task_columns(runs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(task, main metric name) in first-seen order: the registry's metric, else the one any run recorded."""
    columns: dict[str, str] = {}
    for run in runs:
        for task, result in run.get("tasks", {}).items():
            if task in REGISTRY:
                columns[task] = REGISTRY[task].metric
            elif not columns.get(task) and result.get("main_metric"):
                columns[task] = result["main_metric"]
            columns.setdefault(task, "")
    return list(columns.items())


def _pct(value: float | None, digits: int | None = 1) -> str:
    if value is None or not math.isfinite(value):
        return MISSING if digits is not None else ""
    return f"{100 * value:.{digits}f}" if digits is not None else repr(100 * value)


def _label_column_needed(runs: Sequence[Mapping[str, Any]]) -> bool:
    """Show labels only when they say more than p (e.g. two runs at the same p)."""
    return any(str(r.get("label", "")) != f"p={float(r['p']):g}" for r in runs)


def format_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: one row per run sorted by p, main metric per task in %, then the average."""
    runs = _sorted_runs(runs)
    columns = _task_columns(runs)
    with_label = _label_column_needed(runs)
    header = ["p", *(["run"] if with_label else []), *(f"{t} ({m or '?'})" for t, m in columns), "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for run in runs:
        summary = summarize(run.get("tasks", {}))
        cells = [f"{float(run['p']):g}", *([str(run.get("label", ""))] if with_label else [])]
        cells += [
            _pct(main_metric_value(run["tasks"][t], t) if t in run.get("tasks", {}) else None) for t, _ in columns
        ]
        average = _pct(summary["average"])
        if summary["num_tasks_averaged"] < len(columns) and summary["num_tasks_averaged"]:
            average += f" ({summary['num_tasks_averaged']}/{len(columns)} tasks)"
        lines.append("| " + " | ".join(cells + [average]) + " |")
    return "\n".join(lines)


def _csv_text(runs: Sequence[Mapping[str, Any]]) -> str:
    """The table at full precision (percent), plus every retrieval task's R@1/5/10 in both directions."""
    runs = _sorted_runs(runs)
    columns = _task_columns(runs)
    retrieval = [t for t, m in columns if m == "mean_recall@1"]
    extra = [(t, f"{d}_recall@{k}") for t in retrieval for d in RETRIEVAL_DIRECTIONS for k in RETRIEVAL_KS]
    header = ["p", "label", *(f"{t} {m} (%)" for t, m in columns), *(f"{t} {m} (%)" for t, m in extra)]
    header += ["average (%)", "num_tasks_averaged", "num_tasks", "missing"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for run in runs:
        tasks = run.get("tasks", {})
        summary = summarize(tasks)
        row = [repr(float(run["p"])), str(run.get("label", ""))]
        row += [_pct(main_metric_value(tasks[t], t) if t in tasks else None, None) for t, _ in columns]
        row += [_pct(_ok_value(tasks.get(t), m), None) for t, m in extra]
        row += [_pct(summary["average"], None), summary["num_tasks_averaged"], summary["num_tasks"]]
        row.append(";".join(summary["missing"]))
        writer.writerow(row)
    return buf.getvalue()


def _ok_value(result: Mapping[str, Any] | None, key: str) -> float | None:
    if not result or result.get("status", "ok") != "ok" or result.get(key) is None:
        return None
    return float(result[key])


def _plot_png(runs: Sequence[Mapping[str, Any]], title: str, notice: str | None) -> bytes:
    """Main metric (%) against p, one line per task plus the average; gaps where a task is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _sorted_runs(runs)
    ps = [float(r["p"]) for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task, metric in _task_columns(runs):
        ys = [_nan_pct(main_metric_value(r["tasks"][task], task) if task in r.get("tasks", {}) else None) for r in runs]
        ax.plot(ps, ys, marker="o", label=f"{task} ({metric})")
    averages = [_nan_pct(summarize(r.get("tasks", {}))["average"]) for r in runs]
    ax.plot(ps, averages, marker="s", color="black", linestyle="--", label="average")
    ax.set_xlabel("synthetic-caption ratio p")
    ax.set_ylabel("zero-shot main metric (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if notice:
        fig.text(0.5, 0.01, notice, ha="center", va="bottom", fontsize=7, style="italic")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _nan_pct(value: float | None) -> float:
    return 100 * value if value is not None and math.isfinite(value) else math.nan


def write_sweep_report(
    runs: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    title: str = "Caption-mixing sweep",
    notice: str | None = None,
) -> dict[str, Path]:
    """Write report.md, report.csv and accuracy_vs_p.png atomically into ``out_dir``."""
    if not runs:
        raise ValueError("write_sweep_report needs at least one run")
    out_dir = Path(out_dir)
    md = [f"# {title}", ""]
    if notice:
        md += [f"> **Note:** {notice}", ""]
    md += [format_table(runs), "", "Main metric per task in %; average = unweighted mean over the tasks that ran."]
    png = _plot_png(runs, title, notice)
    return {
        "markdown": atomic_write_text(out_dir / "report.md", "\n".join(md) + "\n"),
        "csv": atomic_write_text(out_dir / "report.csv", _csv_text(runs)),
        "png": atomic_write(out_dir / "accuracy_vs_p.png", lambda f: f.write(png)),
    }


# ---------------------------------------------------------------------------------------------
# Mixing modes at equal p: the paper's random draw, the score gate, both captions (issue 19)
# ---------------------------------------------------------------------------------------------


def mode_of(run: Mapping[str, Any]) -> str:
    """The mixing mode in a run's label: ``"p=0.15 gate"`` -> ``gate``, ``"both w=0.5"`` -> ``both``,
    ``"p=0.15"`` -> ``random`` (the paper's rule). p (or both's weight w) is the run's ``p``."""
    words = [w for w in str(run.get("label") or "").split() if not w.startswith(("p=", "w="))]
    return " ".join(words) or "random"


def _mode_cells(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[float], dict]:
    """Modes (random first), p values, and {(mode, p): Spread of the per-run average over seeds}."""
    from eval.seeds import spread

    modes = sorted({mode_of(r) for r in runs}, key=lambda m: (m != "random", m))
    ps = sorted({float(r["p"]) for r in runs})
    cells = {}
    for mode in modes:
        for p in ps:
            group = [r for r in runs if mode_of(r) == mode and float(r["p"]) == p]
            if group:
                cells[(mode, p)] = spread(summarize(r.get("tasks", {}))["average"] for r in group)
    return modes, ps, cells


def format_mode_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per p, one column per mode, the average main metric (%) as mean ± std over seeds (n)."""
    from eval.seeds import format_spread

    modes, ps, cells = _mode_cells(runs)
    header = ["p (both: w)", *modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for p in ps:
        row = [f"{p:g}"]
        for mode in modes:
            s = cells.get((mode, p))
            row.append(MISSING if s is None or s.mean is None else f"{format_spread(s)} (n={s.n})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _modes_png(runs: Sequence[Mapping[str, Any]], title: str, notice: str | None) -> bytes:
    """Average main metric (%) against p, one line per mode, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, ps, cells = _mode_cells(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in modes:
        pts = [(p, cells[(mode, p)]) for p in ps if (mode, p) in cells and cells[(mode, p)].mean is not None]
        xs = [p for p, _ in pts]
        ys = [100 * s.mean for _, s in pts]
        err = [100 * (s.std or 0.0) for _, s in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=mode)
    ax.set_xlabel("synthetic-caption ratio p (both: loss weight w)")
    ax.set_ylabel("average zero-shot main metric (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if notice:
        fig.text(0.5, 0.01, notice, ha="center", va="bottom", fontsize=7, style="italic")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_mode_report(
    runs: Sequence[Mapping[str, Any]], out_dir: str | Path, *, title: str = "Mixing modes", notice: str | None = None
) -> dict[str, Path]:
    """modes.md (modes at equal p, mean ± std over seeds) and modes_vs_p.png, written atomically."""
    if not runs:
        raise ValueError("write_mode_report needs at least one run")
    out_dir = Path(out_dir)
    md = [f"# {title}", ""] + ([f"> **Note:** {notice}", ""] if notice else [])
    md += [format_mode_table(runs), "", "Average main metric in % (mean ± std over seeds, n runs); — = not run."]
    md += ["A difference smaller than the seed spread is not a result.", "", "![modes vs p](modes_vs_p.png)", ""]
    png = _modes_png(runs, title, notice)
    return {
        "markdown": atomic_write_text(out_dir / "modes.md", "\n".join(md)),
        "png": atomic_write(out_dir / "modes_vs_p.png", lambda f: f.write(png)),
    }
