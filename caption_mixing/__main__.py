"""``python -m caption_mixing {testbed,attach,stats}``: the library's command line (``testbed``: :mod:`testbed.cli`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from caption_mixing import attach, stats
    from testbed import cli as testbed  # the synthetic testbed is its own package; its CLI is offered here too

    parser = argparse.ArgumentParser(prog="python -m caption_mixing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, help_text in (
        ("testbed", testbed, "build (or reuse) the embedded synthetic testbed"),
        ("attach", attach, "join a synthetic-caption source to shards as per-shard sidecars"),
        ("stats", stats, "caption length per source, in words and tokens, and the truncated share"),
    ):
        sp = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_cli_arguments(sp)
        sp.set_defaults(run=getattr(module, "cli", None) or getattr(module, name))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
