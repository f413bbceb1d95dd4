"""``python -m caption_mixing {testbed,attach,import,export,stats}``: the library's command line.

``testbed`` is :mod:`testbed.cli`; ``import`` and ``export`` read and write MetaCLIP's caption
layout (:mod:`caption_mixing.metaclip`). Modules are imported when their command runs, so a data
command does not pay for the others' imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    # name, module, the module's argument function, its run function, help
    ("testbed", "testbed.cli", "add_cli_arguments", None, "build (or reuse) the embedded synthetic testbed"),
    ("attach", "caption_mixing.attach", "add_cli_arguments", "attach", "join caption sources to shards as sidecars"),
    (
        "import",
        "caption_mixing.attach",
        "add_import_arguments",
        "import_",
        "read MetaCLIP's {shard%%100}/{shard}.json captions into sidecars (attach --format metaclip)",
    ),
    (
        "export",
        "caption_mixing.metaclip",
        "add_export_arguments",
        "main_export",
        "write a source's sidecars in MetaCLIP's {shard%%100}/{shard}.json layout",
    ),
    ("stats", "caption_mixing.stats", "add_cli_arguments", "stats", "caption length per source, words and tokens"),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m caption_mixing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name, add_args, run, help_text in COMMANDS:
        if name != chosen:  # only the chosen command's module is imported (help lists them all)
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        sp = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        getattr(module, add_args)(sp)
        sp.set_defaults(run=getattr(module, run) if run else (getattr(module, "cli", None) or getattr(module, name)))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
