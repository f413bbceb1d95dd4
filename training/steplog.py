"""Step logging for both trainers: a progress bar with rates, ``train_log.jsonl`` and TensorBoard.

Rank 0 writes; other ranks get a disabled logger, so the loop calls it unconditionally. On resume
the log is cut back to the checkpoint's step first: records written after the last checkpoint
describe steps that are about to be trained again, and would otherwise appear twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from caption_mixing.atomic import atomic_write_text

log = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
LOGGERS = ("tensorboard", "wandb", "none")


def trim_log(path: Path, step: int) -> int:
    """Keep records with ``step`` <= the given step (and unparsable tails out); return how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut by a kill mid-write
            continue
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


class StepLogger:
    """Progress bar + jsonl + TensorBoard (+ W&B when installed and asked for); a no-op off rank 0."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total: int,
        initial: int,
        desc: str,
        loggers: str = "tensorboard",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.file = self.tb = self.wandb = None
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled)
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        dropped = trim_log(run_dir / LOG_NAME, initial)
        if dropped:
            log.warning("%s: dropped %d records after step %d (they are trained again)", run_dir, dropped, initial)
        self.file = (run_dir / LOG_NAME).open("a")
        kinds = {k.strip() for k in loggers.split(",")}
        if "tensorboard" in kinds:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                log.warning("logger=wandb but wandb is not installed; logging to TensorBoard/jsonl only")
            else:
                self.wandb = wandb.init(
                    project="caption-mixing", name=run_dir.name, dir=str(run_dir), config=config, resume="allow"
                )

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, record: dict[str, Any], scalars: dict[str, float], postfix: str | None = None) -> None:
        """One ``train_log.jsonl`` record (must hold ``step``), its scalars to TensorBoard/W&B, the bar's postfix."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if postfix is not None:
            self.bar.set_postfix_str(postfix)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> StepLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
