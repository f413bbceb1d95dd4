"""CLIP training at scale: DDP equivalence, accumulation, presets on the meta device, resume after
SIGKILL, preemption by signal, NaN stop, and layout errors. Runs on 2 CPU cores (gloo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

from clip_train.config import ClipTrainConfig, list_presets, load_config
from clip_train.data import plan_epoch
from clip_train.model import create_model_meta
from clip_train.step import forward_backward, make_loss, make_optimizer, optimizer_step
from clip_train.train import NonFiniteLossError, train
from testbed import Testbed, TestbedConfig, build_testbed
from tests.conftest import signal_self_after_first_checkpoint
from training.checkpoint import list_checkpoints, load_checkpoint
from training.distributed import DistEnv, read_env
from training.preemption import Preempted

REPO = Path(__file__).resolve().parent.parent
TINY = TestbedConfig(num_train=192, shard_size=48, eval_per_class=2, eval_per_class_small=4, num_retrieval=16, seed=5)
FAST = {"batch_size": 16, "workers": 0, "warmup_steps": 1, "log_every": 1, "shuffle_buffer": 32, "logger": "none"}
# open_clip's published parameter counts (open_clip/docs/model_profile.csv): 151.28M and 986.11M.
KNOWN_PARAMS = {"ViT-B-32-quickgelu": 151_277_313, "ViT-H-14": 986_109_441}


@pytest.fixture(scope="module")
def testbed(tmp_path_factory) -> Testbed:
    root = tmp_path_factory.mktemp("testbed_scale")
    build_testbed(root, TINY, progress=False)
    return Testbed.load(root)


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: one intra-op thread is several times faster than two fighting others."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cfg(**kw) -> ClipTrainConfig:
    return ClipTrainConfig(**{**load_config("embedded", FAST).__dict__, **kw})


# ---------------------------------------------------------------------------------------------
# Presets on the meta device
# ---------------------------------------------------------------------------------------------


def test_every_preset_builds_on_meta_with_known_parameter_count() -> None:
    for name in list_presets():
        cfg = load_config(name, {"train_shards": "/data/{00000..00009}.tar"})
        model = create_model_meta(cfg.model)
        assert all(p.is_meta for p in model.parameters()), name
        count = sum(p.numel() for p in model.parameters())
        if cfg.model in KNOWN_PARAMS:
            assert count == KNOWN_PARAMS[cfg.model], (name, count)
    b32 = load_config("vit-b-32", {"train_shards": "x"})
    assert b32.local_batch_size(64) == 512  # MetaCLIP: 512 per GPU on 64 GPUs
    h14 = load_config("vit-h-14", {"train_shards": "x"})
    assert h14.grad_checkpointing and h14.local_batch_size(160) == 750


def test_global_batch_must_split_over_ranks_and_accumulation() -> None:
    cfg = _cfg(batch_size=48, accum_freq=2)
    assert cfg.local_batch_size(3) == 8
    with pytest.raises(ValueError, match=r"batch_size=48 .* world size 5 x accum_freq 2"):
        cfg.local_batch_size(5)
    with pytest.raises(ValueError, match="accum_freq"):
        load_config("embedded", {"batch_size": 10, "accum_freq": 3})
    with pytest.raises(ValueError, match="train_num_samples"):  # DDP with unknown data size
        plan_epoch(_cfg(), DistEnv(rank=0, world_size=2), "/nowhere/{0..3}.tar", None)
    with pytest.raises(ValueError, match="4 shards cannot feed 2 ranks x 4 workers"):
        plan_epoch(_cfg(workers=4), DistEnv(rank=0, world_size=2), "/nowhere/{0..3}.tar", 1000)
    assert plan_epoch(_cfg(accum_freq=2, workers=3), DistEnv(), "/x/{0..3}.tar", 100) == (8, 12, 4)


def test_env_contract_torchrun_then_slurm(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    assert read_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert read_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert read_env() == (2, 4, 0)  # torchrun's variables win


# ---------------------------------------------------------------------------------------------
# DDP (gloo, 2 processes) == one process with the same global batch; accumulation == big batch
# ---------------------------------------------------------------------------------------------

GLOBAL_BATCH = 8


def _fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=g), torch.randint(1, 5000, (GLOBAL_BATCH, 64), generator=g)


def _one_step(env: DistEnv, accum: int) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, weights after one optimizer step, gradient) on this rank's share of the fixed batch,
    through the trainer's own functions."""
    from clip_train.model import create_model

    # eps=1e-3: Adam's first step is ~lr*sign(g); a larger eps keeps float noise in near-zero
    # gradients (e.g. attention key biases) from being amplified to a full step.
    cfg = _cfg(batch_size=GLOBAL_BATCH, accum_freq=accum, lr=1e-3, eps=1e-3)
    torch.manual_seed(0)
    model, *_ = create_model(cfg.model)
    # The tiny model's ResNet tower has BatchNorm, whose batch statistics depend on the micro-batch
    # (as with open_clip: no SyncBN); eval mode uses running stats so the comparison is exact.
    model.eval()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if env.distributed else model
    optimizer = make_optimizer(model, cfg, "cpu")
    images, texts = _fixed_batch()
    local = cfg.local_batch_size(env.world_size)
    lo = env.rank * local * accum
    micro = [
        (images[lo + j * local : lo + (j + 1) * local], texts[lo + j * local : lo + (j + 1) * local])
        for j in range(accum)
    ]
    loss = forward_backward(wrapped, micro, make_loss(cfg, env), "fp32", "cpu")
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer_step(wrapped, optimizer, None, None)
    if env.distributed:
        torch.distributed.all_reduce(loss)
        loss /= env.world_size
    return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}, grads


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from training.distributed import cleanup, init_distributed

    env = init_distributed("cpu")
    assert env.world_size == world and torch.distributed.get_backend() == "gloo"
    results = {accum: _one_step(env, accum) for accum in (1, 2)}
    if env.is_main:
        torch.save(results, Path(out_dir) / "ddp.pt")
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_update(a: tuple, b: tuple, before: dict) -> None:
    """Same loss, same gradient for every parameter, same weights after the optimizer step."""
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[2].keys() == b[2].keys() and "logit_scale" in a[2]
    for name in a[2]:  # float sums in another order: error relative to the tensor's largest entry
        err = (a[2][name] - b[2][name]).abs().max().item()
        assert err <= 1e-4 * b[2][name].abs().max().item() + 1e-9, (name, err)
    for name in before:
        da, db = a[1][name] - before[name], b[1][name] - before[name]
        assert torch.allclose(da, db, atol=2e-6, rtol=1e-3), (name, (da - db).abs().max().item())


