"""Paper-style sweep reports: Table 6 (26 tasks), Table 7 (retrieval / DataComp groups), Figure 4.

Rows are runs sorted by p; cells are percentages; a task a run lacks is "—"; every average carries its
coverage when it is not over all of its tasks; deltas against a ``--baseline`` row read like the
paper's "(+1.1)". Outputs: report.md, table6.csv, table7.csv, figure4.png and report.html (the PNG
embedded as base64). Runs that carry none of the 26 tasks (the embedded testbed) fall back to
``eval.report.write_sweep_report``'s per-task layout.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caption_mixing.atomic import atomic_write_bytes, atomic_write_text
from eval.report import load_run
from eval.results import group_averages, main_metric_value
from eval.seed_report import aggregated_tables, format_table, write_sweep_report  # mean ± std over seeds
from eval.seeds import RULE, check_seeds, has_repeats
from eval.tasks import DATACOMP_GROUPS, PAPER26, PAPER_TASKS, REGISTRY, TASK_SETS

MISSING = "—"
Run = Mapping[str, Any]


def load_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``RUNS_DIR/*/metrics.json`` (and RUNS_DIR/metrics.json itself), via ``eval.report.load_run``."""
    runs_dir = Path(runs_dir)
    dirs = sorted(p.parent for p in runs_dir.glob("*/metrics.json"))
    if (runs_dir / "metrics.json").is_file():
        dirs.insert(0, runs_dir)
    if not dirs:
        raise ValueError(f"{runs_dir}: no run folders with metrics.json found")
    runs = []
    for d in dirs:
        try:
            runs.append(load_run(d))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{d / 'metrics.json'}: not a run record ({type(e).__name__}: {e})") from e
    return sorted(runs, key=lambda r: (float(r["p"]), str(r["label"])))


def has_paper_tasks(runs: Sequence[Run]) -> bool:
    """True when any run holds a registry task other than the embedded testbed's."""
    return any(t in REGISTRY and t not in TASK_SETS["testbed"] for r in runs for t in r.get("tasks", {}))


def _value(run: Run, task: str) -> float | None:
    res = run.get("tasks", {}).get(task)
    return main_metric_value(res, task) if res else None


def paper26_average(run: Run) -> tuple[float | None, int]:
    """(mean main metric over the 26 tasks present, how many)."""
    vals = [v for v in (_value(run, t) for t in PAPER26) if v is not None]
    return (sum(vals) / len(vals) if vals else None), len(vals)


