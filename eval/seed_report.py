"""The sweep report when seeds are a sweep axis: mean ± std per task, group and average, error bars, and
differences from the baseline p marked only when they exceed the seed spread (``eval.seeds.RULE``).

With one run per p it writes what ``eval.report.write_sweep_report`` writes (the per-run table, CSV and
plot), plus the group table. Groups are the testbed's (long-tail concepts / attributes / retrieval,
``eval.tasks.TESTBED_GROUPS``) when testbed tasks ran, else DataComp's, shown DataComp-style beside the
average so a reader sees which kind of task moves with p. Outputs: ``report.md``, ``report.csv`` (one
row per p: mean and std), ``report_runs.csv`` (one row per run) and ``accuracy_vs_p.png``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from caption_mixing.atomic import atomic_write, atomic_write_text
from eval import report
from eval.results import group_averages, main_metric_value, summarize
from eval.seeds import RULE, aggregate, by_p, check_seeds, format_delta, format_spread, has_repeats, seeds_of
from eval.tasks import DATACOMP_GROUPS, TESTBED_GROUPS

Run = Mapping[str, Any]
Value = Callable[[Run], float | None]


def report_groups(runs: Sequence[Run]) -> dict[str, tuple[str, ...]]:
    """The testbed's groups when any testbed task ran, else DataComp's groups that have a member present."""
    ran = {t for r in runs for t in r.get("tasks", {})}
    if ran & {t for members in TESTBED_GROUPS.values() for t in members}:
        return dict(TESTBED_GROUPS)
    return {g: m for g, m in DATACOMP_GROUPS.items() if ran & set(m)}


def _task_value(task: str) -> Value:
    def value(run: Run) -> float | None:
        result = run.get("tasks", {}).get(task)
        return main_metric_value(result, task) if result else None

    return value


def _group_value(name: str, members: tuple[str, ...]) -> Value:
    return lambda run: group_averages(run.get("tasks", {}), {name: members})[name]["average"]


def _average(run: Run) -> float | None:
    return summarize(run.get("tasks", {}))["average"]


def columns(runs: Sequence[Run]) -> list[tuple[str, Value]]:
    """(header, value of a run) for every task, every group and the average, in table order."""
    cols: list[tuple[str, Value]] = [(f"{t} ({m or '?'})", _task_value(t)) for t, m in report._task_columns(runs)]
    cols += [(f"{g} ({len(m)})", _group_value(g, m)) for g, m in report_groups(runs).items()]
    return [*cols, ("average", _average)]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def aggregated_tables(runs: Sequence[Run]) -> tuple[str, str]:
    """(mean ± std table, table of differences from the lowest p), markdown."""
    cols = columns(runs)
    stats = [aggregate(runs, value) for _, value in cols]
    seeds = seeds_of(runs)
    ps = list(seeds)
    header = ["p", "seeds", *(h for h, _ in cols)]
    rows = [[f"{p:g}", ",".join(map(str, seeds[p])), *(format_spread(s[p]) for s in stats)] for p in ps]
    base = ps[0]
    delta_rows = [
        [f"{p:g}", ",".join(map(str, seeds[p])), *(format_delta(s[p], s[base]) for s in stats)] for p in ps[1:]
    ]
    return _md_table(header, rows), _md_table(["p", "seeds", *(h for h, _ in cols)], delta_rows)


def group_table(runs: Sequence[Run]) -> str | None:
    """Per-run values of the groups and the average (single-seed sweeps), or None without groups."""
    groups = report_groups(runs)
    if not groups:
        return None
    cols = [(f"{g} ({len(m)} tasks)", _group_value(g, m)) for g, m in groups.items()] + [("average", _average)]
    rows = [
        [
            f"{float(r['p']):g}",
            str(r.get("seed", 0)),
            *(format_spread(aggregate([r], v)[float(r["p"])]) for _, v in cols),
        ]
        for r in sorted(runs, key=lambda r: (float(r["p"]), int(r.get("seed") or 0)))
    ]
    return _md_table(["p", "seed", *(h for h, _ in cols)], rows)


def _groups_legend(runs: Sequence[Run]) -> str:
    groups = report_groups(runs)
    return "Groups: " + "; ".join(f"{g} = {', '.join(m)}" for g, m in groups.items()) + "." if groups else ""


def _csv_rows(runs: Sequence[Run]) -> tuple[str, str]:
    """(one row per p with mean/std/n per column, one row per run), percent at full precision."""
    cols = columns(runs)
    stats = [aggregate(runs, value) for _, value in cols]
    seeds = seeds_of(runs)

    def pct(v: float | None) -> str:
        return "" if v is None or not math.isfinite(v) else repr(100 * v)

    agg, per_run = io.StringIO(), io.StringIO()
    w = csv.writer(agg, lineterminator="\n")
    w.writerow(["p", "seeds", *(f"{h} {k}" for h, _ in cols for k in ("mean (%)", "std (%)", "n"))])
    for p in seeds:
        cells: list[Any] = [repr(p), ";".join(map(str, seeds[p]))]
        for s in stats:
            cells += [pct(s[p].mean), pct(s[p].std), s[p].n]
        w.writerow(cells)
    w = csv.writer(per_run, lineterminator="\n")
    w.writerow(["p", "seed", "run_dir", *(f"{h} (%)" for h, _ in cols)])
    for group in by_p(runs).values():
        for r in group:
            w.writerow([repr(float(r["p"])), r.get("seed", 0), r.get("run_dir", ""), *(pct(v(r)) for _, v in cols)])
    return agg.getvalue(), per_run.getvalue()


def _errorbar_png(runs: Sequence[Run], title: str, notice: str | None) -> bytes:
    """Mean ± std against p: every task (left), the groups and the average (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(runs)
    n_tasks = len(report._task_columns(runs))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: 13 testbed tasks never share one
    for i, (header, value) in enumerate(cols):
        stats = aggregate(runs, value)
        ps = list(stats)
        means = [_nan(stats[p].mean) for p in ps]
        stds = [_nan(stats[p].std, 0.0) for p in ps]
        ax = axes[0] if i < n_tasks else axes[1]
        style: dict[str, Any] = {"color": palette[i % len(palette)]}
        if header == "average":
            style = {"color": "black", "linestyle": "--", "linewidth": 2}
        ax.errorbar(ps, means, yerr=stds, marker="o", capsize=3, label=header, **style)
    axes[0].set_title("per task (mean ± std over seeds)")
    axes[1].set_title("groups and average")
    for ax in axes:
        ax.set_xlabel("synthetic-caption ratio p")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("zero-shot main metric (%)")
    fig.suptitle(title)
    fig.text(0.5, 0.01, f"error bars: ±1 std over seeds. {notice or ''}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _nan(value: float | None, default: float = math.nan) -> float:
    return 100 * value if value is not None and math.isfinite(value) else default


def format_table(runs: Sequence[Run]) -> str:
    """The mean ± std table with several seeds per p, else ``eval.report.format_table``'s per-run table."""
    if not has_repeats(runs):
        return report.format_table(runs)
    check_seeds(runs)
    return aggregated_tables(runs)[0]


def write_sweep_report(
    runs: Sequence[Run], out_dir: str | Path, *, title: str = "Caption-mixing sweep", notice: str | None = None
) -> dict[str, Path]:
    """Write report.md, report.csv, report_runs.csv and accuracy_vs_p.png into ``out_dir`` (atomically)."""
    if not runs:
        raise ValueError("write_sweep_report needs at least one run")
    if not has_repeats(runs):
        return _single_seed_report(runs, Path(out_dir), title, notice)
    check_seeds(runs)
    out_dir = Path(out_dir)
    table, deltas = aggregated_tables(runs)
    base = min(float(r["p"]) for r in runs)
    md = [f"# {title}", ""] + ([f"> **Note:** {notice}", ""] if notice else [])
    md += ["## Mean ± std over seeds", "", table, ""]
    md += [
        "Main metric per task in %; average = unweighted mean over the tasks that ran, per run, then over seeds.",
        _groups_legend(runs),
        "",
    ]
    md += [f"## Difference from p={base:g}", "", deltas, "", RULE, "", "![accuracy vs p](accuracy_vs_p.png)", ""]
    agg, per_run = _csv_rows(runs)
    png = _errorbar_png(runs, title, notice)
    return {
        "markdown": atomic_write_text(out_dir / "report.md", "\n".join(md)),
        "csv": atomic_write_text(out_dir / "report.csv", agg),
        "runs_csv": atomic_write_text(out_dir / "report_runs.csv", per_run),
        "png": atomic_write(out_dir / "accuracy_vs_p.png", lambda f: f.write(png)),
    }


def _single_seed_report(runs: Sequence[Run], out_dir: Path, title: str, notice: str | None) -> dict[str, Path]:
    """``eval.report``'s report, with the group table and a word on what one seed per p cannot tell."""
    paths = report.write_sweep_report(runs, out_dir, title=title, notice=notice)
    extra = [
        "",
        "One seed per p: the seed spread is unknown, so no difference between p values can be called real; "
        "sweep with `--seeds 0,1,2` for mean ± std.",
    ]
    groups = group_table(runs)
    if groups:
        extra = ["", "## Groups", "", groups, "", _groups_legend(runs), *extra]
    text = paths["markdown"].read_text().rstrip("\n") + "\n" + "\n".join(extra) + "\n"
    paths["markdown"] = atomic_write_text(out_dir / "report.md", text)
    return paths
