"""The mixing rule: deterministic per (seed, epoch, key[, visit]), at the right ratio, with counted fallback."""

from __future__ import annotations

import math

import pytest
import torch
import webdataset as wds

from caption_mixing import ALT, MixStats, Mixture, SharedEpoch, choose_caption, parse_p, parse_p_list
from caption_mixing.mixing import PER_SAMPLE
from caption_mixing.pipeline import build_caption_pipeline, caption_sample_stages, make_loader
from caption_mixing.shards import expand_shards
from tests.conftest import make_shards

KEYS = [f"{i:09d}" for i in range(20000)]


def _caps(key: str) -> dict[str, str]:
    return {ALT: f"alt {key}", "altogether": f"syn {key}"}


@pytest.mark.parametrize("p", [0.0, 0.15, 1.0])
def test_realized_ratio_within_binomial_bounds(p: float) -> None:
    mixture = Mixture.from_p(p)
    n_syn = sum(choose_caption(_caps(k), mixture, seed=0, epoch=0, key=k).source != ALT for k in KEYS)
    n = len(KEYS)
    if p in (0.0, 1.0):
        assert n_syn == p * n
    else:
        sd = math.sqrt(n * p * (1 - p))
        assert abs(n_syn - n * p) < 4 * sd, (n_syn, n * p, sd)


def test_choice_is_a_function_of_seed_epoch_key() -> None:
    m = Mixture.from_p(0.5)
    a = [choose_caption(_caps(k), m, 1, 3, k).source for k in KEYS[:2000]]
    b = [choose_caption(_caps(k), m, 1, 3, k).source for k in reversed(KEYS[:2000])][::-1]
    assert a == b  # order-independent
    other_epoch = [choose_caption(_caps(k), m, 1, 4, k).source for k in KEYS[:2000]]
    other_seed = [choose_caption(_caps(k), m, 2, 3, k).source for k in KEYS[:2000]]
    # per-visit choice: a new epoch (or seed) redraws ~half of the samples at p=0.5
    assert 0.4 < sum(x != y for x, y in zip(a, other_epoch, strict=False)) / 2000 < 0.6
    assert 0.4 < sum(x != y for x, y in zip(a, other_seed, strict=False)) / 2000 < 0.6


@pytest.mark.parametrize("p", [0.5, 0.15])
def test_each_visit_of_a_key_is_an_independent_draw(p: float) -> None:
    """Visit 0 of a stream whose keys cannot repeat keeps the (seed, epoch, key) rule; later visits, and
    any visit in a resampled stream, draw again: consecutive visits differ at 2p(1-p), the rate of
    independent draws (~50% at p=0.5, ~25% at p=0.15), and each visit is still drawn at ratio p."""
    m, n = Mixture.from_p(p), len(KEYS)
    first = [choose_caption(_caps(k), m, 1, 3, k).source for k in KEYS]
    assert first == [choose_caption(_caps(k), m, 1, 3, k, visit=0, stream="").source for k in KEYS]
    q = 2 * p * (1 - p)
    sd = math.sqrt(n * q * (1 - q))
    for visit, stream in ((1, ""), (0, "0/1"), (5, "3/0")):
        again = [choose_caption(_caps(k), m, 1, 3, k, visit=visit, stream=stream).source for k in KEYS]
        changed = sum(a != b for a, b in zip(first, again, strict=True))
        assert abs(changed - n * q) < 4 * sd, (visit, stream, changed / n)
        assert abs(sum(s != ALT for s in again) - n * p) < 4 * math.sqrt(n * p * (1 - p))
    fixed = Mixture.from_p(p, mode=PER_SAMPLE)  # one choice per sample for the run: visits change nothing
    assert all(
        choose_caption(_caps(k), fixed, 1, 3, k).source == choose_caption(_caps(k), fixed, 1, 7, k, 4, "1/1").source
        for k in KEYS[:2000]
    )


