"""Score-gated captions (``mix_mode: gate``): the synthetic caption replaces the alt-text where the
alt-text describes its image worst, instead of at random.

Scores come from numeric sidecars, one per shard, in the form of an attached release score
(``caption_mixing.sidecar``: format 2, ``{"fields": {FIELD: {sample_key: score}}}``): either the
ones ``python -m eval score`` writes (source ``clip_score_alt``, field ``clip_score``: the cosine of
a local open_clip model between the image and its alt-text) or a release's own (Recap-DataComp-1B's
``org_clip_score`` in an attached ``recap`` sidecar: ``gate_scores: recap:org_clip_score``).

Hard gate (``gate_soft: 0``, default): the scores of every shard are read once and sorted by
(score, tie-break hash of (seed, key)); at synthetic share p the first ``round(p * N)`` samples
of that order are gated, so the realized share of gated samples is p to within half a sample over
the whole corpus and ties fall deterministically. A schedule of p gives one threshold per epoch.

Soft gate (``gate_soft: T > 0``): a sample is gated with probability ``sigmoid((c - score) / T)``,
``c`` calibrated (bisection) so the mean probability over the corpus is p, drawn from
(seed, epoch, key, visit) like the random rule, so it is reproducible and independent of layout.

A gated sample takes a synthetic source by the mixture's relative weights (a second reproducible
draw) and falls back along the mixture's declared order when it lacks that caption; a sample that
is not gated wants the alt-text. Samples without a score are not gated (counted ``gate/no_score``).
The scorer must not be the run's own model (see the README's testbed section for which one is used).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from caption_mixing import storage
from caption_mixing.mixing import ALT, PER_VISIT, Choice, Mixture, resolve_choice, unit_hash, visit_key
from caption_mixing.paths import validate_name
from caption_mixing.sidecar import SidecarError, read_sidecar_fields, sidecar_path

GATE = "gate"  # mix_mode value
DEFAULT_GATE_SCORES = "clip_score_alt"  # what `python -m eval score --sources alt` writes (field clip_score)
SCORE_KEY = "__gate_score__"  # sample dict key holding the sample's alt-text score (None when unscored)


def parse_gate_scores(spec: str, flag: str = "gate_scores") -> tuple[str, str | None]:
    """``"SOURCE[:FIELD]"`` -> (sidecar source, field or None = the sidecar's only field)."""
    source, _, fld = str(spec).partition(":")
    validate_name(source.strip(), flag)
    return source.strip(), (fld.strip() or None)


def tie_break(seed: int, key: str) -> int:
    """Deterministic order among equal scores: a 64-bit hash of (seed, key)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1fgate\x1f{key}".encode(), digest_size=8).digest(), "little")


def read_shard_scores(
    shard: str, source: str, fld: str | None, sidecar_dir: str | os.PathLike | None = None
) -> dict[str, float] | None:
    """The scores of one shard (None when it has no score sidecar); an error names the file and field."""
    path = sidecar_path(shard, source, sidecar_dir)
    if not storage.exists(path):
        return None
    fields = read_sidecar_fields(path, shard=shard)
    if fld is None:
        if len(fields) != 1:
            raise SidecarError(
                f"{path}: gate_scores={source!r} names no field and the sidecar has {sorted(fields) or 'none'}; "
                f"write gate_scores: {source}:FIELD"
            )
        fld = next(iter(fields))
    if fld not in fields:
        raise SidecarError(f"{path}: no numeric field {fld!r} (has {sorted(fields)}); check gate_scores")
    out = {}
    for key, value in fields[fld].items():
        if value is not None and isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


@dataclass
class CorpusScores:
    """Every scored sample of the corpus, in gate order (lowest score first, ties by ``tie_break``)."""

    scores: np.ndarray  # float64, sorted ascending
    ties: np.ndarray  # uint64, the tie-break hash of each sorted entry
    missing_shards: list[str] = field(default_factory=list)

    @classmethod
    def read(
        cls, shards: Iterable[str], source: str, fld: str | None, seed: int, sidecar_dir: str | None = None
    ) -> CorpusScores:
        """Read each shard's score sidecar once (streaming, one shard in memory besides the arrays)."""
        scores: list[float] = []
        ties: list[int] = []
        missing = []
        for shard in shards:
            table = read_shard_scores(shard, source, fld, sidecar_dir)
            if table is None:
                missing.append(shard)
                continue
            for key, value in table.items():
                scores.append(value)
                ties.append(tie_break(seed, key))
        s, t = np.asarray(scores, dtype=np.float64), np.asarray(ties, dtype=np.uint64)
        order = np.lexsort((t, s))  # primary: score, secondary: tie-break hash
        return cls(s[order], t[order], missing)

    def __len__(self) -> int:
        return int(self.scores.size)

    def threshold(self, p: float) -> tuple[float, int]:
        """(score, tie) of the first sample NOT gated at share p: ``round(p * N)`` samples lie below it."""
        k = int(math.floor(p * len(self) + 0.5))
        if k >= len(self):
            return math.inf, 0
        return float(self.scores[k]), int(self.ties[k])

    def soft_offset(self, p: float, temperature: float) -> float:
        """``c`` with mean(sigmoid((c - score) / T)) == p over the corpus (bisection)."""
        if len(self) == 0:
            raise ValueError("gate: no scored samples to calibrate gate_soft against")
        lo, hi = float(self.scores[0]) - 50 * temperature, float(self.scores[-1]) + 50 * temperature
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            share = float(np.mean(_sigmoid((mid - self.scores) / temperature)))
            lo, hi = (mid, hi) if share < p else (lo, mid)
        return 0.5 * (lo + hi)


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x))) if isinstance(x, np.ndarray) else 0.5 * (1 + math.tanh(0.5 * x))


