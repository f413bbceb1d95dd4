"""Choose each sample's caption among its sources at ratio p, deterministically.

The choice is a pure function of (seed, epoch, sample key): a keyed hash gives a uniform
number u in [0, 1) and u picks a source by cumulative weight. It therefore does not depend on
world size, worker count or shuffle order (unlike the MetaCLIP reference, which draws from the
global RNG), and a resumed run makes the same choices again.

Where a key can be seen more than once in an epoch (resampled shards; a worker repeating its
shards to fill a fixed-length epoch), each visit draws anew, as MetaCLIP does: the hash also
takes the visit index (and, for resampled streams, the stream), see ``visit_key``. A first visit
in a stream whose keys cannot repeat hashes the key alone, so the rule there stays (seed, epoch, key).

A sample whose chosen source has no caption (missing or blank) falls back along the mixture's
fallback order (alt-text by default); fallbacks are counted, never silent.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field

ALT = "alt"


def unit_hash(seed: int, epoch: int, key: str) -> float:
    """Uniform number in [0, 1) from (seed, epoch, key); stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{seed}\x1f{epoch}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 18446744073709551616.0  # 2**64


def visit_key(key: str, visit: int = 0, stream: str = "") -> str:
    """What the draws of one visit of a sample hash: the key itself for visit 0 of a stream whose keys
    cannot repeat (the rule stays (seed, epoch, key)); otherwise the key with the stream and visit index,
    so every visit of a key is an independent draw (MetaCLIP draws per visit)."""
    if visit == 0 and not stream:
        return key
    return f"{key}\x1e{stream}\x1e{visit}"