def _fmt(value: float | None, base: float | None = None, show_delta: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    cell = f"{100 * value:.1f}"
    if show_delta and base is not None and math.isfinite(base):
        cell += f" ({100 * value - 100 * base:+.1f})"
    return cell


def _find_baseline(runs: Sequence[Run], baseline: str | None) -> Run | None:
    if baseline is None:
        return None
    for r in runs:
        if str(r["label"]) == baseline:
            return r
    labels = ", ".join(repr(str(r["label"])) for r in runs)
    raise ValueError(f"--baseline {baseline!r} matches no run label; labels are {labels}")


def table6(runs: Sequence[Run], baseline: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: p, run, Average (coverage), then the 26 tasks in the paper's column order."""
    base = _find_baseline(runs, baseline)
    header = ["p", "run", "Average", *(t.title for t in PAPER_TASKS)]
    rows = []
    for r in runs:
        delta = base is not None and r is not base
        avg, n = paper26_average(r)
        b_avg, b_n = paper26_average(base) if base else (None, 0)
        avg_cell = _fmt(avg, b_avg, delta and n == b_n)
        if avg is not None and n < len(PAPER26):
            avg_cell += f" [avg over {n}/{len(PAPER26)}]"
        cells = [_fmt(_value(r, t), _value(base, t) if base else None, delta) for t in PAPER26]
        rows.append([f"{float(r['p']):g}", str(r["label"]), avg_cell, *cells])
    return header, rows


def _table7_values(run: Run) -> list[tuple[float | None, str]]:
    groups = group_averages(run.get("tasks", {}))

    def g(name: str) -> tuple[float | None, str]:
        info = groups[name]
        v = info["average"] if info["num_members"] else None
        cov = "" if info["num_members"] in (0, info["num_total"]) else f" [{info['coverage']}]"
        return v, cov

    return [g("Retrieval"), (_value(run, "flickr30k"), ""), (_value(run, "mscoco"), ""), g("IN dist. shift"), g("VTAB")]


def table7(runs: Sequence[Run], baseline: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Avg. retrieval (DataComp Retrieval group), Flickr, COCO (mean R@1), IN dist. shift, VTAB."""
    base = _find_baseline(runs, baseline)
    header = ["p", "run", "Avg. retrieval", "Flickr", "COCO", "IN dist. shift", "VTAB"]
    b_vals = _table7_values(base) if base else None
    rows = []
    for r in runs:
        cells = []
        for i, (v, cov) in enumerate(_table7_values(r)):
            bv, bcov = b_vals[i] if b_vals else (None, "")
            cells.append(_fmt(v, bv, base is not None and r is not base and cov == bcov) + cov)
        rows.append([f"{float(r['p']):g}", str(r["label"]), *cells])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table from a header and rows of cell strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _csv(runs: Sequence[Run]) -> tuple[str, str]:
    """Full-precision CSVs (percent): table6 (+ per-task coverage) and table7 (+ recall@k both directions)."""
    buf6, buf7 = io.StringIO(), io.StringIO()
    w6, w7 = csv.writer(buf6, lineterminator="\n"), csv.writer(buf7, lineterminator="\n")
    w6.writerow(["p", "label", "average (%)", "num_tasks_averaged", *(t.title for t in PAPER_TASKS), "missing"])
    ks = [f"{d}_recall@{k}" for d in ("image_retrieval", "text_retrieval") for k in (1, 5, 10)]
    w7.writerow(
        [
            "p",
            "label",
            *(f"{g} (%)" for g in DATACOMP_GROUPS),
            *(f"{g} coverage" for g in DATACOMP_GROUPS),
            *(f"{t} {m} (%)" for t in ("flickr30k", "mscoco") for m in ("mean_recall@1", *ks)),
        ]
    )
    pct = lambda v: "" if v is None or not math.isfinite(v) else repr(100 * v)  # noqa: E731
    for r in runs:
        avg, n = paper26_average(r)
        w6.writerow(
            [
                repr(float(r["p"])),
                r["label"],
                pct(avg),
                n,
                *(pct(_value(r, t)) for t in PAPER26),
                ";".join(t for t in PAPER26 if _value(r, t) is None),
            ]
        )
        groups = group_averages(r.get("tasks", {}))
        ret = []
        for t in ("flickr30k", "mscoco"):
            res = r.get("tasks", {}).get(t, {})
            ok = res.get("status", "ok") == "ok"
            ret += [pct(res.get(m) if ok else None) for m in ("mean_recall@1", *ks)]
        w7.writerow(
            [
                repr(float(r["p"])),
                r["label"],
                *(pct(groups[g]["average"]) for g in DATACOMP_GROUPS),
                *(groups[g]["coverage"] for g in DATACOMP_GROUPS),
                *ret,
            ]
        )
    return buf6.getvalue(), buf7.getvalue()


def figure4_png(runs: Sequence[Run], title: str) -> bytes:
    """ImageNet top-1 and the 26-task average against p (Figure 4); gaps where a run lacks them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = [float(r["p"]) for r in runs]
    nan = lambda v: 100 * v if v is not None else math.nan  # noqa: E731
    counts = sorted({paper26_average(r)[1] for r in runs})  # coverage in the title when any run lacks tasks
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    cover = "" if counts == [len(PAPER26)] else f" (over {span}/{len(PAPER26)})"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (name, ys) in zip(
        axes,
        [
            ("ImageNet", [nan(_value(r, "imagenet1k")) for r in runs]),
            ("26-task average" + cover, [nan(paper26_average(r)[0]) for r in runs]),
        ],
        strict=True,
    ):
        ax.plot(ps, ys, marker="o")
        ax.set_xlabel("synthetic-caption ratio p")
        ax.set_ylabel(f"{name.split(' (')[0]} (%)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _parse_md_table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln.strip().strip("|") for ln in md.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.split("|")] for ln in lines]
    return cells[0], cells[2:]


def html_page(title: str, notice: str | None, sections: list[tuple[str, str]], png: bytes, caption: str) -> str:
    """One self-contained page: inline CSS, tables, the figure as a data: URI."""
    img = base64.b64encode(png).decode("ascii")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if notice:
        parts.append(f"<p class='notice'>{html.escape(notice)}</p>")
    for heading, table_html in sections:
        parts += [f"<h2>{html.escape(heading)}</h2>", table_html]
    parts.append(f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' src='data:image/png;base64,{img}'>")
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}.notice{font-style:italic}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"  # noqa: E501


def write_report(
    runs: Sequence[Run],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    title: str = "Caption-mixing sweep",
    notice: str | None = None,
) -> dict[str, Path]:
    """Paper layout when any run has registry tasks, else the per-task layout; always adds report.html."""
    if not runs:
        raise ValueError("report needs at least one run")
    out_dir = Path(out_dir)
    runs = sorted(runs, key=lambda r: (float(r["p"]), str(r["label"])))
    if not has_paper_tasks(runs):
        paths = write_sweep_report(runs, out_dir, title=title, notice=notice)
        page = html_page(
            title,
            notice,
            [("Per-task main metric (%)", _html_table(*_parse_md_table(format_table(runs))))],
            paths["png"].read_bytes(),
            "Main metric against p",
        )
        paths["html"] = atomic_write_text(out_dir / "report.html", page)
        return paths
    seeds_section: list[str] = []
    if has_repeats(runs):  # several seeds per p: rows told apart by seed, mean ± std after Table 7
        check_seeds(runs)
        mean_std, deltas = aggregated_tables(runs)
        base = min(float(r["p"]) for r in runs)
        seeds_section = ["## Mean ± std over seeds", "", mean_std, "", f"Difference from p={base:g}:", "", deltas]
        seeds_section += ["", RULE, ""]
        runs = [{**r, "label": f"{r['label']} s{r.get('seed', 0)}"} for r in runs]
    h6, r6 = table6(runs, baseline)
    h7, r7 = table7(runs, baseline)
    png = figure4_png(runs, title)
    delta = f" Deltas in parentheses are against the run labelled {baseline!r}." if baseline else ""
    legend = (
        "Percent. Metrics: mean per-class accuracy for Aircraft, Pets, Caltech-101, Flowers; (top-1 + top-5)/2 "
        'for Kinetics700; ROC AUC for HatefulMemes; top-1 otherwise. "—" = not evaluated (data missing); '
        "[avg over k/26] and [k/n] give the coverage of averages taken over fewer tasks than the paper's." + delta
    )
    md = [f"# {title}", ""] + ([f"> **Note:** {notice}", ""] if notice else [])
    md += [
        "## Zero-shot classification (Table 6 layout)",
        "",
        markdown(h6, r6),
        "",
        "## Zero-shot retrieval and DataComp groups (Table 7 layout)",
        "",
        markdown(h7, r7),
        "",
        legend,
        "",
        *seeds_section,
        "![Figure 4](figure4.png)",
        "",
    ]
    c6, c7 = _csv(runs)
    page = html_page(
        title,
        notice,
        [
            ("Zero-shot classification (Table 6 layout)", _html_table(h6, r6)),
            ("Zero-shot retrieval and DataComp groups (Table 7 layout)", _html_table(h7, r7)),
            ("Legend", f"<p>{html.escape(legend)}</p>"),
        ],
        png,
        "ImageNet and 26-task average against p (Figure 4 layout)",
    )
    return {
        "markdown": atomic_write_text(out_dir / "report.md", "\n".join(md)),
        "table6_csv": atomic_write_text(out_dir / "table6.csv", c6),
        "table7_csv": atomic_write_text(out_dir / "table7.csv", c7),
        "png": atomic_write_bytes(out_dir / "figure4.png", png),
        "html": atomic_write_text(out_dir / "report.html", page),
    }
