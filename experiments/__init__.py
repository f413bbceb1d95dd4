"""Sweeps over the synthetic-caption ratio p: thin entry points over clip_train, t2i and eval.

One module per job:

- ``sweep_ratio``  the CLI (``python experiments/sweep_ratio.py`` / ``caption-mixing-sweep``): resolve each
                   point's config once, plan, launch, summarize.
- ``tasks``        the task registry (clip, t2i): config loader, ``run_point``, report writer, presets.
- ``resources``    what a job asks for (a preset's ``job:`` block plus flags) and its one rendering into
                   sbatch options, used for submission, ``sbatch --test-only`` and ``--dry-run``.
- ``snapshot``     the copy of the code a sweep's jobs import (``<out>/.code/``), with its commit.
- ``submit``       planning and the in-process / submitit local / Slurm array launchers.
- ``job``          what runs inside a job: ``PointSpec``, ``PointJob`` (requeue on preemption).
- ``scheduler``    asking Slurm: availability, ``--test-only``, the queue.
- ``state``        state.json per run and sweep.json per sweep.
- ``status``       the status table and the sweep report once every point has finished.
"""
