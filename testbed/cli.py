"""Build (or reuse) the synthetic testbed from the command line and print what it holds.

THIS IS A SYNTHETIC TESTBED: its numbers exercise the suite and are never paper results.
Run as ``python -m testbed`` or ``python -m caption_mixing testbed``; without ``--out`` the build
goes to the cache folder named by its fingerprint, and a matching build there is reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from testbed.cache import build_testbed, default_testbed_root, ensure_testbed
from testbed.world import NOTICE, TestbedConfig


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for building the testbed from the command line."""
    d = TestbedConfig()
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: cache folder by fingerprint)")
    parser.add_argument("--num-train", type=int, default=d.num_train, help="number of training samples")
    parser.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per train shard")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=d.seed, help="generator seed")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching testbed exists")


def cli(args: argparse.Namespace) -> int:
    """Build (or reuse unless --force) and print a summary."""
    config = TestbedConfig(
        num_train=args.num_train, shard_size=args.shard_size, image_size=args.image_size, seed=args.seed
    )
    root = args.out if args.out is not None else default_testbed_root(config)
    if args.force:
        print(f"testbed: building {Path(root).resolve()} (--force)", flush=True)
        tb = build_testbed(root, config)
    else:
        tb = ensure_testbed(root, config)
    doc = tb.manifest()
    train = doc["train"]
    print(f"root:        {tb.root}")
    print(f"fingerprint: {doc['fingerprint']}  (built in {doc['build_seconds']} s)")
    print(f"train:       {tb.num_train} samples in {train['num_shards']} shards: {tb.train_shards}")
    print(f"alt-text:    {train['alt_kind_counts']}")
    for src, st in train["sidecars"].items():
        print(f"sidecar:     {src}: {st['captions']} captions, {st['missing']} missing, {st['empty']} empty")
    for task, info in doc["eval"].items():
        print(f"eval:        {task:<18} {info['num_samples']:>5} images  {tb.eval_tasks[task]}")
    print(f"notice:      {NOTICE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m testbed``: parse the flags and build."""
    parser = argparse.ArgumentParser(
        prog="python -m testbed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_cli_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cli(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
