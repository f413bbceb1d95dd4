"""``python -m caption_mixing stats``: caption lengths per source, in words and in tokens.

Shows how much of each source a text tower with a given context (77 tokens for CLIP) truncates,
which decides whether a long-caption policy matters for a corpus. Damaged shards and alt-text
that is not UTF-8 are counted like in training and reported after the table. A source with
several variants per image (LaCLIP, DataCompDR) counts every variant. Shards and sidecars may be
remote (``pipe:`` or fsspec URLs, ``--sidecar-dir s3://...``), read as training reads them.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from caption_mixing.atomic import atomic_write, atomic_write_json
from caption_mixing.long_captions import token_counter
from caption_mixing.mixing import ALT
from caption_mixing.paths import check_output_dir, validate_name
from caption_mixing.pipeline import DataErrors, attach_captions, read_shards
from caption_mixing.shards import expand_shards


def collect_lengths(
    shards: str,
    sources: tuple[str, ...],
    count_tokens,
    sidecar_dir: str | None,
    max_samples: int | None,
    progress: bool,
    errors: DataErrors | None = None,
) -> dict[str, dict[str, list[int]]]:
    """Per source: word and token counts of every non-blank caption (alt-text is source ``alt``)."""
    synthetic = tuple(s for s in sources if s != ALT)
    errors = DataErrors() if errors is None else errors
    pipe = wds.DataPipeline(
        wds.SimpleShardList(expand_shards(shards)),
        read_shards(errors),
        attach_captions(synthetic, sidecar_dir, errors),
    )
    lengths = {s: {"words": [], "tokens": []} for s in sources}
    for sample in tqdm(itertools.islice(pipe, max_samples), desc="captions", unit=" samples", disable=not progress):
        for source in sources:
            caption = sample["captions"].get(source)
            for text in caption if isinstance(caption, list) else [caption]:  # every variant counts
                if isinstance(text, str) and text.strip():
                    lengths[source]["words"].append(len(text.split()))
                    lengths[source]["tokens"].append(count_tokens(text))
    return lengths


def parse_sources(text: str) -> tuple[str, ...]:
    """``"alt,altogether"`` -> names; each must be a plain name (it names sidecar files)."""
    return tuple(validate_name(s.strip(), "--sources") for s in text.split(","))


def summarize_lengths(lengths: dict[str, dict[str, list[int]]], context_length: int) -> dict[str, dict]:
    out = {}
    for source, d in lengths.items():
        w, t = np.asarray(d["words"]), np.asarray(d["tokens"])
        if len(w) == 0:
            out[source] = {"captions": 0}
            continue
        out[source] = {
            "captions": int(len(w)),
            "words_mean": float(w.mean()),
            "words_median": float(np.median(w)),
            "words_p90": float(np.percentile(w, 90)),
            "words_max": int(w.max()),
            "tokens_mean": float(t.mean()),
            "tokens_median": float(np.median(t)),
            "tokens_p90": float(np.percentile(t, 90)),
            "tokens_max": int(t.max()),
            "truncated_share": float((t > context_length).mean()),
        }
    return out


def format_stats(summary: dict[str, dict], context_length: int) -> str:
    head = (
        "| source | captions | words mean | words p90 | tokens mean | tokens p90 | tokens max "
        f"| truncated at {context_length} |"
    )
    lines = [head, "|" + "---|" * 8]
    for source, s in summary.items():
        if not s["captions"]:
            lines.append(f"| {source} | 0 | — | — | — | — | — | — |")
            continue
        lines.append(
            f"| {source} | {s['captions']} | {s['words_mean']:.1f} | {s['words_p90']:.0f} | {s['tokens_mean']:.1f} "
            f"| {s['tokens_p90']:.0f} | {s['tokens_max']} | {100 * s['truncated_share']:.1f}% |"
        )
    return "\n".join(lines)


def plot_lengths(lengths: dict[str, dict[str, list[int]]], context_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for source, d in lengths.items():
        for ax, unit in zip(axes, ("words", "tokens"), strict=True):
            if d[unit]:
                ax.hist(d[unit], bins=40, alpha=0.5, label=source)
    axes[1].axvline(context_length, color="k", linestyle="--", label=f"context {context_length}")
    for ax, unit in zip(axes, ("words", "tokens"), strict=True):
        ax.set_xlabel(f"caption length ({unit})")
        ax.set_ylabel("captions")
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def stats(args: argparse.Namespace) -> int:
    sources = parse_sources(args.sources)  # before the slow import: bad arguments fail at once
    out = check_output_dir(args.out, "--out") if args.out else None
    import open_clip

    tokenizer = open_clip.get_tokenizer(args.model)
    context = args.context_length or tokenizer.context_length
    errors = DataErrors()
    lengths = collect_lengths(
        args.shards, sources, token_counter(tokenizer), args.sidecar_dir, args.max_samples, not args.quiet, errors
    )
    summary = summarize_lengths(lengths, context)
    print(format_stats(summary, context))
    if errors:
        print("data problems (see the warnings above): " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())))
    if out is not None:
        atomic_write_json(
            out / "caption_stats.json", {"model": args.model, "context_length": context, "sources": summary}
        )
        plot_lengths(lengths, context, out / "caption_lengths.png")
        print(f"wrote {out / 'caption_stats.json'} and {out / 'caption_lengths.png'}")
    return 0


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="brace pattern of the shards (paths, pipe: or fsspec URLs)")
    p.add_argument("--sources", default="alt,altogether", help="caption sources; 'alt' is the alt-text")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model whose tokenizer counts tokens")
    p.add_argument("--context-length", type=int, default=None, help="text context (default: the tokenizer's)")
    p.add_argument("--sidecar-dir", help="where the sidecars are, a folder or fsspec URL (default: next to the shards)")
    p.add_argument("--max-samples", type=int, default=None, help="look at the first N samples only")
    p.add_argument("--out", help="folder for caption_stats.json and caption_lengths.png")
    p.add_argument("--quiet", action="store_true")