@dataclass(frozen=True)
class GateRule:
    """The gate of one epoch: the mixture (for the synthetic sources and fallback) and its threshold."""

    mixture: Mixture
    p: float
    threshold: tuple[float, int] = (math.inf, 0)  # hard gate
    temperature: float = 0.0
    offset: float = 0.0  # soft gate

    def gated(self, score: float, seed: int, epoch: int, key: str, visit: int = 0, stream: str = "") -> bool:
        """Whether this visit of the sample gets a synthetic caption."""
        if self.p <= 0.0:
            return False
        if self.temperature <= 0.0:
            cut = self.threshold[0]
            if score != cut:  # the tie-break hash is needed only at the threshold's own score
                return score < cut
            return tie_break(seed, key) < self.threshold[1]
        draw_epoch, vkey = (epoch, visit_key(key, visit, stream)) if self.mixture.mode == PER_VISIT else (0, key)
        return unit_hash(seed, draw_epoch, f"{vkey}\x1fgate") < _sigmoid((self.offset - score) / self.temperature)

    def synthetic(self, seed: int, epoch: int, key: str, visit: int = 0, stream: str = "") -> str:
        """The synthetic source a gated sample wants: drawn by the mixture's relative weights."""
        syn = [(n, w) for n, w in self.mixture.weights if n != ALT and w > 0]
        if len(syn) == 1:
            return syn[0][0]
        total = sum(w for _, w in syn)
        draw_epoch, vkey = (epoch, visit_key(key, visit, stream)) if self.mixture.mode == PER_VISIT else (0, key)
        u, acc = unit_hash(seed, draw_epoch, f"{vkey}\x1fgate-source") * total, 0.0
        for name, weight in syn:
            acc += weight
            if u < acc:
                return name
        return syn[-1][0]

    def choose(
        self,
        captions: dict[str, str | None],
        mix: Mixture,
        seed: int,
        epoch: int,
        key: str,
        visit: int = 0,
        stream: str = "",
        *,
        score: float | None,
    ) -> Choice:
        """``choose_caption``'s counterpart: gated samples want a synthetic source, others alt-text."""
        if score is None or not self.gated(score, seed, epoch, key, visit, stream):
            return resolve_choice(captions, mix, ALT)
        return resolve_choice(captions, mix, self.synthetic(seed, epoch, key, visit, stream))


@dataclass(frozen=True)
class GateSpec:
    """The config of the gate (``gate_scores``, ``gate_soft``); the pipeline builds it on its shards."""

    scores: str = DEFAULT_GATE_SCORES
    soft: float = 0.0

    def build(self, shards: list[str], seed: int, sidecar_dir: str | None = None) -> ScoreGate:
        return ScoreGate.build(shards, self.scores, self.soft, seed, sidecar_dir)


@dataclass
class ScoreGate:
    """The corpus's scores and the gate settings; ``rule(mixture)`` gives the gate at that mixture's p."""

    scores: CorpusScores
    temperature: float = 0.0
    source: str = DEFAULT_GATE_SCORES
    fld: str | None = None
    sidecar_dir: str | None = None
    _rules: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, shards: list[str], spec: str, temperature: float, seed: int, sidecar_dir: str | None = None
    ) -> ScoreGate:
        """Read the score sidecars named by ``spec`` (``gate_scores``); refuse a corpus with none."""
        source, fld = parse_gate_scores(spec)
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"gate_soft={temperature!r} must be a finite number >= 0 (0: hard gate)")
        scores = CorpusScores.read(shards, source, fld, seed, sidecar_dir)
        if len(scores) == 0:
            where = sidecar_path(shards[0], source, sidecar_dir) if shards else source
            raise ValueError(
                f"mix_mode=gate: no {source} score sidecars (looked for e.g. {where}); "
                "write them with `python -m eval score` or set gate_scores"
            )
        return cls(scores, temperature, source, fld, sidecar_dir)

    def rule(self, mixture: Mixture) -> GateRule:
        """The gate for ``mixture``'s synthetic share (cached per p: one threshold per scheduled epoch)."""
        p = round(1.0 - dict(mixture.weights).get(ALT, 0.0), 12)
        cache_key = (p, mixture)
        if cache_key not in self._rules:
            if self.temperature > 0 and 0.0 < p < 1.0:
                off = self.scores.soft_offset(p, self.temperature)
                self._rules[cache_key] = GateRule(mixture, p, temperature=self.temperature, offset=off)
            else:
                self._rules[cache_key] = GateRule(mixture, p, threshold=self.scores.threshold(p))
        return self._rules[cache_key]

    def stage(self, src: Iterable[dict]) -> Iterator[dict]:
        """Pipeline stage: ``sample[SCORE_KEY]`` = the sample's alt-text score (one shard's table in memory)."""
        current, table = None, {}
        for sample in src:
            url = sample["__url__"]
            if url != current:
                current, table = url, (read_shard_scores(url, self.source, self.fld, self.sidecar_dir) or {})
            sample[SCORE_KEY] = table.get(sample["__key__"])
            yield sample
