"""text_mode=both: every image trains on its alt-text and its synthetic caption in one step
(clip_train.step.BothCaptionsLoss, caption_mixing.pipeline.pair_captions); and the three modes
(random, gate, both) give the same choices and the same update on 2 gloo ranks as on one process."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp
import webdataset as wds

from caption_mixing import SharedEpoch
from caption_mixing.gate import GateSpec
from caption_mixing.mixing import ALT, Mixture
from caption_mixing.pipeline import DataErrors, build_caption_pipeline, caption_sample_stages
from clip_train.config import ClipTrainConfig, load_config
from clip_train.data import to_device
from clip_train.step import BothCaptionsLoss, forward_backward, make_loss, make_optimizer, optimizer_step
from tests.conftest import make_shards
from tests.test_clip_train_scale import FAST, _assert_same_update, _free_port
from training.distributed import DistEnv

IMG = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
ALT_F = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
SYN_F = [[1.0, 0.0], [0.6, 0.8], [-0.6, 0.8]]
SCALE, W = 2.0, 0.3


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _ce(row: list[float], target: int) -> float:
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


def _clip(img: list[list[float]], txt: list[list[float]]) -> float:
    """open_clip's ClipLoss by hand: mean of image->text and text->image cross-entropies."""
    n = len(img)
    i2t = sum(_ce([SCALE * _dot(img[i], txt[j]) for j in range(n)], i) for i in range(n)) / n
    t2i = sum(_ce([SCALE * _dot(txt[i], img[j]) for j in range(n)], i) for i in range(n)) / n
    return (i2t + t2i) / 2


def _multi_positive() -> float:
    n = len(IMG)
    texts = ALT_F + SYN_F
    loss_img = 0.0
    for i in range(n):
        row = [SCALE * _dot(IMG[i], t) for t in texts]
        log_z = math.log(sum(math.exp(v) for v in row))
        loss_img -= (1 - W) * (row[i] - log_z) + W * (row[n + i] - log_z)
    loss_img /= n
    t2i_alt = sum(_ce([SCALE * _dot(ALT_F[i], IMG[j]) for j in range(n)], i) for i in range(n)) / n
    t2i_syn = sum(_ce([SCALE * _dot(SYN_F[i], IMG[j]) for j in range(n)], i) for i in range(n)) / n
    return (loss_img + (1 - W) * t2i_alt + W * t2i_syn) / 2


