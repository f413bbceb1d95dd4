"""Choose each sample's caption among its sources at ratio p, deterministically.

The choice is a pure function of (seed, epoch, sample key): a keyed hash gives a uniform
number u in [0, 1) and u picks a source by cumulative weight. It therefore does not depend on
world size, worker count or shuffle order (unlike the MetaCLIP reference, which draws from the
global RNG), and a resumed run makes the same choices again.

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


def choose_caption(captions: dict[str, str | None], mixture: Mixture, seed: int, epoch: int, key: str) -> Choice:
    """Pick the caption of one sample. ``captions`` maps source name -> caption (alt-text under ``alt``)."""
    wanted = mixture.pick(unit_hash(seed, epoch if mixture.mode == PER_VISIT else 0, key))
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
