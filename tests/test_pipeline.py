"""The mixing pipeline at scale: bad data, sidecar mismatch, mixtures, schedules, long captions, resume."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds

from caption_mixing import ALT, Mixture, SharedEpoch, choose_caption
from caption_mixing.long_captions import fit_caption, split_sentences
from caption_mixing.mixing import PER_SAMPLE
from caption_mixing.pipeline import (
    DataErrors,
    EpochBatches,
    build_caption_pipeline,
    caption_sample_stages,
    is_errors_only,
    iter_batches,
    make_loader,
)
from caption_mixing.schedules import parse_schedule
from caption_mixing.sidecar import SidecarError, sidecar_path, write_sidecar
from caption_mixing.stats import collect_lengths, summarize_lengths
from tests.conftest import make_shards

KEYS = [f"{i:09d}" for i in range(20000)]


def _pipeline(pattern: str, p: float = 0.5, **kw):
    return build_caption_pipeline(
        pattern,
        mixture=kw.pop("mixture", Mixture.from_p(p)),
        seed=0,
        epoch=kw.pop("epoch", SharedEpoch(0)),
        image_transform=lambda im: torch.zeros(1),
        tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
        batch_size=kw.pop("batch_size", 4),
        shuffle_buffer=kw.pop("shuffle_buffer", 0),
        drop_last=kw.pop("drop_last", False),
        **kw,
    )


def _rewrite_member(shard: Path, member: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        items = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, payload in items:
            payload = data if m.name == member else payload
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


def test_corrupt_image_and_undecodable_caption_are_skipped_counted_and_logged(tmp_path: Path, caplog) -> None:
    pattern, keys = make_shards(tmp_path, n_shards=2, per_shard=6)
    _rewrite_member(tmp_path / "00000.tar", "000000002.jpg", b"\xff\xd8not a jpeg")
    _rewrite_member(tmp_path / "00001.tar", "000010003.txt", b"caf\xe9 \xff")
    caplog.set_level(logging.WARNING)
    seen, errors = [], Counter()
    for _, batch in iter_batches(make_loader(_pipeline(pattern, p=0.0), 0), errors=errors):
        seen += batch["keys"]
    assert "000000002" not in seen and len(seen) == 11
    assert errors == {"corrupt_image": 1, "bad_bytes": 1}
    assert "000000002" in caplog.text and "00000.tar" in caplog.text and "000010003" in caplog.text


def test_truncated_tar_is_counted_once_named_and_the_rest_goes_on(tmp_path: Path, caplog) -> None:
    pattern, keys = make_shards(tmp_path, n_shards=3, per_shard=6)
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2 + 100])  # inside a member of sample 4
    caplog.set_level(logging.WARNING)
    seen, errors = [], Counter()
    for _, batch in iter_batches(make_loader(_pipeline(pattern), 0), errors=errors):
        seen += batch["keys"]
    assert set(seen) == {k for k in keys if not k.startswith("00001")} | {f"00001{i:04d}" for i in range(4)}
    assert errors == {"truncated_tar": 1}  # once, not once per webdataset layer
    assert "00001.tar is truncated at byte" in caplog.text and "'000010004'" in caplog.text


def test_error_counts_are_exact_across_workers_and_the_dropped_tail(tmp_path: Path) -> None:
    """Worker 0 reads shards 0 and 2, worker 1 shard 1 (no shuffling). Worker 1's only shard is not a
    tar, so it makes no batch; worker 0's corrupt image and truncated shard come after its last full
    batch. Every count still arrives, in errors-only items that ``iter_batches`` hides."""
    make_shards(tmp_path, n_shards=3, per_shard=6)
    _rewrite_member(tmp_path / "00000.tar", "000000005.jpg", b"not a jpeg")
    (tmp_path / "00001.tar").write_bytes(bytes(range(256)) * 8)
    with tarfile.open(tmp_path / "00002.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000020002.jpg").offset_data + 10
    (tmp_path / "00002.tar").write_bytes((tmp_path / "00002.tar").read_bytes()[:cut])
    pipe = build_caption_pipeline(
        str(tmp_path / "{00000..00002}.tar"),
        mixture=Mixture.from_p(0.5),
        seed=0,
        epoch=SharedEpoch(0),
        image_transform=lambda im: torch.zeros(1),
        tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
        batch_size=4,
        shuffle_buffer=0,
        drop_last=True,
    )
    items = list(make_loader(pipe, 2))
    assert sum(is_errors_only(i) for i in items) == 2  # one per worker
    errors = Counter()
    batches = [b for _, b in iter_batches(items, errors=errors)]
    assert [len(b["keys"]) for b in batches] == [4]  # 5 good + 2 complete in shard 2 = 7: one batch, 3 dropped
    assert errors == {"corrupt_image": 1, "unreadable_tar": 1, "truncated_tar": 1}


def test_iter_batches_skips_real_batches_and_their_counts_on_resume() -> None:
    carrier = {"errors_only": True, "data_errors": {"corrupt_image": 1}}
    items = [
        carrier,
        {"keys": ["a"], "data_errors": {"bad_bytes": 1}},
        dict(carrier),
        {"keys": ["b"], "data_errors": {}},
    ]
    errors = Counter()
    assert [(i, b["keys"]) for i, b in iter_batches(items, skip=1, errors=errors)] == [(2, ["b"])]
    assert errors == {"corrupt_image": 1}  # the first carrier and batch 1 were counted before the checkpoint
    errors = Counter()
    assert [i for i, _ in iter_batches(items, errors=errors)] == [1, 2]
    assert errors == {"corrupt_image": 2, "bad_bytes": 1}


def test_epoch_length_counts_real_batches_only() -> None:
    one_pass = [{"keys": ["a"], "data_errors": {}}, {"errors_only": True, "data_errors": {"no_image": 1}}]
    items = list(EpochBatches(one_pass, 3))
    assert [is_errors_only(i) for i in items] == [False, True, False, True, False]  # passes repeat; 3 real
    assert list(EpochBatches([one_pass[1]], 3)) == [one_pass[1]]  # a pass without batches ends the epoch


def test_sidecar_of_a_different_shard_is_detected_by_keys(tmp_path: Path) -> None:
    pattern, keys = make_shards(tmp_path, n_shards=2, per_shard=40)
    other = {f"x{k}": "caption" for k in keys[:40]}  # right shard name inside, wrong keys
    write_sidecar(sidecar_path(tmp_path / "00000.tar", "altogether"), tmp_path / "00000.tar", "altogether", other)
    with pytest.raises(SidecarError, match="belongs to a different shard"):
        list(_pipeline(pattern))


def test_multi_source_mixture_weights_and_fallback_order() -> None:
    m = Mixture.parse("alt=0.6,r2=0.1,r3=0.3", fallback="r2,alt")
    caps = {ALT: "a", "r2": "two", "r3": "three"}
    counts = Counter(choose_caption(caps, m, 0, 0, k).source for k in KEYS)
    for name, w in m.weights:
        assert abs(counts[name] / len(KEYS) - w) < 0.015
    c = choose_caption({ALT: "a", "r2": "two"}, Mixture.parse("r3=1.0", fallback="r2,alt"), 0, 0, "k")
    assert (c.source, c.wanted) == ("r2", "r3")  # declared order: r2 before alt
    with pytest.raises(ValueError, match="--captions: .*sum to 1"):
        Mixture.parse("alt=0.5,r3=0.2")
    with pytest.raises(ValueError, match="--captions: 'alt0.5' is not source=weight"):
        Mixture.parse("alt0.5")


def test_per_sample_mode_is_fixed_across_epochs_per_visit_is_not() -> None:
    caps = {ALT: "a", "altogether": "s"}
    fixed, visit = Mixture.from_p(0.5, mode=PER_SAMPLE), Mixture.from_p(0.5)
    same = [
        choose_caption(caps, fixed, 0, 0, k).source == choose_caption(caps, fixed, 0, 9, k).source for k in KEYS[:500]
    ]
    moved = [
        choose_caption(caps, visit, 0, 0, k).source != choose_caption(caps, visit, 0, 9, k).source for k in KEYS[:500]
    ]
    assert all(same) and 0.4 < sum(moved) / 500 < 0.6


def test_schedules() -> None:
    lin = parse_schedule("linear:0.0:1.0:0.2:0.8")
    assert (lin(0.0), lin(0.5), lin(1.0)) == (0.0, pytest.approx(0.5), 1.0)
    step = parse_schedule("step:0.0@0,0.5@0.3,1.0@0.6")
    assert [step(t) for t in (0.0, 0.29, 0.3, 0.7)] == [0.0, 0.0, 0.5, 1.0]
    assert parse_schedule("constant:0.15")(0.9) == 0.15
    for bad in ("linear:0:2", "step:0.5@0.2", "ramp:1", "linear:0.1"):
        with pytest.raises(ValueError, match="--p-schedule"):
            parse_schedule(bad)


def test_pipeline_applies_the_schedule_per_epoch(tmp_path: Path) -> None:
    pattern, keys = make_shards(tmp_path, n_shards=2, per_shard=100)
    epoch = SharedEpoch(0)
    sched = parse_schedule("step:0.0@0,1.0@0.5")
    shares = []
    for ep in range(2):
        epoch.set(ep)
        sources = [s for b in _pipeline(pattern, 1.0, epoch=epoch, schedule=sched, num_epochs=2) for s in b["sources"]]
        shares.append(sum(s != ALT for s in sources) / len(sources))
    assert shares[0] == 0.0 and shares[1] > 0.97  # a few samples fall back to alt-text


def test_long_caption_policies() -> None:
    text = "One two three. Four five six seven. Eight nine. Ten eleven twelve thirteen fourteen."
    count = lambda t: len(t.split())  # noqa: E731
    assert fit_caption(text, "head", count, 6) == text  # the tokenizer truncates
    assert fit_caption(text, "sentences", count, 8) == "One two three. Four five six seven."
    windows = {fit_caption(text, "random_window", count, 8, key=k) for k in KEYS[:50]}
    assert all(count(w) <= 8 for w in windows) and len(windows) > 1
    assert all(set(split_sentences(w)) <= set(split_sentences(text)) for w in windows)
    assert fit_caption(text, "random_window", count, 8, key="k") == fit_caption(
        text, "random_window", count, 8, key="k"
    )


def test_resuming_at_a_batch_reproduces_the_caption_choices(tmp_path: Path) -> None:
    pattern, _ = make_shards(tmp_path, n_shards=4, per_shard=25)

    def run() -> list[tuple]:
        return [
            tuple(zip(b["keys"], b["sources"], strict=True))
            for b in make_loader(_pipeline(pattern, shuffle_buffer=30), 0)
        ]

    full, again = run(), run()
    assert full == again  # a restarted epoch sees the same batches; skipping the first k resumes exactly
    assert len(full) == 25


def _changed_share(visits: dict[str, list[str]]) -> tuple[float, int]:
    """Share of consecutive visits of a key whose drawn source differs, and the number of such pairs."""
    pairs = [(a, b) for seq in visits.values() for a, b in zip(seq, seq[1:], strict=False)]
    return sum(a != b for a, b in pairs) / len(pairs), len(pairs)


def _within(share: float, n: int, p: float) -> bool:
    """``share`` of ``n`` pairs within 4 standard deviations of independent draws' 2p(1-p)."""
    q = 2 * p * (1 - p)
    return abs(share - q) < 4 * (q * (1 - q) / n) ** 0.5


