"""Text-to-image end to end on tiny shards: train (mixing, dropout, resume), export, sample, score, latents."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from caption_mixing.mixing import Mixture, choose_caption
from caption_mixing.pipeline import SharedEpoch, iter_batches
from t2i.config import load_config
from t2i.data import build_t2i_pipeline
from t2i.train import dropped_captions
from tests.conftest import (
    assert_same_t2i_training,
    signal_self_after_first_checkpoint,
    t2i_equivalence_overrides,
    tiny_t2i_world,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return tiny_t2i_world(tmp_path_factory.mktemp("t2i"))


def test_batches_use_the_clip_mixing_rule_and_dropout_is_deterministic(world: dict) -> None:
    mixture = Mixture.from_p(0.5, "altogether")
    pipe = build_t2i_pipeline(
        world["pattern"],
        latents=False,
        mixture=mixture,
        seed=3,
        epoch=SharedEpoch(2),
        batch_size=8,
        resolution=16,
        latent_shape=(8, 4, 4),
        shuffle_buffer=10,
    )
    batch = next(iter(pipe))
    assert batch["x"].shape == (8, 3, 16, 16) and -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0
    for key, caption, source in zip(batch["keys"], batch["captions"], batch["sources"], strict=True):
        captions = {"alt": f"alt text {key}", "altogether": f"a dense synthetic caption of sample {key}"}
        if key == "000000003":
            captions["altogether"] = None
        want = choose_caption(captions, mixture, 3, 2, key)
        assert (caption, source) == (want.caption, want.source)
    cfg = load_config("embedded", {"caption_dropout": 0.1, "seed": 3})
    many = {"captions": ["c"] * 4000, "keys": [f"k{i}" for i in range(4000)]}
    dropped = dropped_captions(many, cfg, epoch=0)
    assert dropped == dropped_captions(many, cfg, epoch=0)
    assert 0.08 < dropped.count("") / 4000 < 0.12
    assert dropped != dropped_captions(many, cfg, epoch=1)


def test_repeated_passes_in_an_epoch_draw_captions_and_dropout_again(world: dict) -> None:
    """With several processes each worker repeats its shards to fill the epoch (``batches_per_epoch``):
    a sample's later visits draw its caption and its caption dropout again (issue 14 item 4)."""
    mixture = Mixture.from_p(0.5, "altogether")
    pipe = build_t2i_pipeline(
        world["pattern"],
        latents=False,
        mixture=mixture,
        seed=3,
        epoch=SharedEpoch(1),
        batch_size=4,
        resolution=16,
        latent_shape=(8, 4, 4),
        shuffle_buffer=0,
        batches_per_epoch=30,  # 3 passes over 40 samples
    )
    visits: dict[str, list[str]] = {}
    draws: list[str] = []
    for batch in pipe:
        draws += batch["draws"]
        for key, wanted in zip(batch["keys"], batch["wanted"], strict=True):
            visits.setdefault(key, []).append(wanted)
    assert {len(v) for v in visits.values()} == {3} and len(set(draws)) == 120  # one draw key per visit
    caps = {"alt": "a", "altogether": "s"}
    assert all(choose_caption(caps, mixture, 3, 1, k).source == v[0] for k, v in visits.items())
    changed = sum(a != b for v in visits.values() for a, b in zip(v, v[1:], strict=False))
    assert 0.3 < changed / 80 < 0.7  # independent draws at p=0.5: ~50%; the old rule: 0
    cfg = load_config("embedded", {"caption_dropout": 0.5, "seed": 3})
    dropped = dropped_captions({"captions": ["c"] * 120, "keys": draws, "draws": draws}, cfg, epoch=1)
    per_key: dict[str, list[bool]] = {}
    for draw, cap in zip(draws, dropped, strict=True):
        per_key.setdefault(draw.split("\x1e")[0], []).append(cap == "")
    assert any(len(set(v)) > 1 for v in per_key.values())  # dropout is drawn per visit too


@pytest.fixture(scope="module")
def tokenizer(world: dict):
    from t2i.components import load_text_encoder

    return load_text_encoder(world["overrides"]["text_encoder"], 64).tokenizer


