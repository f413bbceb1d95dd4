"""Run clip_benchmark's own CLI with one fix: a numpy-safe ``accuracy`` (upstream issue #147).

clip_benchmark 1.6.2's ``metrics.zeroshot_classification.accuracy`` does
``float(tensor.cpu().numpy())`` on a 1-element array, which numpy >= 2.4 rejects, so every
classification run of its CLI crashes. This launcher replaces only that function with
``eval.metrics.topk_accuracy`` (same signature, same result; the suite's one top-k) and then calls
``clip_benchmark.cli.main()`` unchanged; it can also register custom open_clip model configs first,
since the CLI loads ``--model NAME --pretrained PATH`` via open_clip.

    python -m eval.cb_launcher [--model-config-dir DIR] eval --dataset wds/x --dataset_root ... --model ...

``main(argv)`` also runs the CLI inside the calling process (the cross-check test does, to skip a second
interpreter start-up); the benchmark starts one process per task, as the CLI's users do.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from eval.metrics import topk_accuracy


def patch_clip_benchmark() -> None:
    """Swap the broken function in the module ``evaluate`` looks it up from."""
    from clip_benchmark.metrics import zeroshot_classification

    zeroshot_classification.accuracy = topk_accuracy


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    config_dirs = []
    while "--model-config-dir" in args:
        i = args.index("--model-config-dir")
        if i + 1 >= len(args):
            raise SystemExit("--model-config-dir needs a folder")
        config_dirs.append(args[i + 1])
        del args[i : i + 2]
    from eval.model_loading import register_model_configs  # importing it registers EmbeddedCLIP-Tiny

    for d in config_dirs:
        register_model_configs(d)
    patch_clip_benchmark()
    from clip_benchmark import cli

    saved, sys.argv = sys.argv, ["clip_benchmark", *args]
    try:
        cli.main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