@pytest.mark.parametrize("kind", ["both_mean", "multi_positive"])
def test_both_losses_equal_hand_computed_values(kind: str) -> None:
    loss = BothCaptionsLoss(W, kind, local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    got = loss(torch.tensor(IMG), torch.tensor(ALT_F + SYN_F), torch.tensor(SCALE)).item()
    expected = (1 - W) * _clip(IMG, ALT_F) + W * _clip(IMG, SYN_F) if kind == "both_mean" else _multi_positive()
    assert got == pytest.approx(expected, rel=1e-6)
    # w=0 is the alt-text CLIP loss for both kinds (the synthetic caption then only adds negatives for multi_positive)
    zero = BothCaptionsLoss(0.0, "both_mean", True, True, 0, 1)
    assert zero(torch.tensor(IMG), torch.tensor(ALT_F + SYN_F), torch.tensor(SCALE)).item() == pytest.approx(
        _clip(IMG, ALT_F), rel=1e-6
    )


def test_pipeline_pairs_both_captions_and_counts_fallbacks(tmp_path: Path) -> None:
    pattern, keys = make_shards(tmp_path / "s", 2, 6, missing=frozenset({"000000001"}))
    samples = list(
        wds.DataPipeline(
            *caption_sample_stages(
                pattern, mixture=Mixture.from_p(0.3), seed=0, epoch=SharedEpoch(0), shuffle=False, pair_texts=True
            )
        )
    )
    assert [s["__key__"] for s in samples] == keys
    for s in samples:
        assert s["caption"] == f"alt text {s['__key__']}"
        if s["__key__"] == "000000001":  # no synthetic caption: paired with its alt-text, counted as a fallback
            assert (s["caption_pair"], s["caption_source"], s["caption_wanted"]) == (s["caption"], ALT, "altogether")
        else:
            assert s["caption_pair"] == f"a dense synthetic caption of sample {s['__key__']}"
    import open_clip

    import testbed.models  # noqa: F401

    tok = open_clip.get_tokenizer("EmbeddedCLIP-Tiny")
    pipe = build_caption_pipeline(
        pattern, mixture=Mixture.from_p(0.3), seed=0, epoch=SharedEpoch(0), image_transform=lambda im: torch.zeros(3),
        tokenizer=tok, batch_size=4, shuffle_buffer=0, pair_texts=True,
    )  # fmt: skip
    batch = next(iter(pipe))
    assert batch["texts"].shape == batch["texts_pair"].shape and not torch.equal(batch["texts"], batch["texts_pair"])
    images, texts = to_device(batch, "cpu")
    assert texts.shape[0] == 2 * images.shape[0] and torch.equal(texts[4:], batch["texts_pair"])


def test_config_refuses_what_both_cannot_do() -> None:
    base = {"train_shards": "x", "text_mode": "both"}
    assert load_config("embedded", base).text_mode == "both"
    with pytest.raises(ValueError, match="accum_freq=1"):
        load_config("embedded", {**base, "accum_freq": 2, "batch_size": 64})
    with pytest.raises(ValueError, match="mix_mode=gate"):
        load_config("embedded", {**base, "mix_mode": "gate"})
    with pytest.raises(ValueError, match="text_mode"):
        load_config("embedded", {"train_shards": "x", "text_mode": "two"})
    with pytest.raises(ValueError, match="both_loss"):
        load_config("embedded", {**base, "both_loss": "mean"})


# ---------------------------------------------------------------------------------------------
# Across world sizes: 2 gloo ranks == 1 process, for the random rule, the gate and both
# ---------------------------------------------------------------------------------------------

BATCH = 8


def _choices(pattern: str) -> dict[str, dict[str, tuple]]:
    """Every sample's (used, wanted, paired caption) under the three modes, on this rank's shards."""
    modes = {
        "random": dict(mixture=Mixture.from_p(0.5)),
        "gate": dict(mixture=Mixture.from_p(0.5), gate=GateSpec()),
        "both": dict(mixture=Mixture.from_p(0.5), pair_texts=True),
    }
    out = {}
    for mode, kw in modes.items():
        stages = caption_sample_stages(pattern, seed=3, epoch=SharedEpoch(1), errors=DataErrors(), **kw)
        out[mode] = {
            s["__key__"]: (s["caption_source"], s["caption_wanted"], s.get("caption_pair"))
            for s in wds.DataPipeline(*stages)
        }
    return out


def _both_step(env: DistEnv, kind: str) -> tuple:
    from clip_train.model import create_model

    over = {**FAST, "batch_size": BATCH, "lr": 1e-3, "eps": 1e-3, "text_mode": "both", "both_loss": kind, "p": 0.3}
    cfg = load_config("embedded", over)
    assert isinstance(cfg, ClipTrainConfig)
    torch.manual_seed(0)
    model, *_ = create_model(cfg.model)
    model.eval()  # BatchNorm: running stats, so the split of the batch does not matter
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if env.distributed else model
    optimizer = make_optimizer(model, cfg, "cpu")
    g = torch.Generator().manual_seed(123)
    images = torch.randn(BATCH, 3, 64, 64, generator=g)
    alt, syn = (torch.randint(1, 5000, (BATCH, 64), generator=g) for _ in range(2))
    local = cfg.local_batch_size(env.world_size)
    lo, hi = env.rank * local, (env.rank + 1) * local
    micro = [(images[lo:hi], torch.cat([alt[lo:hi], syn[lo:hi]]))]
    loss = forward_backward(wrapped, micro, make_loss(cfg, env), "fp32", "cpu")
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer_step(wrapped, optimizer, None, None)
    if env.distributed:
        torch.distributed.all_reduce(loss)
        loss /= env.world_size
    return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}, grads