def _samples(cfg, shards: str, epoch: int, tokenizer, num_epochs: int = 1) -> list[tuple[str, str, str]]:
    """(key, source, caption) of every sample one epoch of ``t2i.train``'s loader yields for ``cfg``."""
    from t2i.train import DataSpec, training_loader

    data = DataSpec(shards, False, None, None)
    loader = training_loader(cfg, data, SharedEpoch(epoch), cfg.batch_size, num_epochs, None, tokenizer)
    return [s for b in loader for s in zip(b["keys"], b["sources"], b["captions"], strict=True)]


def test_p_schedule_sets_the_synthetic_share_per_epoch(world: dict, tokenizer) -> None:
    from t2i.train import DataSpec, run_epochs

    cfg = load_config(
        "embedded", {**world["overrides"], "p_schedule": "linear:0:1", "dataset_size": 40, "max_steps": 10}
    )
    assert run_epochs(cfg, DataSpec(world["pattern"], False, None, None), 10, None) == 2  # 10 steps x 8 / 40
    first, second = (_samples(cfg, world["pattern"], e, tokenizer, num_epochs=2) for e in (0, 1))
    assert {src for _, src, _ in first} == {"alt"}  # p(0) = 0
    share = sum(src == "altogether" for _, src, _ in second) / len(second)
    assert 0.25 < share < 0.75  # p(1/2) = 0.5 on 40 samples
    no_size = load_config("embedded", {**world["overrides"], "p_schedule": "linear:0:1"})
    with pytest.raises(ValueError, match="p_schedule=.* needs the epoch length: pass --set dataset_size=N"):
        run_epochs(no_size, DataSpec(world["pattern"], False, None, None), 10, None)


def test_n_way_captions_draw_every_named_source(world: dict, tokenizer, tmp_path: Path) -> None:
    from caption_mixing.shards import expand_shards
    from caption_mixing.sidecar import sidecar_path, write_sidecar
    from tests.conftest import make_shards

    pattern, keys = make_shards(tmp_path / "mix", n_shards=2, per_shard=20)
    for shard in expand_shards(pattern):
        own = [k for k in keys if k.startswith(Path(shard).stem)]
        write_sidecar(sidecar_path(shard, "scratch"), shard, "scratch", {k: f"scratch caption {k}" for k in own})
    cfg = load_config("embedded", {**world["overrides"], "captions": "alt=0.4,altogether=0.3,scratch=0.3"})
    assert cfg.p == pytest.approx(0.6)
    got = _samples(cfg, pattern, 0, tokenizer)
    assert {src for _, src, _ in got} == {"alt", "altogether", "scratch"}
    assert all(cap == f"scratch caption {key}" for key, src, cap in got if src == "scratch")


def test_long_captions_are_fitted_to_the_text_context(world: dict, tokenizer, tmp_path: Path) -> None:
    from caption_mixing.shards import expand_shards
    from caption_mixing.sidecar import sidecar_path, write_sidecar
    from t2i.components import token_counter
    from tests.conftest import make_shards

    pattern, keys = make_shards(tmp_path / "long", n_shards=1, per_shard=16)
    sentences = [f"Sentence {i} describes a small red bird on sand." for i in range(12)]
    long = {k: " ".join(sentences) for k in keys}
    shard = expand_shards(pattern)[0]
    write_sidecar(sidecar_path(shard, "altogether"), shard, "altogether", long)
    count = token_counter(tokenizer)
    context = {**world["overrides"], "p": 1.0, "max_sequence_length": 64}
    assert count(long[keys[0]]) > 64
    head = _samples(load_config("embedded", context), pattern, 0, tokenizer)
    assert all(cap == long[key] for key, _, cap in head)  # head: the text encoder truncates
    cfg = load_config("embedded", {**context, "long_captions": "sentences"})
    fitted = _samples(cfg, pattern, 0, tokenizer)
    assert len(fitted) == 16
    for _, _, cap in fitted:  # the longest run of whole leading sentences that fits 64 tokens
        n = cap.count("Sentence")
        assert cap == " ".join(sentences[:n]) and count(cap) <= 64 < count(" ".join(sentences[: n + 1]))