@pytest.mark.parametrize("p", [0.5, 0.15])
def test_a_worker_repeating_its_shards_draws_each_visit_again(tmp_path: Path, p: float) -> None:
    """Two workers each repeat their 2 shards (200 samples, 20 batches) 3 times to fill 60 batches: the
    first pass keeps the (seed, epoch, key) rule, each later visit is a new draw (issue 14 item 4)."""
    pattern, keys = make_shards(tmp_path, n_shards=4, per_shard=100)
    pipe = _pipeline(pattern, p, batch_size=10, batches_per_epoch=60, drop_last=True, epoch=SharedEpoch(2))
    visits: dict[str, list[str]] = {}
    for batch in make_loader(pipe, 2):
        for key, wanted in zip(batch["keys"], batch["wanted"], strict=True):
            visits.setdefault(key, []).append(wanted)
    assert sorted(visits) == sorted(keys) and {len(v) for v in visits.values()} == {3}
    caps = {ALT: "a", "altogether": "s"}
    assert all(choose_caption(caps, Mixture.from_p(p), 0, 2, k).source == v[0] for k, v in visits.items())
    share, n = _changed_share(visits)
    assert n == 800 and _within(share, n, p), share  # the old rule repeated every choice: share 0


def _resampled_visits(pattern: str, p: float, epoch: int, n: int, workers: int = 2) -> list[tuple[str, str]]:
    pipe = wds.DataPipeline(
        *caption_sample_stages(pattern, mixture=Mixture.from_p(p), seed=0, epoch=SharedEpoch(epoch), resampled=True),
        wds.map(lambda s: (s["__key__"], s["caption_wanted"])),
    )
    return list(torch.utils.data.DataLoader(pipe.with_epoch(n), batch_size=None, num_workers=workers))


