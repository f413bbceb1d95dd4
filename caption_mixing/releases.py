"""The published recaption sets ``attach`` reads as released (``--format NAME``), and how the
command line becomes one attach plan.

Each release names its file layout, how its records find a sample (``joins``), which columns hold
captions (read as variants of one source unless ``--columns`` splits them into several sources)
and which numeric columns come along (``--fields``). With a release format, coverage below
``--min-coverage`` is reported, not fatal, unless the flag is given: 91-97% URL matches and ~30%
dead links are normal for these sets.
"""

from __future__ import annotations

import argparse
import glob as globlib
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from caption_mixing.caption_files import FORMATS, VALUE, Table, detect_format
from caption_mixing.caption_index import DUPLICATE_RULES
from caption_mixing.joins import JOINS
from caption_mixing.paths import validate_name

DEFAULT_MIN_COVERAGE = 0.95
GENERIC = ("jsonl", "parquet", "csv", "tsv", "json-dict")


@dataclass(frozen=True)
class Release:
    name: str
    title: str
    reader: str  # a caption_files format, or "member" (in the shard) or "metaclip" (per-shard JSON files)
    joins: dict[str, str | None]  # join -> the file column holding its value (first = default)
    columns: tuple[str, ...]  # caption columns read by default, as variants of one source
    known: tuple[str, ...] = ()  # other columns of the release, for --columns
    fields: tuple[str, ...] = ()  # numeric columns attached by default
    member: str | None = None  # in-shard member holding the captions
    member_field: str | None = None  # field of that member (or of a per-shard JSON value) holding them
    example: str = ""

    @property
    def join(self) -> str:
        return next(iter(self.joins))


RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        Release(
            "dreamlip",
            "DreamLIP (CC3M/CC12M/YFCC15M): {set}_3long_3short_1raw_captions_url.csv",
            "csv",
            {"url": "Image Path"},
            (
                "shortIB_captions",
                "longIB_captions",
                "shortSV_captions",
                "longSV_captions",
                "shortLLA_captions",
                "longLLA_captions",
            ),
            known=("raw_caption",),
            example="--format dreamlip --captions cc12m_3long_3short_1raw_captions_url.csv "
            "--columns long_llava=longLLA_captions,short_llava=shortLLA_captions,"
            "dreamlip=shortIB_captions+longIB_captions",
        ),
        Release(
            "capsfusion",
            "CapsFusion-120M: capsfusion_{1..4}.parquet",
            "parquet",
            {"url": "image_url"},
            ("capsfusion",),
            known=("laion_2b", "laion_coco"),
            example="--format capsfusion --captions 'capsfusion_{1..4}.parquet' "
            "--columns capsfusion=capsfusion,laion_coco=laion_coco",
        ),
        Release(
            "pixelprose",
            "PixelProse: Parquet with uid, url, key, status, original_caption, vlm_model, vlm_caption",
            "parquet",
            {"url": "url"},
            ("vlm_caption",),
            known=("original_caption",),
            example="--format pixelprose --captions 'pixelprose/*.parquet' --name pixelprose",
        ),
        Release(
            "recap-datacomp",
            "Recap-DataComp-1B: Parquet with url, re_caption, org_caption, sha256, key, re_clip_score, ...",
            "parquet",
            {"sha256": "sha256", "url": "url"},
            ("re_caption",),
            known=("org_caption",),
            fields=("re_clip_score", "org_clip_score"),
            example="--format recap-datacomp --captions 'recap/*.parquet' --name recap",
        ),
        Release(
            "vecap",
            "VeCap: JSON files, each one object {url: caption}",
            "json-dict",
            {"url": None},
            (VALUE,),
            example="--format vecap --captions 'vecap/*.json' --name vecap",
        ),
        Release(
            "datacomp-blip2",
            "DataComp BLIP2 captions: CSV with uid, blip2-cap (one file per sampling temperature)",
            "csv",
            {"uid": "uid"},
            ("blip2-cap",),
            example="--format datacomp-blip2 --captions blip2_temp0.75.csv --name blip2_t075",
        ),
        Release(
            "datacompdr",
            'DataCompDR: in-shard member {key}.syn.json = {"syn_text": [5 captions]}',
            "member",
            {"member": None},
            (VALUE,),
            member="syn.json",
            member_field="syn_text",
            example="--format datacompdr --name datacompdr",
        ),
        Release(
            "laclip",
            "LaCLIP: {set}_{chatgpt,bard,mscoco,human}.txt, line-aligned with the input TSV",
            "lines",
            {"row": None},
            (),
            example="--format laclip --captions 'cc12m_{chatgpt,bard,mscoco,human}.txt' --original cc12m.tsv "
            "--name laclip",
        ),
        Release(
            "metaclip",
            "MetaCLIP syn_ratio sidecars: {cap_dir}/{shard % 100}/{shard}.json = {uuid: caption} "
            '(or its captioner\'s {uuid: {"altogether": caption}})',
            "metaclip",
            {"member": None},
            (VALUE,),
            member_field="altogether",
            example="--format metaclip --captions /data/metaclip/altogether_caps --name altogether",
        ),
    )
}


