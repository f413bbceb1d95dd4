"""Table-5-style report: rows = training p (and caption source), columns = original / synthetic prompt.

Every row but the p=0 (alt-text only) row shows its difference from that row in parentheses, as the
paper's Table 6 does against its alt-text baseline. Beside it (issue 17): GenEval-style accuracy per
category with the judge's ceiling (real testbed renderings) and floor (uniform noise), a plot of
accuracy against p, distribution metrics (Fréchet distance in the judge CLIP's space; FID/KID when
configured), one CSV row per run, and a self-contained HTML page (``t2i.html_report``).
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

from caption_mixing.atomic import atomic_write, atomic_write_json, atomic_write_text
from eval.geneval import ATTRIBUTES, summary_value
from eval.seeds import (
    MISSING,
    RULE,
    aggregate,
    by_p,
    check_seeds,
    format_delta,
    format_spread,
    has_repeats,
    seeds_of,
)


def _row_label(run: dict) -> str:
    """What the model was trained on. p=1 says "every caption drawn synthetic": the paper's "w/o alt-texts"
    is a different thing (a captioner trained without alt-text input), so the label avoids that wording."""
    p = run.get("p")
    src = run.get("synthetic_source", "altogether")
    if p == 0:
        return "alt-texts only (p=0)"
    return f"{src}, p={p:g}" + (" (all captions drawn synthetic)" if p == 1 else "")


def _cell(value: float | None, base: float | None = None) -> str:
    """CLIP similarity to one decimal, with the difference from ``base`` (the p=0 row) when given."""
    if value is None:
        return "n/a"
    return f"{value:.1f}" + (f" ({value - base:+.1f})" if base is not None else "")


def format_table(runs: list[dict]) -> str:
    """Markdown table of CLIP similarity (100 x cosine) per training p; deltas against the p=0 row.

    With several seeds per p (``--seeds``): one row per p with mean ± std over the seeds (``seed_table``).
    """
    if has_repeats(runs):
        return seed_table(runs)
    lines = [
        "| training data | original prompt | synthetic prompt | prompts | steps |",
        "|---|---|---|---|---|",
    ]
    ordered = sorted(runs, key=lambda r: r.get("p", 0))
    base = next((r for r in ordered if r.get("p") == 0), None)
    base_cs = (base or {}).get("clip_score", {})
    for run in ordered:
        cs = run.get("clip_score", {})
        cells = [
            _cell(cs.get(col), None if base is None or run is base else base_cs.get(col))
            for col in ("original", "synthetic")
        ]
        lines.append(
            f"| {_row_label(run)} | {cells[0]} | {cells[1]} "
            f"| {run.get('eval_prompts', 'n/a')} | {run.get('steps', 'n/a')} |"
        )
    ref = next((r for r in runs if r.get("clip_score_reference")), None)
    labels = {"real_images": "held-out real images (ceiling)", "noise_images": "uniform-noise images (floor)"}
    for name, label in labels.items():
        cs = (ref or {}).get("clip_score_reference", {}).get(name)
        if cs:
            orig, syn = _cell(cs["original"]), _cell(cs["synthetic"])
            lines.append(f"| {label} | {orig} | {syn} | {ref['eval_prompts']} | - |")
    return "\n".join(lines)


def seed_table(runs: list[dict]) -> str:
    """One row per p: mean ± std over seeds per prompt kind, and the difference from the lowest p, marked
    only when it exceeds the seed spread (``eval.seeds.RULE``); then the judge's ceiling and floor."""
    check_seeds(runs)
    kinds = ("original", "synthetic")
    stats = {k: aggregate(runs, lambda r, k=k: r.get("clip_score", {}).get(k)) for k in kinds}
    seeds = seeds_of(runs)
    base = next(iter(seeds))
    lines = [
        f"| training data | seeds | original prompt | synthetic prompt | Δ original vs p={base:g} "
        f"| Δ synthetic vs p={base:g} | prompts | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p, group in ((p, [r for r in runs if float(r["p"]) == p]) for p in seeds):
        cells = [format_spread(stats[k][p], scale=1) for k in kinds]
        deltas = ["" if p == base else format_delta(stats[k][p], stats[k][base], scale=1) for k in kinds]
        lines.append(
            f"| {_row_label(group[0])} | {','.join(map(str, seeds[p]))} | {cells[0]} | {cells[1]} | {deltas[0]} "
            f"| {deltas[1]} | {group[0].get('eval_prompts', 'n/a')} | {group[0].get('steps', 'n/a')} |"
        )
    ref = next((r for r in runs if r.get("clip_score_reference")), None)
    labels = {"real_images": "held-out real images (ceiling)", "noise_images": "uniform-noise images (floor)"}
    for name, label in labels.items():
        cs = (ref or {}).get("clip_score_reference", {}).get(name)
        if cs:
            orig, syn = _cell(cs["original"]), _cell(cs["synthetic"])
            lines.append(f"| {label} | - | {orig} | {syn} | | | {ref['eval_prompts']} | - |")
    return "\n".join(lines + ["", RULE])


GENEVAL_REFERENCE = {
    "real": "judge on real testbed renderings (ceiling)",
    "roundtrip": "same renderings through the pipeline's VAE (its ceiling)",
    "noise": "judge on uniform noise (floor)",
}


def geneval_tags(runs: list[dict]) -> list[str]:
    """GenEval tags scored in any run (in the runs' order); the n/a ones are listed under the table."""
    tags: list[str] = []
    for run in runs:
        for tag, value in run.get("geneval", {}).get("per_category", {}).items():
            if value is not None and tag not in tags:
                tags.append(tag)
    return tags


def geneval_keys(runs: list[dict]) -> list[str]:
    """The columns of the GenEval-style table: overall, the scored tags, then the judge's colour and count
    heads read whatever class it sees (``eval.geneval.ATTRIBUTES``) where the runs have them."""
    attrs = [k for k in ATTRIBUTES if any(summary_value(r.get("geneval"), k) is not None for r in runs)]
    return ["overall", *geneval_tags(runs), *attrs]


ATTRIBUTES_NOTE = (
    "- `color_any_class`, `count_any_class`: the judge's colour and count read on their own, whatever class it "
    "sees (GenEval's rule with the class ignored; the count only where a prompt asks for more than presence; not "
    "part of its overall). A model that draws colour and number before shape shows here first."
)


def _geneval_reference(runs: list[dict]) -> dict:
    """The judge's ceiling/floor block of the first run that has one (one judge serves the whole sweep); the VAE
    round trip (``roundtrip``) is averaged over the runs, whose VAEs may differ (the embedded one is per seed)."""
    blocks = [r["geneval"]["judge"] for r in runs if r.get("geneval", {}).get("judge")]
    if not blocks:
        return {}
    ref = dict(blocks[0])
    trips = [b["roundtrip"] for b in blocks if b.get("roundtrip")]

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    if trips:
        tags = {t for b in trips for t in b.get("per_category", {})}
        ref["roundtrip"] = {
            "overall": mean([b.get("overall") for b in trips]),
            "per_category": {t: mean([b["per_category"].get(t) for b in trips]) for t in sorted(tags)},
            "attributes": {k: mean([summary_value(b, k) for b in trips]) for k in ATTRIBUTES},
        }
    return ref


def geneval_table(runs: list[dict]) -> str:
    """GenEval-style accuracy (%) per p: overall (mean over applicable categories) and per category, mean ±
    std over seeds, the difference from the lowest p in parentheses (marked per ``eval.seeds.RULE``); then
    the judge's accuracy on real renderings of the same prompts (ceiling) and on uniform noise (floor)."""
    scored = [r for r in runs if r.get("geneval")]
    if not scored:
        return ""
    keys = geneval_keys(scored)
    stats = {k: aggregate(scored, lambda r, k=k: summary_value(r["geneval"], k)) for k in keys}
    seeds = seeds_of(scored)
    base = next(iter(seeds))
    lines = [
        f"| training data | seeds | {' | '.join(keys)} | images per category |",
        "|---|---|" + "---|" * len(keys) + "---|",
    ]
    for p, group in by_p(scored).items():
        cells = []
        for k in keys:
            cell = format_spread(stats[k][p])
            cells.append(cell if p == base else f"{cell} ({format_delta(stats[k][p], stats[k][base])})")
        n = group[0]["geneval"].get("n_images", {})
        images = ", ".join(f"{t}: {n[t]}" for t in keys if t in n) or MISSING
        lines.append(f"| {_row_label(group[0])} | {','.join(map(str, seeds[p]))} | {' | '.join(cells)} | {images} |")
    references = _geneval_reference(scored)
    for name, label in GENEVAL_REFERENCE.items():
        if ref := references.get(name):
            values = [summary_value(ref, k) for k in keys]
            cells = [MISSING if v is None else f"{100 * v:.1f}" for v in values]
            lines.append(f"| {label} | - | {' | '.join(cells)} | - |")
    na = {t: why for r in scored for t, why in r["geneval"].get("not_applicable", {}).items()}
    notes = [f"- n/a `{t}`: {why}" for t, why in na.items()]
    notes += [ATTRIBUTES_NOTE] if set(keys) & set(ATTRIBUTES) else []
    return "\n".join(lines + ([""] + notes if notes else []))


def plot_geneval(runs: list[dict], path: Path) -> Path | None:
    """PNG of GenEval-style accuracy against p, one line per category (error bars: std over seeds), the
    judge's ceiling dashed and its noise floor dotted in the line's colour."""
    scored = [r for r in runs if r.get("geneval")]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = geneval_keys(scored)
    ref = _geneval_reference(scored)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, tag in enumerate(keys):

        def get(r: dict, t: str = tag) -> float | None:
            return summary_value(r.get("geneval"), t)

        stats = {p: s for p, s in aggregate(scored, get).items() if s.mean is not None}
        ps = sorted(stats)
        color = f"C{i}"
        ax.errorbar(
            ps,
            [100 * stats[p].mean for p in ps],
            yerr=[100 * (stats[p].std or 0) for p in ps],
            marker="s" if tag in ATTRIBUTES else "o",
            capsize=3,
            color=color,
            label=f"{tag} (judge head)" if tag in ATTRIBUTES else tag,
            lw=2.5 if tag == "overall" else 1.5,
        )
        for name, style in (("real", "--"), ("roundtrip", "-."), ("noise", ":")):
            level = get({"geneval": ref[name]}) if ref.get(name) else None
            if level is not None:
                ax.axhline(100 * level, ls=style, color=color, lw=1, alpha=0.7)
    ax.set(xlabel="p (share of synthetic captions in training)", ylabel="GenEval-style accuracy (%)", ylim=(0, 100))
    ax.set_title("accuracy vs p (dashed: real renderings, dash-dot: through the VAE, dotted: noise)", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)


def distribution_table(runs: list[dict]) -> str:
    """Distance of generated from held-out real images per p (lower is closer): Fréchet distance of the judge
    CLIP's image embeddings (always), FID and KID x 1000 when Inception weights were given; then uniform noise."""
    scored = [r for r in runs if r.get("distribution", {}).get("clip_fd")]
    if not scored:
        return ""
    cols = [("clip_fd", "CLIP-FD", 1.0, 3)]
    if any("fid" in r["distribution"] for r in scored):
        cols += [("fid", "FID", 1.0, 1), ("kid", "KID x 1000", 1000.0, 2)]

    def value(run: dict, metric: str, kind: str) -> float | None:
        v = run["distribution"].get(metric, {}).get(kind)
        return v.get("mean") if isinstance(v, dict) else v

    head = [f"{label} {kind}" for _, label, _, _ in cols for kind in ("original", "synthetic")]
    lines = [
        f"| training data | seeds | {' | '.join(head)} | real / generated images |",
        "|---|---|" + "---|" * (len(head) + 1),
    ]
    seeds = seeds_of(scored)
    for p, group in by_p(scored).items():
        cells = [
            format_spread(aggregate(group, lambda r, m=m, k=k: value(r, m, k))[p], scale=scale, digits=digits)
            for m, _, scale, digits in cols
            for k in ("original", "synthetic")
        ]
        d = group[0]["distribution"]
        counts = f"{d['n_real']} / {d['n_generated'].get('original', MISSING)}"
        lines.append(f"| {_row_label(group[0])} | {','.join(map(str, seeds[p]))} | {' | '.join(cells)} | {counts} |")
    noise = [
        MISSING if (v := value(scored[0], m, "noise")) is None else f"{scale * v:.{digits}f}"
        for m, _, scale, digits in cols
        for _ in ("original", "synthetic")
    ]
    d0 = scored[0]["distribution"]
    counts = f"{d0['n_real']} / {d0['n_generated'].get('noise', MISSING)}"
    lines.append(f"| uniform-noise images (reference) | - | {' | '.join(noise)} | {counts} |")

    return "\n".join(lines)


CSV_FIELDS = ("row", "p", "seed", "steps", "clip_original", "clip_synthetic", "geneval_overall")


def report_csv(runs: list[dict]) -> str:
    """One row per run (then the judge's ceiling and floor): CLIP similarity, GenEval-style accuracy overall
    and per category (with images counted), distribution metrics with their sample counts."""
    tags = [k for k in geneval_keys(runs) if k != "overall"]
    kinds = ("original", "synthetic", "noise")
    fields = [*CSV_FIELDS, *(f"geneval_{t}" for t in tags), *(f"geneval_n_{t}" for t in tags)]
    fields += [f"{m}_{k}" for m in ("clip_fd", "fid", "kid") for k in kinds] + ["n_real", "n_generated"]
    rows = []
    for run in sorted(runs, key=lambda r: (float(r.get("p", 0)), int(r.get("seed") or 0))):
        g, d, cs = run.get("geneval") or {}, run.get("distribution") or {}, run.get("clip_score") or {}
        row = {"row": "run", "p": run.get("p"), "seed": run.get("seed", 0), "steps": run.get("steps")}
        row.update(
            clip_original=cs.get("original"), clip_synthetic=cs.get("synthetic"), geneval_overall=g.get("overall")
        )
        row.update({f"geneval_{t}": summary_value(g, t) for t in tags})
        row.update({f"geneval_n_{t}": g.get("n_images", {}).get(t) for t in tags})
        for m in ("clip_fd", "fid", "kid"):
            for k in kinds:
                v = d.get(m, {}).get(k)
                row[f"{m}_{k}"] = v.get("mean") if isinstance(v, dict) else v
        row.update(n_real=d.get("n_real"), n_generated=d.get("n_generated", {}).get("original"))
        rows.append(row)
    for name in GENEVAL_REFERENCE:
        ref = _geneval_reference(runs).get(name)
        if ref:
            rows.append(
                {
                    "row": f"judge_{name}",
                    "geneval_overall": ref.get("overall"),
                    **{f"geneval_{t}": summary_value(ref, t) for t in tags},
                }
            )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_t2i_report(runs: list[dict], out_dir: str | Path, notice: str | None = None) -> dict[str, Path]:
    """Write ``t2i_report.md`` (tables + grids + GenEval plot), ``t2i_report.json``, ``t2i_report.csv``,
    ``t2i_report.html`` (self-contained) and one grid PNG per p into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = next((r.get("eval_clip_model") for r in runs if r.get("eval_clip_model")), "?")
    parts = [
        "# Text-to-image: CLIP similarity of generated images with their prompts",
        "",
        f"CLIP similarity = 100 x cosine (torchmetrics CLIPScore), judged by open_clip `{judge}`; "
        "held-out samples, one image from the original alt-text and one from the synthetic caption. "
        "p is the share of training samples whose caption was drawn from the synthetic captions "
        "(p=0: alt-text only); in parentheses, the difference from the p=0 row. "
        "The last two rows score held-out real images and uniform noise with the same prompts "
        "(the judge's ceiling and floor).",
        "",
        format_table(runs),
        "",
    ]
    if notice:
        parts += [f"> {notice}", ""]
    paths: dict[str, Path] = {}
    parts += metric_sections(runs, out_dir, paths)
    shown: set[float] = set()  # one grid per p (with several seeds, the lowest seed's)
    for run in sorted(runs, key=lambda r: (r.get("p", 0), int(r.get("seed") or 0))):
        grid = run.get("grid")
        if grid and Path(grid).is_file() and float(run["p"]) not in shown:
            shown.add(float(run["p"]))
            dest = out_dir / f"t2i_grid_p{run['p']:g}.png"
            shutil.copyfile(grid, dest)
            paths[f"grid_p{run['p']:g}"] = dest
            parts += [
                f"## {_row_label(run)}",
                "",
                "Top row: generated from the alt-text; bottom row: from the synthetic caption "
                "(same prompts in every grid).",
                "",
                f"![p={run['p']:g}]({dest.name})",
                "",
            ]
    paths["markdown"] = atomic_write_text(out_dir / "t2i_report.md", "\n".join(parts))
    paths["json"] = atomic_write_json(out_dir / "t2i_report.json", {"notice": notice, "runs": runs})
    paths["csv"] = atomic_write_text(out_dir / "t2i_report.csv", report_csv(runs))
    from t2i.html_report import write_html_report

    tables = [
        ("CLIP similarity with the prompt", format_table(runs)),
        ("GenEval-style accuracy (%)", geneval_table(runs)),
        ("Distribution metrics (lower is closer to real)", distribution_table(runs)),
    ]
    html_path = out_dir / "t2i_report.html"
    paths["html"] = write_html_report(runs, html_path, tables, _row_label, notice, paths.get("geneval_plot"))
    return paths


def metric_sections(runs: list[dict], out_dir: Path, paths: dict[str, Path]) -> list[str]:
    """Markdown for the GenEval-style table (+ its plot, saved into ``out_dir``) and the distribution table."""
    parts: list[str] = []
    geneval = geneval_table(runs)
    if geneval:
        plot = plot_geneval(runs, out_dir / "t2i_geneval.png")
        paths["geneval_plot"] = plot
        n = next(r["geneval"].get("images_per_prompt") for r in runs if r.get("geneval"))
        parts += [
            "## GenEval-style accuracy (testbed judge)",
            "",
            f"Prompts from GenEval's categories written over the testbed world, {n} seeded images per prompt; "
            "an image is correct when the judge (a small CNN trained on labelled testbed renderings, "
            "`eval.judge`) sees every required object with its count and colour. Accuracy in %, mean ± std "
            "over seeds; in parentheses the difference from the lowest p. The last rows: the judge on real "
            "testbed renderings of the same prompts (what a perfect generator could reach through this judge), "
            "on the same renderings encoded and decoded by the pipeline's VAE (what a generator that decodes "
            "through it can reach) and on uniform noise (what an image with no content scores).",
            "",
            geneval,
            "",
            f"![GenEval-style accuracy against p]({plot.name})",
            "",
        ]
    dist = distribution_table(runs)
    if dist:
        parts += [
            "## Distribution metrics (against held-out real images)",
            "",
            "CLIP-FD: Fréchet distance between L2-normalised image embeddings of the scoring CLIP (no download); "
            "FID / KID (x 1000): torchmetrics with the local Inception weights, when `fid_inception_weights` "
            "is set. Real images are resized and centre-cropped to the generated size; both estimates are "
            "biased at small sample counts (last column), so compare rows of one report, not other papers.",
            "",
            dist,
            "",
        ]
    return parts
