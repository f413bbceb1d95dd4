"""Zero-shot evaluation (clip_benchmark local-WebDataset folders) and sweep reports.

This package knows nothing about training. One path evaluates: ``eval.tasks.parse_task_spec`` turns a
task spec (groups, registry names, ``NAME=PATH``) into tasks, ``eval.preflight.check_tasks`` checks their
data without a model, ``eval.runner.run_suite`` scores them on a loaded model by each task's registry
metric, and ``eval.results.metrics_document`` is the ``metrics.json`` both ``python -m eval zeroshot`` and
the training sweep write. ``eval.report`` / ``eval.paper_report`` read those files back.
``python -m eval --help`` lists the commands.

Modules: tasks (registry, groups, spec parser), locate (where a task's data is), wds_folder (folder
layout checks), prompts (class names and templates: MetaCLIP's clipeval lists by default, or
clip_benchmark's), zeroshot (scoring one classification or retrieval task), association (WinoGAViL as
DataComp scores it), metrics (top-k and the paper's metrics from logits), runner (the suite), results
(summaries, metrics.json), preflight, classifier_cache, model_loading, report / paper_report, prepare /
wds_writer / video (dataset conversion), cb_launcher (clip_benchmark's CLI with the numpy fix).
"""

from eval.preflight import check_tasks
from eval.results import metrics_document, summarize
from eval.runner import run_suite
from eval.tasks import parse_task_spec

__all__ = ["check_tasks", "metrics_document", "parse_task_spec", "run_suite", "summarize"]
