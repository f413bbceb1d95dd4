"""One self-contained HTML page per text-to-image sweep: the images a person needs to judge the numbers.

Per p (its lowest seed): the held-out prompts side by side, the image generated from the alt-text next to
the one from the synthetic caption (same prompt index, same seed), with the judge's reading of each
under it; then GenEval-style prompts with their seeded images and the judge's verdict under each. Above
them the report's tables and the GenEval plot. Every image is embedded as a base64 PNG, so the page
can be mailed or archived alone (no ``src`` points outside it).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from caption_mixing.atomic import atomic_write_text

HOLDOUT_ROWS = 16  # held-out prompt pairs shown per p
GENEVAL_RECORDS_PER_TAG = 4  # GenEval prompts shown per category and p

STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; font-size: 13px; }
img.s { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
.ok { color: #176e1b; } .bad { color: #b3261e; } .prompt { max-width: 360px; }
figure { display: inline-block; margin: 4px; text-align: center; font-size: 12px; width: 110px; }
"""


def png_data_uri(image: Image.Image | Path) -> str:
    """``data:image/png;base64,...`` of an image or image file (re-encoded as PNG)."""
    img = Image.open(image) if isinstance(image, Path) else image
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<em>missing: {html.escape(path.name)}</em>"
    return f'<img class="s" src="{png_data_uri(path)}" alt="{html.escape(alt, quote=True)}">'


def markdown_table_html(text: str) -> str:
    """The report's markdown tables (and the notes under them) as HTML."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append("</table>")
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # the |---| separator
                rows.append(cells)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line.lstrip('- '))}</p>")
    flush()
    return "\n".join(out)


def _reading(r: dict | None) -> str:
    """The judge's reading of one held-out image, marked against the scene's truth when it is known."""
    if not r:
        return ""
    said = f"{r.get('count', '?')} × {r.get('color', '?')} {r.get('category', '?')}"
    match = r.get("match")
    if match is None:
        return f"<div>judge: {html.escape(said)}</div>"
    cls = "ok" if all(match.values()) else "bad"
    wrong = ", ".join(k for k, v in match.items() if not v)
    return (
        f'<div class="{cls}">judge: {html.escape(said)}{" (wrong " + html.escape(wrong) + ")" if wrong else " ✓"}</div>'
    )


def holdout_section(run_dir: Path) -> str:
    """Alt-text vs synthetic-caption images of the same held-out samples (same seed per row)."""
    samples = run_dir / "samples"
    prompts = samples / "prompts.jsonl"
    if not prompts.is_file():
        return "<p><em>no held-out samples in this run folder</em></p>"
    rows = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()][:HOLDOUT_ROWS]
    readings = {}
    if (samples / "judge.jsonl").is_file():
        readings = {r["key"]: r for r in map(json.loads, (samples / "judge.jsonl").read_text().splitlines())}
    head = ("seed", "alt-text prompt", "image", "synthetic prompt", "image")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        judged = readings.get(row["key"], {})
        truth = judged.get("truth")
        scene = f"<br><small>scene: {html.escape(_truth_text(truth))}</small>" if truth else ""
        cells = [f"{row.get('seed', i)}{scene}"]
        for col in ("alt", "synthetic"):
            cells.append(html.escape(row[col]))
            cells.append(_img(samples / col / f"{row['key']}.png", row[col]) + _reading(judged.get(col)))
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _truth_text(truth: dict) -> str:
    return f"{truth.get('count', '?')} × {truth.get('color', '?')} {truth.get('category', '?')}"


def geneval_section(folder: Path) -> str:
    """GenEval-style prompts with their images and the judge's verdict (from ``geneval.json``) under each."""
    from eval.geneval import sample_path

    result = folder / "geneval.json"
    if not result.is_file():
        return "<p><em>no GenEval-style results in this run</em></p>"
    doc = json.loads(result.read_text())
    verdicts = (doc.get("scores") or doc).get("verdicts", [])
    by_index: dict[int, list[dict]] = {}
    for v in verdicts:
        by_index.setdefault(int(v["index"]), []).append(v)
    shown: dict[str, int] = {}
    out = ["<table><tr><th>category</th><th>prompt</th><th>images (judge's verdict)</th></tr>"]
    for index, group in sorted(by_index.items()):
        tag = group[0]["tag"]
        if shown.get(tag, 0) >= GENEVAL_RECORDS_PER_TAG:
            continue
        shown[tag] = shown.get(tag, 0) + 1
        figs = []
        for v in sorted(group, key=lambda v: int(v["sample"])):
            path = sample_path(folder, index, int(v["sample"]))
            cls, mark = {True: ("ok", "✓"), False: ("bad", "✗")}.get(v["correct"], ("", "n/a"))
            reason = html.escape(str(v.get("reason") or ""))
            seen = f"<br>judge sees {html.escape(_truth_text(v['predicted']))}" if v.get("predicted") else ""
            figs.append(
                f'<figure>{_img(path, group[0]["prompt"])}<span class="{cls}">{mark}</span> {reason}{seen}</figure>'
            )
        out.append(
            f"<tr><td>{html.escape(tag)}</td><td>{html.escape(group[0]['prompt'])}</td><td>{''.join(figs)}</td></tr>"
        )
    return "\n".join(out + ["</table>"])


def write_html_report(
    runs: list[dict],
    path: Path,
    tables: list[tuple[str, str]],
    label: Callable[[dict], str],
    notice: str | None = None,
    plot: Path | None = None,
) -> Path:
    """The sweep's page: ``tables`` ((title, markdown table) from ``t2i.report``), the GenEval plot, then per
    p (``label`` names its row) the held-out pairs and the GenEval images."""
    body = ["<h1>Text-to-image sweep</h1>"]
    if notice:
        body.append(f"<p><strong>{html.escape(notice)}</strong></p>")
    for title, table in tables:
        if table:
            body += [f"<h2>{html.escape(title)}</h2>", markdown_table_html(table)]
    if plot is not None and Path(plot).is_file():
        body.append(f'<p><img src="{png_data_uri(Path(plot))}" alt="GenEval-style accuracy against p"></p>')
    shown: set[float] = set()
    for run in sorted(runs, key=lambda r: (float(r.get("p", 0)), int(r.get("seed") or 0))):
        if float(run.get("p", 0)) in shown or not run.get("run_dir"):
            continue
        shown.add(float(run.get("p", 0)))
        run_dir = Path(run["run_dir"])
        seed = int(run.get("seed") or 0)
        body += [
            f"<h2>{html.escape(label(run))} (training seed {seed})</h2>",
            "<h3>Held-out prompts: alt-text vs synthetic caption, same seed per row</h3>",
            holdout_section(run_dir),
        ]
        if run.get("geneval", {}).get("folder"):
            body += ["<h3>GenEval-style prompts</h3>", geneval_section(Path(run["geneval"]["folder"]))]
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Text-to-image sweep</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    return atomic_write_text(path, page)
