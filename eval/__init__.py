"""Zero-shot evaluation (clip_benchmark local-WebDataset folders) and sweep reports.

This package knows nothing about training: it takes a model, a tokenizer and an eval transform
(``eval.zeroshot``), or the ``metrics.json`` files runs leave behind (``eval.report``).
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