@dataclass(frozen=True)
class AttachPlan:
    """Everything ``attach`` reads and writes, resolved from the command line."""

    run_name: str
    release: str | None
    provider: str  # index (caption files) | member | json-field | metaclip
    join: str
    table: Table | None
    sources: tuple[tuple[str, tuple[int, ...]], ...]  # source -> value columns read as its variants
    fields: tuple[tuple[str, int], ...] = ()  # numeric field -> value column
    shard_field: str | None = None
    member: str | None = None
    member_field: str | None = None
    cap_dir: str | None = None
    duplicates: str = "error"
    rows_per_shard: int = 10000
    min_coverage: float = DEFAULT_MIN_COVERAGE
    coverage_fatal: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sources)

    @property
    def checks_rows(self) -> bool:
        return self.join == "row" and self.table is not None and self.table.original is not None

    def settings(self) -> dict:
        return {
            "run_name": self.run_name,
            "release": self.release,
            "provider": self.provider,
            "join": self.join,
            "table": None if self.table is None else {**self.table.__dict__},
            "sources": [[n, list(c)] for n, c in self.sources],
            "fields": [list(f) for f in self.fields],
            "shard_field": self.shard_field,
            "member": self.member,
            "member_field": self.member_field,
            "cap_dir": self.cap_dir,
            "duplicates": self.duplicates,
            "rows_per_shard": self.rows_per_shard,
        }


def expand_files(spec: str, flag: str = "--captions") -> tuple[str, ...]:
    """``a.parquet,b.parquet``, ``'capsfusion_{1..4}.parquet'`` or ``'vecap/*.json'`` -> files in order."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        for item in braceexpand.braceexpand(part):
            if any(ch in item for ch in "*?["):
                hits = sorted(globlib.glob(item))
                if not hits:
                    raise FileNotFoundError(f"{flag}: {item!r} matches no file")
                out.extend(hits)
            else:
                out.append(item)
    if not out:
        raise ValueError(f"{flag}: {spec!r} names no file")
    missing = [p for p in out if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{flag}: caption file {missing[0]} does not exist")
    return tuple(dict.fromkeys(out))


def parse_columns(spec: str) -> list[tuple[str, tuple[str, ...]]]:
    """``long_llava=longLLA_captions,dreamlip=shortIB_captions+longIB_captions`` -> [(source, columns)]."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, sep, cols = item.partition("=")
        columns = tuple(c.strip() for c in cols.split("+") if c.strip())
        if not sep or not columns:
            raise ValueError(f"--columns: {item!r} is not source=column or source=column+column")
        out.append((validate_name(name.strip(), "--columns"), columns))
    if len({n for n, _ in out}) < len(out):
        raise ValueError(f"--columns: a source is named twice in {spec!r}")
    return out


def _laclip_styles(files: tuple[str, ...]) -> tuple[str, ...]:
    """``cc12m_chatgpt.txt`` -> ``chatgpt`` (the file stem if styles would repeat)."""
    stems = [Path(f).name.split(".")[0] for f in files]
    styles = [s.rsplit("_", 1)[-1] for s in stems]
    return tuple(styles if len(set(styles)) == len(styles) else stems)


