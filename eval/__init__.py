"""Zero-shot evaluation (clip_benchmark local-WebDataset folders) and sweep reports.

This package knows nothing about training: it takes a model, a tokenizer and an eval transform
(``eval.zeroshot``, ``eval.runner``), a checkpoint file (``python -m eval zeroshot``), or the
``metrics.json`` files runs leave behind (``eval.report``, ``eval.paper_report``). The paper's 26
tasks, retrieval and DataComp groups live in ``eval.tasks``; ``python -m eval --help`` lists the commands.
"""

from eval.report import format_table, load_run, write_sweep_report
from eval.zeroshot import (
    evaluate_classification,
    evaluate_retrieval,
    evaluate_tasks,
    is_retrieval_dataset,
    summarize,
)

__all__ = [
    "evaluate_classification",
    "evaluate_retrieval",
    "evaluate_tasks",
    "format_table",
    "is_retrieval_dataset",
    "load_run",
    "summarize",
    "write_sweep_report",
]