def test_mix_mode_per_sample_keeps_each_samples_caption_across_epochs(world: dict, tokenizer) -> None:
    def sources(mode: str, epoch: int) -> dict[str, str]:
        cfg = load_config("embedded", {**world["overrides"], "p": 0.5, "mix_mode": mode})
        return {key: src for key, src, _ in _samples(cfg, world["pattern"], epoch, tokenizer)}

    assert sources("per_sample", 0) == sources("per_sample", 1)
    visit = sources("per_visit", 0), sources("per_visit", 1)
    assert sum(visit[0][k] != visit[1][k] for k in visit[0]) >= 5  # drawn anew each epoch (the paper)


def test_blank_alt_text_follows_the_blank_alt_option(world: dict, tokenizer, tmp_path: Path) -> None:
    from t2i.train import DataSpec, training_loader
    from tests.conftest import make_shards

    pattern, keys = make_shards(tmp_path / "blank", n_shards=1, per_shard=16)
    blank = {keys[1]: b"", keys[5]: b"  \n", keys[9]: b"\t"}
    _rewrite_members(tmp_path / "blank" / "00000.tar", {f"{k}.txt": v for k, v in blank.items()})

    def epoch(policy: str) -> tuple[dict[str, str], Counter]:
        cfg = load_config("embedded", {**world["overrides"], "p": 0.0, "blank_alt": policy})
        loader = training_loader(cfg, DataSpec(pattern, False, None, None), SharedEpoch(0), 1, 1, None, tokenizer)
        errors: Counter = Counter()
        got = {}
        for _, batch in iter_batches(loader, 0, errors):
            got.update(zip(batch["keys"], batch["sources"], strict=True))
        return got, errors

    fallback, counted = epoch("fallback")  # p=0 draws alt-text; blank ones take the synthetic caption
    assert {k for k, src in fallback.items() if src != "alt"} == set(blank) and len(fallback) == 16
    assert counted == {"blank_alt/fallback/altogether": 3}
    skipped, counted = epoch("skip")
    assert set(skipped) == set(keys) - set(blank) and counted == {"blank_alt/skipped": 3}


def test_run_point_trains_exports_samples_scores_and_resumes(world: dict, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    from t2i.experiment import resolve, run_dir_for, run_point
    from t2i.sample import PipelineError, check_pipeline_folder
    from t2i.train import train
    from training.checkpoint import latest_checkpoint, load_checkpoint

    cfg = load_config("embedded", {**world["overrides"], "p": 1.0})
    metrics = run_point(cfg, tmp_path / "runs")
    run_dir = run_dir_for(tmp_path / "runs", cfg)
    assert metrics["steps"] == 3 and set(metrics["clip_score"]) == {"original", "synthetic"}
    assert all(0.0 <= v <= 100.0 for v in metrics["clip_score"].values())
    assert metrics["eval_prompts"] == 3 and metrics["mixing"]["used"]["altogether"] >= 22
    assert metrics["mixing"]["fallbacks"] in ({}, {"altogether": 1}, {"altogether": 2})
    assert (run_dir / "config.json").is_file() and (run_dir / "provenance.json").is_file()
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all("images_per_s" in r for r in log)
    assert len(list((run_dir / "samples" / "synthetic").glob("*.png"))) == 3 and (run_dir / "grid.png").is_file()

    pipe = DiffusionPipeline.from_pretrained(run_dir / "pipeline", local_files_only=True)
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and type(pipe.text_encoder).__name__ == "CLIPTextModel"
    ema = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))["ema"]
    assert torch.equal(pipe.transformer.state_dict()["proj_out.weight"], ema["proj_out.weight"])

    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["seed"] == cfg.seed and prov["packages"]["diffusers"] and "commit" in prov["git"]
    assert json.loads((run_dir / "config.json").read_text())["config_hash"]
    assert metrics["clip_score_reference"]["real_images"]["synthetic"] >= 0.0

    assert metrics["truncated_prompts"]["judge"] == {"alt": 0, "synthetic": 0} and metrics["data_errors"] == {}
    assert list((run_dir / "tensorboard").iterdir())  # the shared step log writes TensorBoard events too

    # Same folder, more steps: resumes instead of starting over. A temp file left by an interrupted
    # checkpoint write is ignored; a truncated newest checkpoint is named and skipped (issue 13 item 10):
    # training resumes from step 2, and log records past it (steps 3 and a stray 4) are dropped
    # before being written again (item 11: no duplicated rows).
    (run_dir / "checkpoints" / ".step_00000004.pt.abc.tmp").write_bytes(b"partial")
    newest = run_dir / "checkpoints" / "step_00000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with (run_dir / "train_log.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    more = load_config("embedded", {**world["overrides"], "p": 1.0, "max_steps": 5})
    res = resolve(more)
    ckpt = train(more, run_dir, res.data, res.vae, res.text_encoder)
    assert ckpt.name == "step_00000005.pt" and load_checkpoint(ckpt)["step"] == 5
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert sum(load_checkpoint(ckpt)["mixing"]["used"].values()) == 5 * 8  # counts carried over the resume

    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "pipeline", broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(PipelineError, match="component 'vae' is missing"):
        check_pipeline_folder(broken)