def _release(args: argparse.Namespace) -> Release | None:
    fmt = args.format
    if fmt is None or fmt in GENERIC:
        return None
    if fmt not in RELEASES:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join([*RELEASES, *GENERIC])}")
    return RELEASES[fmt]


def _sources(args: argparse.Namespace, default: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    if args.columns:
        if args.caption_field:
            raise ValueError("--columns and --caption-field: give one of them")
        return parse_columns(args.columns)
    if not args.name:
        raise ValueError("--name is required (or --columns source=column,...)")
    return [(validate_name(args.name, "--name"), (args.caption_field,) if args.caption_field else default)]


def _fields(args: argparse.Namespace, release: Release | None) -> list[tuple[str, str]]:
    spec = args.fields if args.fields is not None else ",".join(release.fields if release else ())
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip() and s.strip() != "none"):
        name, _, col = item.partition("=")
        out.append((validate_name(name.strip(), "--fields"), (col or name).strip()))
    return out


def _table_plan(args: argparse.Namespace, release: Release | None, join: str) -> tuple[Table, list, list, list]:
    """The caption files to index, the sources and fields read from them, and the value columns."""
    files = expand_files(args.captions)
    if release is not None:
        fmt = release.reader
    elif args.format in GENERIC:
        fmt = args.format
    else:
        fmt = detect_format(files[0], args.key_field or ("url" if join == "url" else "key"))
    if release is not None and release.reader == "lines":
        styles = _laclip_styles(files)
        sources = _sources(args, styles)
        unknown = [c for _, cols in sources for c in cols if c not in styles]
        if unknown:
            raise ValueError(f"--columns: {unknown[0]!r} is not a rewrite style of --captions ({', '.join(styles)})")
        if not args.original:
            raise ValueError(
                "--format laclip: give --original (the input TSV, or LaCLIP's original-caption file): rows are "
                "matched by index and checked against the original caption"
            )
        for f in files:
            if detect_format(f) != "lines":
                raise ValueError(f"--captions: {f} is not a .txt file of one rewrite per line")
        columns = list(styles)
        table = Table(files, "lines", None, styles, original=args.original)
        return table, sources, columns, []
    default = release.columns if release is not None else ("caption",)
    sources = _sources(args, default)
    fields = _fields(args, release)
    columns = list(dict.fromkeys([c for _, cols in sources for c in cols] + [c for _, c in fields]))
    if release is not None:
        key_field = args.key_field or release.joins[join]
    else:
        key_field = args.key_field or ("url" if join == "url" else join if join in ("uid", "sha256") else "key")
    if fmt == "json-dict":
        key_field = None
    if fmt not in FORMATS or fmt == "lines" and release is None:
        raise ValueError(f"--captions: {files[0]} is a {fmt} file; --format laclip reads line-aligned .txt files")
    return Table(files, fmt, key_field, tuple(columns)), sources, columns, fields


def plan_from_args(args: argparse.Namespace) -> AttachPlan:
    """Resolve the command line into a plan; bad combinations are errors naming the flag."""
    release = _release(args)
    join = args.join_on or (release.join if release else "key")
    if join not in JOINS:
        raise ValueError(f"--join-on: {join!r} is not one of {', '.join(JOINS)}")
    if release is not None and join not in release.joins:
        raise ValueError(f"--join-on {join}: --format {release.name} joins on {' or '.join(release.joins)}")
    duplicates = args.duplicates or ("error" if join in ("key", "row", "member") else "first")
    if duplicates not in DUPLICATE_RULES:
        raise ValueError(f"--duplicates: {duplicates!r} is not one of {', '.join(DUPLICATE_RULES)}")
    common = {
        "release": release.name if release else None,
        "duplicates": duplicates,
        "shard_field": args.shard_field,
        "rows_per_shard": args.rows_per_shard,
        "min_coverage": DEFAULT_MIN_COVERAGE if args.min_coverage is None else args.min_coverage,
        "coverage_fatal": release is None or args.min_coverage is not None,
    }
    if not 0.0 <= common["min_coverage"] <= 1.0:
        raise ValueError(f"--min-coverage: {args.min_coverage} is not a share in [0, 1]")
    if args.rows_per_shard < 1:
        raise ValueError(f"--rows-per-shard: {args.rows_per_shard} must be positive")
    in_shard = args.from_member or args.from_json_field or (release is not None and release.reader == "member")
    if in_shard or (release is not None and release.reader == "metaclip"):
        return _member_plan(args, release, common)
    if not args.captions:
        raise ValueError("--captions is required (or --from-member / --from-json-field for captions inside the shards)")
    if join == "member":
        raise ValueError("--join-on member is for captions inside the shards (--from-member, --format datacompdr)")
    table, sources, columns, fields = _table_plan(args, release, join)
    plan_sources = tuple((n, tuple(columns.index(c) for c in cols)) for n, cols in sources)
    return AttachPlan(
        run_name=validate_name(args.name or sources[0][0], "--name"),
        provider="index",
        join=join,
        table=table,
        sources=plan_sources,
        fields=tuple((n, columns.index(c)) for n, c in fields),
        **common,
    )