def parse_p(value: str | float, flag: str = "--p") -> float:
    """Parse one mixing ratio; an error names the flag when it is not a number in [0, 1]."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag}: {value!r} is not a number; expected a ratio in [0, 1]") from None
    if not (0.0 <= p <= 1.0) or math.isnan(p):
        raise ValueError(f"{flag}: {value!r} is outside [0, 1] (p is the share of synthetic captions)")
    return p


def parse_p_list(text: str, flag: str = "--p") -> list[float]:
    """``"0,0.15,1.0"`` -> ``[0.0, 0.15, 1.0]``; duplicates merged, order kept."""
    items = [t.strip() for t in str(text).split(",")]
    if not text or any(t == "" for t in items):
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of ratios like 0,0.15,1.0")
    out: list[float] = []
    for item in items:
        p = parse_p(item, flag)
        if p not in out:
            out.append(p)
    return out


PER_VISIT = "per_visit"  # the paper's rule: a new draw every time a sample is seen
PER_SAMPLE = "per_sample"  # one draw per sample for the whole run (epoch ignored)
BLANK_ALT_POLICIES = ("fallback", "skip")  # what a sample with blank alt-text does (see caption_mixing.pipeline)


def check_blank_alt(policy: str) -> str:
    """The policy if it is one of ``BLANK_ALT_POLICIES``; else an error naming ``blank_alt``."""
    if policy not in BLANK_ALT_POLICIES:
        raise ValueError(f"blank_alt: {policy!r} is not one of {', '.join(BLANK_ALT_POLICIES)}")
    return policy


@dataclass(frozen=True)
class Mixture:
    """Caption sources with weights (summing to 1) and the order to fall back along.

    ``Mixture.from_p(0.15, "altogether")`` is the paper's rule: 15% synthetic, 85% alt-text.
    ``Mixture.parse("alt=0.7,altogether_r3=0.2,scratch=0.1")`` mixes any number of sources.
    """

    weights: tuple[tuple[str, float], ...]
    fallback: tuple[str, ...] = (ALT,)
    mode: str = PER_VISIT

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("a mixture needs at least one caption source")
        names = [n for n, _ in self.weights]
        if len(set(names)) != len(names):
            raise ValueError(f"caption sources repeat in mixture: {names}")
        if any(w < 0 for _, w in self.weights):
            raise ValueError(f"negative weight in mixture: {dict(self.weights)}")
        total = sum(w for _, w in self.weights)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"mixture weights must sum to 1, got {total:g}: {dict(self.weights)}")
        if self.mode not in (PER_VISIT, PER_SAMPLE):
            raise ValueError(f"mixture mode must be {PER_VISIT!r} or {PER_SAMPLE!r}, got {self.mode!r}")

    @classmethod
    def parse(cls, spec: str, fallback: str | None = None, mode: str = PER_VISIT, flag: str = "--captions") -> Mixture:
        """``"alt=0.85,altogether_r3=0.15"`` -> Mixture; ``fallback`` is a comma list (default: alt)."""
        weights = []
        for item in (s.strip() for s in spec.split(",")):
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"{flag}: {item!r} is not source=weight (e.g. alt=0.85,altogether=0.15)")
            try:
                weights.append((name.strip(), float(value)))
            except ValueError:
                raise ValueError(f"{flag}: weight {value!r} of source {name.strip()!r} is not a number") from None
        order = tuple(s.strip() for s in fallback.split(",")) if fallback else (ALT,)
        try:
            return cls(weights=tuple(weights), fallback=order, mode=mode)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None

    @classmethod
    def from_p(cls, p: float, synthetic: str = "altogether", mode: str = PER_VISIT) -> Mixture:
        p = parse_p(p)
        return cls(weights=((ALT, 1.0 - p), (synthetic, p)), mode=mode)

    def with_synthetic_share(self, p: float) -> Mixture:
        """The same sources with alt-text at 1-p and the synthetic sources scaled to share p (for schedules)."""
        syn = [(n, w) for n, w in self.weights if n != ALT]
        syn_total = sum(w for _, w in syn)
        if syn_total <= 0:
            raise ValueError("a schedule of p needs a mixture with a synthetic source of non-zero weight")
        return Mixture(((ALT, 1.0 - p), *((n, p * w / syn_total) for n, w in syn)), self.fallback, self.mode)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.weights)

    @property
    def synthetic_sources(self) -> tuple[str, ...]:
        """Sources other than alt-text that can be used: drawn (weight > 0) or fallen back to."""
        return tuple(n for n in dict.fromkeys((*self.sources, *self.fallback)) if n != ALT)

    def pick(self, u: float) -> str:
        """Map u in [0, 1) to a source by cumulative weight (zero-weight sources never win)."""
        acc = 0.0
        last = None
        for name, weight in self.weights:
            if weight <= 0:
                continue
            acc += weight
            last = name
            if u < acc:
                return name
        return last  # u fell in the rounding gap below 1.0

    def describe(self) -> str:
        return ",".join(f"{n}={w:g}" for n, w in self.weights)


@dataclass(frozen=True)
class Choice:
    caption: str
    source: str  # the source whose caption is used
    wanted: str  # the source the hash picked (differs on fallback)

    @property
    def fell_back(self) -> bool:
        return self.source != self.wanted


def _usable(caption: str | None) -> bool:
    return caption is not None and caption.strip() != ""


def choose_caption(
    captions: dict[str, str | None],
    mixture: Mixture,
    seed: int,
    epoch: int,
    key: str,
    visit: int = 0,
    stream: str = "",
) -> Choice:
    """Pick the caption of one sample. ``captions`` maps source name -> caption (alt-text under ``alt``).

    ``visit`` counts earlier visits of ``key`` in this epoch and ``stream`` names a resampled stream
    (``visit_key``); ``per_sample`` mode ignores epoch, visit and stream (one choice for the run).
    """
    if mixture.mode == PER_VISIT:
        u = unit_hash(seed, epoch, visit_key(key, visit, stream))
    else:
        u = unit_hash(seed, 0, key)
    return resolve_choice(captions, mixture, mixture.pick(u))


def resolve_choice(captions: dict[str, str | None], mixture: Mixture, wanted: str) -> Choice:
    """The caption of the ``wanted`` source, else the first usable one along the mixture's fallback
    order (counted as a fallback); shared by the random draw and the score gate (``caption_mixing.gate``)."""
    if _usable(captions.get(wanted)):
        return Choice(captions[wanted], wanted, wanted)
    for name in mixture.fallback:
        if name != wanted and _usable(captions.get(name)):
            return Choice(captions[name], name, wanted)
    # Nothing usable: keep the alt-text even if blank, so the sample is not lost.
    return Choice(captions.get(ALT) or "", ALT, wanted)


@dataclass
class MixStats:
    """Counts of caption choices; merge across batches/workers with ``update``."""

    used: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)  # keyed by the source that was wanted but missing

    def add(self, source: str, wanted: str) -> None:
        self.used[source] += 1
        if source != wanted:
            self.fallbacks[wanted] += 1

    def update(self, sources: list[str], wanted: list[str]) -> None:
        for s, w in zip(sources, wanted, strict=True):
            self.add(s, w)

    @property
    def total(self) -> int:
        return sum(self.used.values())

    def realized(self) -> dict[str, float]:
        """Share of samples that used each source."""
        n = self.total
        return {k: v / n for k, v in sorted(self.used.items())} if n else {}

    def realized_synthetic_ratio(self) -> float:
        n = self.total
        return (n - self.used.get(ALT, 0)) / n if n else float("nan")

    def as_dict(self) -> dict:
        return {
            "samples": self.total,
            "used": dict(self.used),
            "fallbacks": dict(self.fallbacks),
            "realized": self.realized(),
            "realized_synthetic_ratio": self.realized_synthetic_ratio(),
        }


# ---------------------------------------------------------------------------------------------
# Sources with several captions per image, and coverage-aware p (attach of published sets)
# ---------------------------------------------------------------------------------------------

PAPER, EFFECTIVE = "paper", "effective"
P_MODES = (PAPER, EFFECTIVE)  # p_mode: the paper's draw, or one raised so the realized share is p


def check_p_mode(p_mode: str) -> str:
    """The mode if it is one of ``P_MODES``; else an error naming ``p_mode``."""
    if p_mode not in P_MODES:
        raise ValueError(f"p_mode: {p_mode!r} is not one of {', '.join(P_MODES)}")
    return p_mode


def pick_variant(
    caption: str | list[str] | None, source: str, seed: int, epoch: int, key: str, visit: int = 0, stream: str = ""
) -> str | None:
    """One caption of a source that holds several per image (LaCLIP's rewrites, DataCompDR's 5),
    drawn uniformly among the non-blank ones from the same (seed, epoch, key, visit, stream) as the
    source choice, hashed apart from it and per source; ``None`` when none is usable."""
    if caption is None or isinstance(caption, str):
        return caption
    usable = [c for c in caption if isinstance(c, str) and c.strip()]
    if len(usable) <= 1:
        return usable[0] if usable else None
    u = unit_hash(seed, epoch, f"{visit_key(key, visit, stream)}\x1fvariant\x1f{source}")
    return usable[min(int(u * len(usable)), len(usable) - 1)]


def resolve_variants(
    captions: dict[str, str | list[str] | None],
    mixture: Mixture,
    seed: int,
    epoch: int,
    key: str,
    visit: int = 0,
    stream: str = "",
) -> dict[str, str | None]:
    """``captions`` with each list of variants replaced by the one drawn for this visit (call before
    ``choose_caption``); ``per_sample`` mode draws once for the run, as it does for the source."""
    if all(not isinstance(c, list) for c in captions.values()):
        return captions  # type: ignore[return-value]
    if mixture.mode != PER_VISIT:
        epoch, visit, stream = 0, 0, ""
    return {s: pick_variant(c, s, seed, epoch, key, visit, stream) for s, c in captions.items()}


def effective_mixture(mixture: Mixture, coverage: dict[str, float]) -> tuple[Mixture, str | None]:
    """The mixture whose realized shares are the given weights, where coverage allows.

    Under the paper's rule a synthetic source of weight w and coverage c (share of samples with a
    usable caption) is used for w x c of the samples: the rest fall back to alt-text. Drawing it
    at w / c instead realizes w. When the raised weights sum past 1 they cannot all be met: every
    sample then draws a synthetic source (weights in proportion to w / c, alt-text 0) and the
    message says what share that realizes. Sources without a coverage keep their weight.
    """
    synthetic = [(n, w) for n, w in mixture.weights if n != ALT]
    target = sum(w for _, w in synthetic)
    raised = {n: (w / coverage[n] if w > 0 and coverage.get(n, 0) > 0 else w) for n, w in synthetic}
    empty = [n for n, w in synthetic if w > 0 and coverage.get(n, 1.0) <= 0]
    total = sum(raised.values())
    message = None
    if total > 1.0 + 1e-12:
        raised = {n: v / total for n, v in raised.items()}
        total = 1.0
        reach = sum(v * coverage.get(n, 1.0) for n, v in raised.items())
        shown = ", ".join(f"{n} {coverage.get(n, 1.0):.4f}" for n, _ in synthetic)
        message = (
            f"p_mode=effective cannot realize a synthetic share of {target:.4g}: with coverage {shown} the most "
            f"it reaches is {reach:.4g} (every sample now draws a synthetic caption)"
        )
    if empty:
        note = f"p_mode=effective: source(s) {', '.join(empty)} have no captions for these shards (coverage 0)"
        message = note if message is None else f"{message}; {note}"
    weights = tuple((n, max(0.0, 1.0 - total) if n == ALT else raised[n]) for n, _ in mixture.weights)
    if ALT not in dict(mixture.weights) and total < 1.0 - 1e-9:
        weights = ((ALT, 1.0 - total), *weights)
    return Mixture(weights, mixture.fallback, mixture.mode), message
