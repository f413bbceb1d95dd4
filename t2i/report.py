"""Table-5-style report: rows = training p (and caption source), columns = original / synthetic prompt.

Every row but the p=0 (alt-text only) row shows its difference from that row in parentheses, as the
paper's Table 6 does against its alt-text baseline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from caption_mixing.atomic import atomic_write_json, atomic_write_text
from eval.seeds import RULE, aggregate, check_seeds, format_delta, format_spread, has_repeats, seeds_of


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


def write_t2i_report(runs: list[dict], out_dir: str | Path, notice: str | None = None) -> dict[str, Path]:
    """Write ``t2i_report.md`` (table + grids), ``t2i_report.json`` and one grid PNG per p into ``out_dir``."""
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
    return paths