def test_learned_sigma_trains_exports_and_samples_end_to_end(world: dict, tmp_path: Path) -> None:
    """The dit-xl-2 recipe's 8-channel path on a tiny config (issue 14 item 5): learned sigma with the VLB
    term and grad clip 0.01 train, the EMA holds 8 output channels, the exported PixArtAlphaPipeline has
    out_channels 8 (diffusers keeps the epsilon half when out_channels is twice the latent channels),
    and sampling through it gives images."""
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    from t2i.experiment import run_dir_for, run_point
    from t2i.sample import generate
    from training.checkpoint import latest_checkpoint, load_checkpoint

    recipe = load_config("dit-xl-2")
    diffusion = {k: getattr(recipe, k) for k in ("learned_sigma", "grad_clip", "prediction_type", "beta_schedule")}
    cfg = load_config("embedded", {**world["overrides"], **diffusion})
    metrics = run_point(cfg, tmp_path / "runs")
    run_dir = run_dir_for(tmp_path / "runs", cfg)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    assert all(r["grad_norm"] is not None for r in log)  # clipped at 0.01 every step
    saved = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    patch = cfg.patch_size * cfg.patch_size
    assert saved["state_dict"]["proj_out.weight"].shape[0] == patch * 8 == saved["ema"]["proj_out.weight"].shape[0]
    assert not torch.equal(saved["state_dict"]["proj_out.weight"], saved["ema"]["proj_out.weight"])

    pipe = DiffusionPipeline.from_pretrained(run_dir / "pipeline", local_files_only=True)
    assert (pipe.transformer.config.in_channels, pipe.transformer.config.out_channels) == (4, 8)
    assert torch.equal(pipe.transformer.state_dict()["proj_out.weight"], saved["ema"]["proj_out.weight"])
    assert set(metrics["clip_score"]) == {"original", "synthetic"} and metrics["eval_prompts"] == 3
    pngs = sorted((run_dir / "samples" / "synthetic").glob("*.png"))
    assert len(pngs) == 3 and all(Image.open(f).size == (16, 16) for f in pngs)
    pipe.set_progress_bar_config(disable=True)
    image = generate(pipe, ["a red square"], max_sequence_length=cfg.max_sequence_length, steps=2, guidance_scale=2.0)
    pixels = np.asarray(image[0], dtype=np.float32)
    assert pixels.shape == (16, 16, 3) and pixels.std() > 0


