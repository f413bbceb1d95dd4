"""The synthetic-caption share p as a function of training progress, for curriculum studies.

Progress is measured in epochs (``epoch / num_epochs``) so that p stays a function of
(seed, epoch, key) and the caption choice remains independent of ranks, workers and timing.
For a finer schedule, shorten the epoch (fewer samples per epoch).

Spec strings (``--p-schedule``):
- ``constant:0.15``
- ``linear:0.0:1.0`` (ramp from p=0 to p=1 over the run), ``linear:0.0:1.0:0.2:0.8`` (ramp between 20% and 80%)
- ``step:0.0@0,0.5@0.3,1.0@0.6`` (p=0 from the start, 0.5 from 30% of training, 1.0 from 60%)
"""

from __future__ import annotations

from dataclasses import dataclass

from caption_mixing.mixing import parse_p


@dataclass(frozen=True)
class PSchedule:
    kind: str  # constant | linear | step
    points: tuple[tuple[float, float], ...]  # (progress, p) breakpoints, progress in [0, 1]

    def __call__(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        pts = self.points
        if self.kind == "constant":
            return pts[0][1]
        if self.kind == "step":
            p = pts[0][1]
            for start, value in pts:
                if progress >= start:
                    p = value
            return p
        (t0, p0), (t1, p1) = pts
        if progress <= t0:
            return p0
        if progress >= t1:
            return p1
        return p0 + (p1 - p0) * (progress - t0) / (t1 - t0)

    def at_epoch(self, epoch: int, num_epochs: int) -> float:
        """p for an epoch, taken at the epoch's start."""
        return self(epoch / max(num_epochs, 1))


def parse_schedule(spec: str, flag: str = "--p-schedule") -> PSchedule:
    kind, _, rest = spec.partition(":")
    try:
        if kind == "constant":
            return PSchedule("constant", ((0.0, parse_p(rest, flag)),))
        if kind == "linear":
            parts = rest.split(":")
            if len(parts) not in (2, 4):
                raise ValueError
            p0, p1 = parse_p(parts[0], flag), parse_p(parts[1], flag)
            t0, t1 = (float(parts[2]), float(parts[3])) if len(parts) == 4 else (0.0, 1.0)
            if not 0.0 <= t0 < t1 <= 1.0:
                raise ValueError
            return PSchedule("linear", ((t0, p0), (t1, p1)))
        if kind == "step":
            points = []
            for item in rest.split(","):
                value, _, start = item.partition("@")
                points.append((float(start), parse_p(value, flag)))
            starts = [s for s, _ in points]
            if not points or starts != sorted(starts) or starts[0] != 0.0 or not all(0 <= s <= 1 for s in starts):
                raise ValueError
            return PSchedule("step", tuple(points))
    except ValueError as e:
        if flag in str(e):
            raise
    raise ValueError(
        f"{flag}: {spec!r} is not a schedule; use constant:P, linear:P0:P1[:T0:T1] or step:P@T,P@T,... "
        "(T = fraction of training, first T = 0)"
    )