def _worker(rank: int, world: int, port: int, out_dir: str, pattern: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from training.distributed import cleanup, init_distributed

    env = init_distributed("cpu")
    mine = _choices(pattern)
    every: list = [None] * world
    torch.distributed.all_gather_object(every, mine)
    steps = {kind: _both_step(env, kind) for kind in ("both_mean", "multi_positive")}
    if env.is_main:
        torch.save({"choices": every, "steps": steps}, Path(out_dir) / "ddp.pt")
    cleanup()


def test_three_modes_two_gloo_ranks_equal_one_process(tmp_path: Path, monkeypatch) -> None:
    from tests.test_gate import _write_scores

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    pattern, keys = make_shards(tmp_path / "s", 4, 12, missing=frozenset({"000020005"}))
    _write_scores(pattern)
    torch.set_num_threads(1)
    from clip_train.model import create_model

    torch.manual_seed(0)
    before = {k: v.clone() for k, v in create_model("EmbeddedCLIP-Tiny")[0].state_dict().items()}
    single_choices = _choices(pattern)
    single_steps = {kind: _both_step(DistEnv(), kind) for kind in ("both_mean", "multi_positive")}
    tmp.spawn(_worker, args=(2, _free_port(), str(tmp_path), pattern), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)

    for mode in ("random", "gate", "both"):
        ranks = [c[mode] for c in ddp["choices"]]
        assert all(ranks) and not set(ranks[0]) & set(ranks[1])  # each rank read its own shards
        assert {**ranks[0], **ranks[1]} == single_choices[mode], mode
        assert set(single_choices[mode]) == set(keys)
    assert sum(w != ALT for _, w, _ in single_choices["gate"].values()) == 24  # p=0.5 of 48, gated exactly
    for kind in ("both_mean", "multi_positive"):
        _assert_same_update(ddp["steps"][kind], single_steps[kind], before)
    assert single_steps["both_mean"][0] != pytest.approx(single_steps["multi_positive"][0])


def test_modes_are_labelled_in_folders_and_compared_at_equal_p(tmp_path: Path) -> None:
    from caption_mixing.mixconfig import run_label
    from clip_train.experiment import run_dir_for
    from eval.report import format_mode_table, mode_of, write_mode_report

    cfgs = {
        "random": load_config("embedded", {"train_shards": "x", "p": 0.15, "seed": 1}),
        "gate": load_config("embedded", {"train_shards": "x", "p": 0.15, "seed": 1, "mix_mode": "gate"}),
        "both": load_config("embedded", {"train_shards": "x", "p": 0.15, "seed": 1, "text_mode": "both"}),
    }
    labels = {m: run_label(c) for m, c in cfgs.items()}
    assert labels == {"random": "p=0.15", "gate": "p=0.15 gate", "both": "both w=0.15"}
    dirs = {m: run_dir_for(tmp_path, c).name for m, c in cfgs.items()}
    assert dirs == {"random": "clip-embedded-p0.15-s1", "gate": "clip-embedded-p0.15-gate-s1",
                    "both": "clip-embedded-p0.15-both-s1"}  # fmt: skip
    runs = [
        {"p": 0.15, "seed": s, "label": labels[m], "tasks": {"t": {"main_metric": "acc1", "acc1": v}}}
        for m, vals in {"random": (0.2, 0.3), "gate": (0.4, 0.5), "both": (0.1, 0.1)}.items()
        for s, v in enumerate(vals)
    ]
    assert {mode_of(r) for r in runs} == {"random", "gate", "both"}
    table = format_mode_table(runs)
    assert table.splitlines()[0] == "| p (both: w) | random | both | gate |"
    assert "25.0 ± 7.1 (n=2)" in table and "45.0 ± 7.1 (n=2)" in table and "10.0 ± 0.0 (n=2)" in table
    paths = write_mode_report(runs, tmp_path / "report")
    assert paths["png"].stat().st_size > 1000 and "random" in paths["markdown"].read_text()