def test_two_process_ddp_matches_one_process_and_accumulation_matches_big_batch(tmp_path: Path, monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    from clip_train.model import create_model

    torch.manual_seed(0)
    before = {k: v.clone() for k, v in create_model("EmbeddedCLIP-Tiny")[0].state_dict().items()}
    single = _one_step(DistEnv(), 1)
    accum = _one_step(DistEnv(), 2)
    tmp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    assert any(not torch.equal(single[1][k], before[k]) for k in before)  # the step did move the weights
    _assert_same_update(accum, single, before)  # accumulation over 2 micro-batches == one big batch
    _assert_same_update(ddp[1], single, before)  # 2 ranks x 4 == 1 process x 8
    _assert_same_update(ddp[2], single, before)  # 2 ranks x 2 micro-batches x 2 == 1 process x 8


# ---------------------------------------------------------------------------------------------
# Resume: SIGKILL and start again; SIGUSR1 preemption; NaN stop
# ---------------------------------------------------------------------------------------------


def test_sigkill_then_same_command_finishes_at_the_same_step(testbed: Testbed, tmp_path: Path) -> None:
    color = testbed.eval_tasks["color"]
    sets = {**FAST, "samples_seen": 16 * 8, "checkpoint_every": 2, "keep_last": 10, "eval_tasks": f"color={color}"}
    cmd = [sys.executable, "-m", "clip_train", "--preset", "embedded", "--out", str(tmp_path)]
    cmd += ["--testbed-dir", str(testbed.root)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpts = tmp_path / "clip-embedded-p0.15" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list_checkpoints(ckpts) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    killed_at = list_checkpoints(ckpts)[-1][0]
    assert 2 <= killed_at < 8

    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {ckpts / f'step_{killed_at:08d}.pt'}" in res.stdout
    final = load_checkpoint(list_checkpoints(ckpts)[-1][1])
    assert (final["step"], final["epoch"], final["batch_in_epoch"]) == (8, 0, 8)  # epoch: 192 samples / 16 = 12 steps
    assert sum(final["mixing"]["used"].values()) >= 16 * (8 - killed_at)
    assert '"steps": 8' in res.stdout


def test_sigusr1_checkpoints_and_raises_preempted_then_resume_completes(testbed: Testbed, tmp_path: Path) -> None:
    cfg = _cfg(samples_seen=16 * 10, checkpoint_every=3, keep_last=10, logger="tensorboard")
    run = tmp_path / "run"

    signal_self_after_first_checkpoint(run / "checkpoints")
    with pytest.raises(Preempted) as info:
        train(cfg, run, testbed.train_shards, num_samples=testbed.num_train)
    assert 3 <= info.value.step < 10 and info.value.signum == signal.SIGUSR1
    assert info.value.checkpoint == run / "checkpoints" / f"step_{info.value.step:08d}.pt"
    assert load_checkpoint(info.value.checkpoint)["step"] == info.value.step
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored

    final = train(cfg, run, testbed.train_shards, num_samples=testbed.num_train)
    assert load_checkpoint(final)["step"] == 10
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(testbed: Testbed, tmp_path: Path) -> None:
    cfg = _cfg(samples_seen=16 * 6, lr=1e30, warmup_steps=0, checkpoint_every=1, keep_last=10)
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+).*last good checkpoint: .*step_\d{8}\.pt") as info:
        train(cfg, tmp_path / "run", testbed.train_shards, num_samples=testbed.num_train)
    steps = [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps and f"step_{steps[-1]:08d}.pt" in str(info.value) and f"at step {steps[-1]} " in str(info.value)


def _nan_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 alone sees a NaN loss; the trainer's per-step guard must stop both ranks."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import clip_train.train as trainer
    from training.distributed import cleanup, init_distributed

    env = init_distributed("cpu")
    loss = torch.tensor(float("nan") if rank == 1 else 1.5)
    try:
        trainer.check_step(env, loss, False, 7, Path("step_00000005.pt"))
        outcome = "trained on"
    except trainer.NonFiniteLossError as exn:
        outcome = str(exn)
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)
    cleanup()


def test_nan_on_one_rank_stops_every_rank(tmp_path: Path, monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    tmp.spawn(_nan_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith("non-finite loss at step 7") and "step_00000005.pt" in text, (rank, text)
