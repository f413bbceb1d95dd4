"""``python -m caption_mixing testbed ...``: the library's command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from caption_mixing import testbed

    parser = argparse.ArgumentParser(prog="python -m caption_mixing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tb = sub.add_parser("testbed", help="build (or reuse) the embedded synthetic testbed")
    testbed.add_cli_arguments(tb)
    tb.set_defaults(run=testbed.cli)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
