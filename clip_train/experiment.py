"""One CLIP point of a ratio sweep: what ``training.point.run_point`` needs from this application.

``ClipApp`` says where the run folder is, resolves the data (building the embedded testbed when
the config names it), checks every eval task before the first step, trains with
``clip_train.train.train`` and evaluates the final checkpoint through ``eval.runner.run_suite``,
the same path (and ``metrics.json`` schema) as ``python -m eval zeroshot``. The run folder's reuse
and refusal, metadata, timings and training fields of ``metrics.json`` are the shared runtime's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from caption_mixing.mixconfig import mode_tag
from clip_train.config import ClipTrainConfig
from clip_train.evaluation import EMBEDDED, EvalPlan, check, eval_plan, run_eval
from clip_train.train import train
from eval.model_loading import load_model
from eval.results import metrics_document
from training import point, rundir
from training.distributed import init_distributed

TASK = "clip"


class Data(NamedTuple):
    """Where a config's training data and eval tasks are."""

    shards: str  # train shard pattern
    evals: EvalPlan  # eval tasks and their dataset root
    uses_testbed: bool
    num_samples: int | None  # the training set's size when known (the testbed's)


def resolve_data(cfg: ClipTrainConfig, testbed_dir: str | None = None) -> Data:
    """Where a config's training and eval data are (the testbed is loaded at most once)."""
    uses_testbed = cfg.train_shards == EMBEDDED or cfg.eval_tasks == EMBEDDED
    testbed = None
    if uses_testbed:
        from testbed import load_testbed

        testbed = load_testbed(testbed_dir)
    shards = testbed.train_shards if cfg.train_shards == EMBEDDED else cfg.train_shards
    num_samples = testbed.num_train if cfg.train_shards == EMBEDDED else None
    return Data(shards, eval_plan(cfg, testbed.root if testbed else None), uses_testbed, num_samples)


def run_dir_for(out: Path, cfg: ClipTrainConfig) -> Path:
    """``OUT/clip-<preset>-p<p>[-<mode>][-s<seed>]``: the mode (``mixconfig.mode_tag``: gate, both, ...; none for
    the paper's random draw) and seed (none for seed 0: ``training.rundir.seed_label``) tell runs of one p apart."""
    label = "-".join(x for x in (mode_tag(cfg), rundir.seed_label(cfg.seed)) if x) or None
    return rundir.run_dir_for(out, TASK, cfg.preset, cfg.p, label=label)


class ClipApp:
    """The CLIP application's hooks for ``training.point.run_point`` (see ``training.point.PointApp``)."""

    def run_dir(self, out: Path, cfg: ClipTrainConfig) -> Path:
        return run_dir_for(out, cfg)

    def resolve(self, cfg: ClipTrainConfig, testbed_dir: str | None) -> Data:
        return resolve_data(cfg, testbed_dir)

    def preflight(self, cfg: ClipTrainConfig, data: Data) -> None:
        """Eval folders and class names, and the quick-eval subset, before anything is written."""
        check(cfg, data.evals)

    def train(self, cfg: ClipTrainConfig, run_dir: Path, data: Data) -> Path:
        return train(cfg, run_dir, data.shards, cfg.sidecar_dir, num_samples=data.num_samples, evals=data.evals)

    def evaluate(self, cfg: ClipTrainConfig, run_dir: Path, ckpt: Path, data: Data) -> dict[str, Any]:
        """The final checkpoint, loaded as ``python -m eval zeroshot`` loads it, on every eval task."""
        device = init_distributed(cfg.device).device
        model, tokenizer, preprocess, model_id = load_model(cfg.model, ckpt, device=device)
        suite = run_eval(data.evals, model, tokenizer, preprocess, device, progress=True)
        return metrics_document(
            suite,
            model=cfg.model,
            model_id=model_id,
            dataset_root=data.evals.dataset_root,
            precision=data.evals.precision,
        )


def run_point(cfg: ClipTrainConfig, out: Path, testbed_dir: str | None = None, force: bool = False) -> dict:
    """Train and evaluate one p; return the metrics (also written to ``metrics.json``).

    Under torchrun/Slurm every rank calls this: all ranks train, rank 0 alone writes the run
    folder and evaluates; the other ranks return ``{"rank": r, "checkpoint": ...}``.
    """
    return point.run_point(ClipApp(), cfg, Path(out), testbed_dir=testbed_dir, force=force)