def _member_plan(args: argparse.Namespace, release: Release | None, common: dict) -> AttachPlan:
    if args.captions and (release is None or release.reader != "metaclip"):
        raise ValueError("--captions cannot be combined with captions inside the shards")
    if args.columns:
        raise ValueError("--columns: captions inside the shards form one source; use --name")
    if not args.name:
        raise ValueError("--name is required")
    name = validate_name(args.name, "--name")
    if release is not None and release.reader == "metaclip":
        if not args.captions:
            raise ValueError("--format metaclip: give the caption folder as --captions (holding {shard % 100}/...)")
        provider, member, cap_dir = "metaclip", None, args.captions
    elif args.from_json_field:
        provider, member, cap_dir = "json-field", args.from_json_field, None
    else:
        provider, cap_dir = "member", None
        member = (args.from_member or release.member).lower()
    member_field = args.member_field or (release.member_field if release else None)
    return AttachPlan(
        run_name=name,
        provider=provider,
        join="member",
        table=None,
        sources=((name, (0,)),),
        member=member,
        member_field=member_field,
        cap_dir=cap_dir,
        **common,
    )


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that choose what is read and how it is joined (``attach`` adds where it writes)."""
    p.add_argument(
        "--shards", required=True, help="brace pattern, e.g. '/data/cc12m/{00000..01242}.tar', or pipe:/s3:// URLs"
    )
    p.add_argument("--name", help="caption source name, e.g. altogether_r3 (sidecar suffix; letters, digits, ._-)")
    p.add_argument(
        "--format",
        help=f"a release ({', '.join(RELEASES)}) or a generic format ({', '.join(GENERIC)}); default: by extension",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--captions",
        help="caption file(s): comma list, brace or glob pattern (.jsonl .json .parquet .csv .tsv .txt, .gz ok); "
        "for --format metaclip, the caption folder",
    )
    src.add_argument("--from-member", metavar="EXT", help="captions inside the shards as {key}.EXT, e.g. syn.txt")
    src.add_argument("--from-json-field", metavar="FIELD", help="captions inside the shards as a field of {key}.json")
    p.add_argument("--member-field", help="field of a JSON member holding the captions (e.g. syn_text)")
    p.add_argument(
        "--columns",
        help="several sources in one pass: source=column[+column...],... (columns joined by + are variants)",
    )
    p.add_argument("--fields", help="numeric columns to attach as sidecar fields: name[=column],... ('none': none)")
    p.add_argument("--key-field", help="caption file column holding the join value (default: per format and join)")
    p.add_argument("--caption-field", help="caption file column holding the caption (default: caption)")
    p.add_argument("--join-on", choices=list(JOINS), help="how records find samples (default: per format, else key)")
    p.add_argument("--shard-field", help="field of {key}.json holding the join value (default: the join's name)")
    p.add_argument("--duplicates", choices=list(DUPLICATE_RULES), help="rule for a join value repeated in the file")
    p.add_argument("--original", help="row joins: the input file's original captions (TSV/CSV/txt) to check rows")
    p.add_argument("--rows-per-shard", type=int, default=10000, help="row joins: img2dataset number_sample_per_shard")
    p.add_argument(
        "--min-coverage",
        type=float,
        default=None,
        help=f"fail below this share of samples matched (default {DEFAULT_MIN_COVERAGE}; "
        "with a release --format only reported unless given)",
    )
