"""Table-5-style report: rows = training p (and caption source), columns = original / synthetic prompt."""

from __future__ import annotations

import shutil
from pathlib import Path

from caption_mixing.atomic import atomic_write_json, atomic_write_text


def _row_label(run: dict) -> str:
    p = run.get("p")
    src = run.get("synthetic_source", "altogether")
    if p == 0:
        return "alt-texts only (p=0)"
    return f"{src}, p={p:g}" + (" (no alt-text)" if p == 1 else "")


def format_table(runs: list[dict]) -> str:
    """Markdown table of CLIP similarity (100 x cosine) per training p."""
    lines = [
        "| training data | original prompt | synthetic prompt | prompts | steps |",
        "|---|---|---|---|---|",
    ]

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    for run in sorted(runs, key=lambda r: r.get("p", 0)):
        cs = run.get("clip_score", {})
        orig, syn = cs.get("original"), cs.get("synthetic")
        lines.append(
            f"| {_row_label(run)} | {cell(orig)} | {cell(syn)} "
            f"| {run.get('eval_prompts', 'n/a')} | {run.get('steps', 'n/a')} |"
        )
    ref = next((r for r in runs if r.get("clip_score_reference")), None)
    labels = {"real_images": "held-out real images (ceiling)", "noise_images": "uniform-noise images (floor)"}
    for name, label in labels.items():
        cs = (ref or {}).get("clip_score_reference", {}).get(name)
        if cs:
            lines.append(f"| {label} | {cell(cs['original'])} | {cell(cs['synthetic'])} | {ref['eval_prompts']} | - |")
    return "\n".join(lines)


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
        "The last two rows score held-out real images and uniform noise with the same prompts "
        "(the judge's ceiling and floor).",
        "",
        format_table(runs),
        "",
    ]
    if notice:
        parts += [f"> {notice}", ""]
    paths: dict[str, Path] = {}
    for run in sorted(runs, key=lambda r: r.get("p", 0)):
        grid = run.get("grid")
        if grid and Path(grid).is_file():
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
