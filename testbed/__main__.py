"""``python -m testbed``: build (or reuse) the synthetic testbed; see :mod:`testbed.cli` for the flags."""

from testbed.cli import main

raise SystemExit(main())