def test_missing_or_blank_synthetic_caption_falls_back_and_is_counted() -> None:
    m = Mixture.from_p(1.0)
    stats = MixStats()
    for caps in ({ALT: "alt"}, {ALT: "alt", "altogether": "   "}, {ALT: "alt", "altogether": "dense"}):
        c = choose_caption(caps, m, 0, 0, "k")
        stats.add(c.source, c.wanted)
    assert stats.used == {ALT: 2, "altogether": 1}
    assert stats.fallbacks == {"altogether": 2}
    assert stats.realized_synthetic_ratio() == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "abc", "nan"])
def test_bad_p_names_the_flag(bad: str) -> None:
    with pytest.raises(ValueError, match="--p"):
        parse_p(bad)


@pytest.mark.parametrize("bad", ["0,,1", "0.1,x", "", "0.2,2"])
def test_malformed_p_list_names_the_flag(bad: str) -> None:
    with pytest.raises(ValueError, match="--p"):
        parse_p_list(bad)


def test_p_list_merges_duplicates() -> None:
    assert parse_p_list("0,0.15,0.15,1") == [0.0, 0.15, 1.0]


def test_shard_pattern_matching_no_file_names_the_pattern(tmp_path) -> None:
    pattern = str(tmp_path / "nope-{000..003}.tar")
    with pytest.raises(FileNotFoundError, match="nope-"):
        expand_shards(pattern)


def _key_sources(pattern: str, workers: int, epoch: int, p: float = 0.5) -> list[tuple[str, str]]:
    stages = caption_sample_stages(pattern, mixture=Mixture.from_p(p), seed=7, epoch=SharedEpoch(epoch))
    pipe = wds.DataPipeline(*stages, wds.map(lambda s: (s["__key__"], s["caption_source"], s["caption"])))
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=workers)
    return list(loader)


def test_choices_do_not_depend_on_worker_count_and_each_sample_once(shards) -> None:
    pattern, keys = shards
    runs = {w: _key_sources(pattern, w, epoch=0) for w in (0, 1, 2, 4)}
    for w, items in runs.items():
        seen = [k for k, _, _ in items]
        assert sorted(seen) == sorted(keys), f"workers={w}: every sample exactly once per epoch"
    as_map = {w: {k: s for k, s, _ in items} for w, items in runs.items()}
    assert as_map[0] == as_map[1] == as_map[2] == as_map[4]
    # the caption really is the chosen source's text
    for k, s, cap in runs[2]:
        assert cap == (f"alt text {k}" if s == ALT else f"a dense synthetic caption of sample {k}")
    other = {k: s for k, s, _ in _key_sources(pattern, 2, epoch=1)}
    assert other != as_map[0], "a new epoch redraws choices"


def test_every_sample_once_across_ranks_and_workers(shards, monkeypatch) -> None:
    pattern, keys = shards
    seen = []
    for rank in range(2):
        monkeypatch.setattr(wds.utils, "pytorch_worker_info", lambda group=None, r=rank: (r, 2, 0, 1))
        seen += [k for k, _, _ in _key_sources(pattern, 0, epoch=0)]
    assert sorted(seen) == sorted(keys)


def test_pipeline_counts_fallback_for_missing_and_blank(tmp_path) -> None:
    missing = frozenset({"000000003", "000010004"})
    blank = frozenset({"000000007"})
    pattern, keys = make_shards(tmp_path, n_shards=2, per_shard=10, missing=missing, blank=blank)
    pipe = build_caption_pipeline(
        pattern,
        mixture=Mixture.from_p(1.0),
        seed=0,
        epoch=SharedEpoch(0),
        image_transform=lambda im: torch.zeros(3, 4, 4),
        tokenizer=lambda texts: torch.zeros(len(texts), 8, dtype=torch.long),
        batch_size=5,
        shuffle_buffer=0,
    )
    stats = MixStats()
    n = 0
    for batch in make_loader(pipe, 0):
        stats.update(batch["sources"], batch["wanted"])
        n += len(batch["keys"])
        assert batch["images"].shape == (5, 3, 4, 4)
    assert n == len(keys)
    assert stats.fallbacks == {"altogether": 3}
    assert stats.used == {"altogether": 17, ALT: 3}