@pytest.mark.parametrize("p", [0.5, 0.15])
def test_resampled_shards_draw_every_visit_anew(tmp_path: Path, p: float) -> None:
    pattern, keys = make_shards(tmp_path, n_shards=3, per_shard=40)
    drawn = _resampled_visits(pattern, p, epoch=3, n=1200)
    visits: dict[str, list[str]] = {}
    for key, wanted in drawn:
        visits.setdefault(key, []).append(wanted)
    share, n = _changed_share(visits)
    assert n > 900 and _within(share, n, p), share  # the old rule: every visit of a key drew the same
    assert abs(sum(w != ALT for _, w in drawn) / len(drawn) - p) < 0.06  # still p on the whole
    assert drawn == _resampled_visits(pattern, p, epoch=3, n=1200)  # a function of (seed, epoch, layout)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        _pipeline(pattern, resampled=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_epochs_differ_and_a_resume_replays_its_epoch_exactly(tmp_path: Path, workers: int) -> None:
    """Shards drawn per (seed, epoch, rank, worker): each epoch draws anew (webdataset's ResampledShards
    drew the same shards every epoch in DataLoader workers, which start fresh each epoch), and a resumed
    run (a new pipeline at epoch 1 skipping 4 batches; webdataset's restarted its own epoch count) sees
    the uninterrupted run's batches, captions included: the visit counts come back by replaying the epoch."""
    pattern, _ = make_shards(tmp_path, n_shards=10, per_shard=8)

    def pipeline(epoch: SharedEpoch):
        return _pipeline(pattern, 0.5, epoch=epoch, resampled=True, batches_per_epoch=8)

    def rows(batch: dict) -> list[tuple]:
        return list(zip(batch["keys"], batch["sources"], strict=True))

    epoch = SharedEpoch(0)
    loader = make_loader(pipeline(epoch), workers)
    runs = []
    for e in (0, 1):
        epoch.set(e)
        runs.append([rows(b) for _, b in iter_batches(loader)])
    assert len(runs[1]) == 8 * max(1, workers)
    assert [[k for k, _ in b] for b in runs[0]] != [[k for k, _ in b] for b in runs[1]]
    resumed = [rows(b) for _, b in iter_batches(make_loader(pipeline(SharedEpoch(1)), workers), skip=4)]
    assert resumed == runs[1][4:]


def test_stats_truncated_share() -> None:
    summary = summarize_lengths(
        {"alt": {"words": [3, 4], "tokens": [6, 8]}, "r3": {"words": [80, 90], "tokens": [70, 110]}}, 77
    )
    assert summary["alt"]["truncated_share"] == 0.0 and summary["r3"]["truncated_share"] == 0.5


def test_stats_lengths_read_damaged_shards_like_training(tmp_path: Path) -> None:
    pattern, keys = make_shards(tmp_path, n_shards=2, per_shard=4)
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 3])
    errors = DataErrors()
    lengths = collect_lengths(pattern, ("alt", "altogether"), lambda t: len(t.split()), None, None, False, errors)
    assert len(lengths["alt"]["words"]) == 4 + 1  # shard 1: one complete sample before the cut
    assert lengths["altogether"]["words"][0] == len("a dense synthetic caption of sample 000000000".split())
    assert errors == {"truncated_tar": 1}