def test_two_processes_train_like_one_process_accumulating_two_micro_batches(world: dict, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m t2i run`` (accelerate DDP, gloo, 2 ranks x 4) == 1 process x
    2 micro-batches of 4.

    Shards of 4 without shuffling give both layouts the same micro-batches; noise and timesteps
    follow the global micro-batch index; eps=1e-3 keeps float noise in near-zero gradients from
    flipping Adam's first ~sign(g) step. Rank 0 alone evaluates and writes metrics.json.
    """
    from t2i.experiment import run_dir_for, run_point

    common = t2i_equivalence_overrides(world, tmp_path / "shards")
    one = load_config("embedded", {**common, "grad_accum": 2})
    run_point(one, tmp_path / "one")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "t2i", "run", "--out", str(tmp_path / "two")]
    cmd += [arg for k, v in common.items() for arg in ("--set", f"{k}={v}")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_t2i_training(run_dir_for(tmp_path / "one", one), run_dir_for(tmp_path / "two", one))


def test_train_command_trains_and_exports_without_evaluating(
    world: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from t2i.__main__ import main

    argv = ["train", "--p", "0", "--out", str(tmp_path / "runs")]
    argv += [arg for k, v in world["overrides"].items() for arg in ("--set", f"{k}={v}")]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = Path(printed["pipeline"]).parent
    assert Path(printed["checkpoint"]).name == "step_00000003.pt"
    assert (run_dir / "pipeline" / "model_index.json").is_file()
    assert (run_dir / "provenance.json").is_file() and not (run_dir / "metrics.json").exists()


def test_signal_saves_at_that_step_and_resume_finishes_and_nan_names_the_last_checkpoint(
    world: dict, tmp_path: Path
) -> None:
    from t2i.experiment import resolve
    from t2i.train import NonFiniteLossError, train
    from training.checkpoint import list_checkpoints, load_checkpoint
    from training.preemption import Preempted

    cfg = load_config("embedded", {**world["overrides"], "max_steps": 40, "checkpoint_every": 2, "keep_last": 50})
    res = resolve(cfg)
    run = tmp_path / "run"

    signal_self_after_first_checkpoint(run / "checkpoints")
    with pytest.raises(Preempted) as info:
        train(cfg, run, res.data, res.vae, res.text_encoder)
    assert 2 <= info.value.step < 40 and info.value.signum == signal.SIGUSR1
    assert info.value.checkpoint == run / "checkpoints" / f"step_{info.value.step:08d}.pt"
    assert load_checkpoint(info.value.checkpoint)["step"] == info.value.step
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    assert load_checkpoint(train(cfg, run, res.data, res.vae, res.text_encoder))["step"] == 40

    bad = load_config("embedded", {**world["overrides"], "lr": 1e30, "warmup_steps": 0, "checkpoint_every": 1})
    pattern = r"non-finite loss at step (\d+) .*last good checkpoint: .*step_\d{8}\.pt"
    with pytest.raises(NonFiniteLossError, match=pattern) as nan:
        train(bad, tmp_path / "nan", res.data, res.vae, res.text_encoder)
    steps = [s for s, _ in list_checkpoints(tmp_path / "nan" / "checkpoints")]
    assert steps and f"at step {steps[-1]} " in str(nan.value) and f"step_{steps[-1]:08d}.pt" in str(nan.value)


def test_sample_command_writes_images(world: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from t2i.__main__ import main
    from t2i.components import load_text_encoder, load_vae
    from t2i.model import build_transformer
    from t2i.sample import export_pipeline

    cfg = load_config("embedded", world["overrides"])
    text = load_text_encoder(cfg.text_encoder, cfg.max_sequence_length)
    export_pipeline(tmp_path / "pipe", cfg, build_transformer(cfg, text.width), load_vae(cfg.vae), text)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bird\n\n" + "very long " * 60 + "\n")
    assert (
        main(
            [
                "sample",
                "--pipeline",
                str(tmp_path / "pipe"),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "out"),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").glob("0*.png")) == ["00000.png", "00001.png"]
    captured = capsys.readouterr()
    assert f"1 of 2 prompts are longer than {cfg.max_sequence_length} tokens and were truncated" in captured.out
    # counted once by us; diffusers' per-batch echo of the cut text and its T5 type warning are filtered
    assert "was truncated because" not in captured.err and "Expected types for text_encoder" not in captured.err
    lines = (tmp_path / "out" / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(line)["seed"] for line in lines] == [0, 1]


def test_precomputed_latents_train_with_sidecar_captions_and_bad_shapes_name_the_shard(
    world: dict, tmp_path: Path
) -> None:
    from t2i.data import LatentShapeError
    from t2i.experiment import resolve
    from t2i.precompute import precompute, read_manifest
    from t2i.train import train

    precompute(world["pattern"], tmp_path / "lat", world["overrides"]["vae"], resolution=16, batch_size=16)
    manifest = read_manifest(tmp_path / "lat")
    assert manifest["moments_shape"] == [8, 4, 4]
    assert manifest["sidecar_dir"] == str((world["root"] / "shards").resolve())
    latents = str(tmp_path / "lat" / "{00000..00001}.tar")
    cfg = load_config("embedded", {**world["overrides"], "train_latents": latents, "max_steps": 2, "p": 1.0})
    res = resolve(cfg)
    assert res.data.latents and res.data.sidecar_dir == manifest["sidecar_dir"]
    ckpt = train(cfg, tmp_path / "run", res.data, res.vae, res.text_encoder)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2 and state["mixing"]["used"].get("altogether", 0) >= 14  # captions from image sidecars

    wrong = load_config("embedded", {**world["overrides"], "train_latents": latents, "latent_size": 8, "max_steps": 1})
    with pytest.raises(LatentShapeError, match=r"lat/0000[01]\.tar.*\(8, 4, 4\).*expects \(8, 8, 8\)"):
        train(wrong, tmp_path / "run2", resolve(wrong).data, res.vae, res.text_encoder)


def _rewrite_members(shard: Path, new: dict[str, bytes]) -> None:
    """Replace the named members of a tar shard (same order, same keys)."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            data = new.get(info.name, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _damage_shards(root: Path) -> str:
    """Two shards of 8: a corrupt JPEG in the first, the second cut off in its fifth sample."""
    import tarfile

    from tests.conftest import make_shards

    pattern, _ = make_shards(root, n_shards=2, per_shard=8)
    _rewrite_members(root / "00000.tar", {"000000002.jpg": b"not a jpeg"})
    second = root / "00001.tar"
    with tarfile.open(second) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000010004.jpg").offset_data + 10
    second.write_bytes(second.read_bytes()[:cut])
    return pattern


def test_data_errors_are_counted_exactly_across_workers_and_resume(world: dict, tmp_path: Path) -> None:
    """Issue 13 item 6 (t2i): every bad sample is counted once per visit, through a loader worker,
    including the truncation found after the epoch's last batch, and a resume loses nothing."""
    from t2i.experiment import resolve
    from t2i.train import train
    from training.checkpoint import load_checkpoint

    pattern = _damage_shards(tmp_path / "bad")
    # Epoch 0: 7 + 4 good samples -> one batch of 8 (it carries the corrupt image), then the cut shard's count
    # arrives after it (an errors-only item); epoch 1 visits the corrupt image again.
    common = {**world["overrides"], "train_shards": pattern, "workers": 1, "shuffle_buffer": 0, "checkpoint_every": 1}
    cfg = load_config("embedded", {**common, "max_steps": 2})
    res = resolve(cfg)
    whole = load_checkpoint(train(cfg, tmp_path / "whole", res.data, res.vae, res.text_encoder))
    assert whole["data_errors"] == {"corrupt_image": 2, "truncated_tar": 1} and whole["epoch"] == 1

    first = load_config("embedded", {**common, "max_steps": 1})
    stopped = load_checkpoint(train(first, tmp_path / "resumed", res.data, res.vae, res.text_encoder))
    assert stopped["data_errors"] == {"corrupt_image": 1}  # the cut shard comes after the first batch
    resumed = load_checkpoint(train(cfg, tmp_path / "resumed", res.data, res.vae, res.text_encoder))
    assert resumed["data_errors"] == whole["data_errors"]
    assert resumed["mixing"] == whole["mixing"] and torch.equal(
        resumed["state_dict"]["proj_out.weight"], whole["state_dict"]["proj_out.weight"]
    )
