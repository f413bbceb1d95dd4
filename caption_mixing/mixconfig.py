"""The caption-mixing fields every training config carries, and the one function that turns them
into what the data pipeline needs.

``clip_train`` and ``t2i`` configs inherit ``MixingFields``, so both tasks get every mixing option
(n-way ``captions``, fallback order, ``mix_mode``, ``p_schedule``, ``long_captions``, ``blank_alt``)
with one meaning, one validation and one resolution (``mixing_plan``). p is checked once, here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from caption_mixing.long_captions import POLICIES as LONG_CAPTION_POLICIES
from caption_mixing.mixing import ALT, PER_SAMPLE, PER_VISIT, Mixture, check_blank_alt
from caption_mixing.paths import validate_name
from caption_mixing.schedules import PSchedule, parse_schedule


@dataclass
class MixingFields:
    """Config fields of the mixing rule (flat, like the rest of a preset)."""

    synthetic_source: str = "altogether"  # the synthetic source when ``captions`` is not given
    p: float = 0.15  # share of synthetic captions (all synthetic sources together)
    captions: str | None = None  # n-way mixture "alt=0.85,altogether_r3=0.1,scratch=0.05"; --p rescales its synthetics
    caption_fallback: str = ALT  # comma list: sources to try, in order, when the drawn one is missing
    mix_mode: str = PER_VISIT  # per_visit (the paper: drawn anew each visit) | per_sample (fixed for the run)
    p_schedule: str | None = None  # p over training: constant:P | linear:P0:P1[:T0:T1] | step:P@T,...
    long_captions: str = "head"  # captions longer than the text context: head | sentences | random_window
    blank_alt: str = "fallback"  # empty alt-text: fallback (a synthetic caption if there is one, else skip) | skip


@dataclass(frozen=True)
class MixPlan:
    """What the pipeline needs: the mixture at the run's p, an optional schedule of p, the text policies."""

    mixture: Mixture
    schedule: PSchedule | None
    long_captions: str
    blank_alt: str


def mixing_plan(cfg: MixingFields) -> MixPlan:
    """The run's mixture: ``captions``' sources rescaled so the synthetic ones share p, else alt-text + one source."""
    schedule = None if cfg.p_schedule is None else parse_schedule(cfg.p_schedule, flag="p_schedule")
    if cfg.captions is None:
        mixture = Mixture.from_p(cfg.p, cfg.synthetic_source, mode=cfg.mix_mode)
    else:
        mixture = Mixture.parse(cfg.captions, fallback=cfg.caption_fallback, mode=cfg.mix_mode, flag="captions")
        if ALT not in mixture.sources:
            raise ValueError(f"captions={cfg.captions!r}: name alt-text as {ALT!r} (e.g. {ALT}=0.85,altogether=0.15)")
        if any(w > 0 for n, w in mixture.weights if n != ALT):
            mixture = mixture.with_synthetic_share(cfg.p)
        elif cfg.p != 0:
            raise ValueError(f"captions={cfg.captions!r} gives synthetic captions no weight, but p={cfg.p:g}")
    return MixPlan(mixture, schedule, cfg.long_captions, cfg.blank_alt)


def p_from_captions(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Where ``captions`` is written and p is not given, p is the mixture's synthetic share."""
    out = dict(values)
    if out.get("captions") and "p" not in overrides:
        weights = dict(Mixture.parse(out["captions"], flag="captions").weights)
        out["p"] = round(1.0 - weights.get(ALT, 0.0), 12)
    return out


def validate_mixing(cfg: MixingFields) -> None:
    """Every mixing field checked once, errors naming the key."""
    if not 0.0 <= cfg.p <= 1.0:
        raise ValueError(f"p={cfg.p} is outside [0, 1]")
    if cfg.mix_mode not in (PER_VISIT, PER_SAMPLE):
        raise ValueError(f"mix_mode must be {PER_VISIT} or {PER_SAMPLE}, got {cfg.mix_mode!r}")
    if cfg.long_captions not in LONG_CAPTION_POLICIES:
        raise ValueError(f"long_captions must be one of {', '.join(LONG_CAPTION_POLICIES)}, got {cfg.long_captions!r}")
    check_blank_alt(cfg.blank_alt)
    validate_name(cfg.synthetic_source, "synthetic_source")
    plan = mixing_plan(cfg)  # raises naming the key on a malformed captions spec or schedule
    for source in plan.mixture.sources:
        validate_name(source, "captions")
