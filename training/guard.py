"""The one collective a training step needs: did any rank see a non-finite loss or a stop signal?

Both are OR-ed over ranks in a single all-reduce, so every rank takes the same branch (a rank
that raised alone would leave the others waiting in the next collective).
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.distributed import DistEnv, any_flag


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def check_step(env: DistEnv, loss: torch.Tensor, stop_requested: bool, step: int, last_ckpt: Path | None) -> bool:
    """Raise ``NonFiniteLossError`` on every rank if any rank's loss is not finite; else return the stop flag."""
    stop, nonfinite = any_flag(env, stop_requested, not bool(torch.isfinite(loss).all().item()))
    if nonfinite:
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (rank {env.rank}'s loss: {loss.item()}); "
            f"last good checkpoint: {last_ckpt or 'none'}"
        )
    return stop
