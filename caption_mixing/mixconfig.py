"""The caption-mixing fields every training config carries, and the one function that turns them
into what the data pipeline needs.

``clip_train`` and ``t2i`` configs inherit ``MixingFields``, so both tasks get every mixing option
(n-way ``captions``, fallback order, ``mix_mode``, ``p_schedule``, ``long_captions``, ``blank_alt``,
``p_mode``) with one meaning, one validation and one resolution (``mixing_plan``). p is checked
once, here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from caption_mixing.gate import DEFAULT_GATE_SCORES, GATE, GateSpec, parse_gate_scores
from caption_mixing.long_captions import POLICIES as LONG_CAPTION_POLICIES
from caption_mixing.mixing import ALT, PAPER, PER_SAMPLE, PER_VISIT, Mixture, check_blank_alt, check_p_mode
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
    p_mode: str = PAPER  # paper (draw at p; missing captions fall back) | effective (draw p/coverage: realize p)
    # mix_mode=gate (caption_mixing.gate): the share p of samples with the lowest alt-text score get a synthetic
    # caption. gate_scores: score sidecar SOURCE[:FIELD] (`python -m eval score` writes clip_score_alt; a release's
    # own e.g. recap:org_clip_score); gate_soft: T > 0 draws with probability sigmoid((c - score) / T) instead.
    gate_scores: str = DEFAULT_GATE_SCORES
    gate_soft: float = 0.0


@dataclass(frozen=True)
class MixPlan:
    """What the pipeline needs: the mixture at the run's p, an optional schedule of p, the text policies."""

    mixture: Mixture
    schedule: PSchedule | None
    long_captions: str
    blank_alt: str
    p_mode: str = PAPER  # "effective": the pipeline raises the draw by each source's attach coverage
    gate: GateSpec | None = None  # mix_mode=gate: the score gate replaces the random draw


def mixing_plan(cfg: MixingFields) -> MixPlan:
    """The run's mixture: ``captions``' sources rescaled so the synthetic ones share p, else alt-text + one source."""
    schedule = None if cfg.p_schedule is None else parse_schedule(cfg.p_schedule, flag="p_schedule")
    mode = PER_VISIT if cfg.mix_mode == GATE else cfg.mix_mode  # the gate's soft draws are per visit
    if cfg.captions is None:
        mixture = Mixture.from_p(cfg.p, cfg.synthetic_source, mode=mode)
    else:
        mixture = Mixture.parse(cfg.captions, fallback=cfg.caption_fallback, mode=mode, flag="captions")
        if ALT not in mixture.sources:
            raise ValueError(f"captions={cfg.captions!r}: name alt-text as {ALT!r} (e.g. {ALT}=0.85,altogether=0.15)")
        if any(w > 0 for n, w in mixture.weights if n != ALT):
            mixture = mixture.with_synthetic_share(cfg.p)
        elif cfg.p != 0:
            raise ValueError(f"captions={cfg.captions!r} gives synthetic captions no weight, but p={cfg.p:g}")
    gate = GateSpec(cfg.gate_scores, float(cfg.gate_soft)) if cfg.mix_mode == GATE else None
    return MixPlan(mixture, schedule, cfg.long_captions, cfg.blank_alt, cfg.p_mode, gate)


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
    if cfg.mix_mode not in (PER_VISIT, PER_SAMPLE, GATE):
        raise ValueError(f"mix_mode must be {PER_VISIT}, {PER_SAMPLE} or {GATE}, got {cfg.mix_mode!r}")
    parse_gate_scores(cfg.gate_scores)
    if not isinstance(cfg.gate_soft, (int, float)) or not math.isfinite(cfg.gate_soft) or cfg.gate_soft < 0:
        raise ValueError(f"gate_soft must be a number >= 0 (0: hard gate), got {cfg.gate_soft!r}")
    if cfg.mix_mode == GATE and cfg.p_mode != PAPER:
        raise ValueError(f"mix_mode=gate realizes p by its threshold; p_mode={cfg.p_mode!r} does not apply")
    if cfg.long_captions not in LONG_CAPTION_POLICIES:
        raise ValueError(f"long_captions must be one of {', '.join(LONG_CAPTION_POLICIES)}, got {cfg.long_captions!r}")
    check_blank_alt(cfg.blank_alt)
    check_p_mode(cfg.p_mode)
    validate_name(cfg.synthetic_source, "synthetic_source")
    plan = mixing_plan(cfg)  # raises naming the key on a malformed captions spec or schedule
    for source in plan.mixture.sources:
        validate_name(source, "captions")


def mode_tag(cfg: MixingFields) -> str | None:
    """The run-folder part naming a mixing mode other than the paper's random draw (None for it):
    ``gate``, ``gate-soft0.05``, ``both``, ``both-multi_positive`` (``text_mode``/``both_loss`` are clip_train's)."""
    if getattr(cfg, "text_mode", "mixed") == "both":
        loss = getattr(cfg, "both_loss", "both_mean")
        return "both" if loss == "both_mean" else f"both-{loss}"
    if cfg.mix_mode == GATE:
        return "gate" if not cfg.gate_soft else f"gate-soft{cfg.gate_soft:g}"
    return None


def run_label(cfg: MixingFields) -> str:
    """The run's label in metrics and reports: ``p=0.15``, ``p=0.15 gate``, ``p=0.15 gate soft=0.05``,
    ``both w=0.5`` (p is then the synthetic caption's loss weight), ``both multi_positive w=0.5``."""
    if getattr(cfg, "text_mode", "mixed") == "both":
        loss = getattr(cfg, "both_loss", "both_mean")
        return f"both w={cfg.p:g}" if loss == "both_mean" else f"both {loss} w={cfg.p:g}"
    if cfg.mix_mode == GATE:
        return f"p={cfg.p:g} gate" + (f" soft={cfg.gate_soft:g}" if cfg.gate_soft else "")
    return f"p={cfg.p:g}"
