"""Text-to-image: config presets, frozen-component loading and conversion, CLIP scoring, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2i.config import load_config


def test_dit_xl_2_preset_matches_paper_table_11() -> None:
    cfg = load_config("dit-xl-2")
    arch = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.latent_size, cfg.latent_channels)
    assert arch == (28, 1152, 16, 2, 32, 4) and cfg.hidden_size // cfg.num_heads == 72
    assert (cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.epochs) == (8192, 2e-5, 1000, 24)
    assert cfg.activation_fn == "gelu-approximate" and cfg.resolution == 256 and cfg.caption_dropout == 0.1
    assert (cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == (1e-4, 0.02, 1000)
    assert cfg.steps_for(None) == -(-24 * 10_900_000 // 8192)
    b2, s2 = load_config("dit-b-2"), load_config("dit-s-2")
    assert (b2.num_layers, b2.hidden_size, s2.hidden_size) == (12, 768, 384)
    # What Table 11 leaves open, as DiT and PixArt train it (issue 14 item 5): learned sigma (8 output
    # channels, hybrid loss), PixArt's grad clip 0.01 and AdamW (wd 0.03, eps 1e-10), EMA 0.9999.
    for c in (cfg, b2, s2):
        assert c.learned_sigma and c.out_channels == 8
        assert (c.grad_clip, c.weight_decay, c.eps, c.ema_decay) == (0.01, 0.03, 1e-10, 0.9999)
    from t2i.model import train_scheduler

    assert train_scheduler(cfg).config.variance_type == "learned_range"
    text = (Path(__file__).resolve().parent.parent / "t2i" / "presets" / "dit-xl-2.yaml").read_text()
    assert "Remaining differences" in text and "T5-XXL" in text and "fp16" in text  # recorded in the preset


def test_bad_config_keys_and_values_name_the_culprit() -> None:
    with pytest.raises(ValueError, match="guidance_scale"):
        load_config("embedded", {"guidance_scal": 3})
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        load_config("embedded", {"gradient_checkpointing": "maybe"})
    with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_heads=3"):
        load_config("embedded", {"hidden_size": 100, "num_heads": 3})
    with pytest.raises(ValueError, match="--preset"):
        load_config("no-such-preset")
    with pytest.raises(ValueError, match=r"'steps' is derived .* set max_steps \(or epochs\)"):
        load_config("embedded", {"steps": -5})
    # The mixing fields are clip's (caption_mixing.mixconfig), validated by the same function.
    with pytest.raises(ValueError, match="mix_mode must be"):
        load_config("embedded", {"mix_mode": "sometimes"})
    with pytest.raises(ValueError, match="p_schedule"):
        load_config("embedded", {"p_schedule": "cosine:0:1"})
    with pytest.raises(ValueError, match="p=1.5 is outside"):
        load_config("embedded", {"p": 1.5})
    with pytest.raises(ValueError, match="logger="):
        load_config("embedded", {"logger": "tensorbored"})
    with pytest.raises(ValueError, match="sample_steps=1: sampling needs at least 2"):  # PixArt's 1-step is DMD's
        load_config("embedded", {"sample_steps": 1})
    assert load_config("embedded", {"captions": "alt=0.6,altogether=0.3,scratch=0.1"}).p == pytest.approx(0.4)


def test_dit_xl_2_transformer_size() -> None:
    """PixArtTransformer2DModel at DiT-XL/2 shape (built on the meta device: no memory)."""
    from t2i.model import build_transformer

    with torch.device("meta"):
        model = build_transformer(load_config("dit-xl-2"), caption_channels=768)
    n = sum(p.numel() for p in model.parameters())
    assert 550e6 < n < 700e6, n  # DiT-XL/2 is 675M with class embeddings; PixArt-alpha XL/2 ~611M
    assert len(model.transformer_blocks) == 28
    assert model.proj_out.out_features == 2 * 2 * 8  # patch 2 x 2, 4 epsilon + 4 sigma channels


def _posterior(xt: torch.Tensor, x0: torch.Tensor, beta: torch.Tensor, prev: torch.Tensor) -> tuple:
    """q(x_{t-1} | x_t, x_0) as the normalised product N(x_t; sqrt(1-beta) x, beta) N(x; sqrt(prev) x_0, 1-prev)."""
    var = 1 / ((1 - beta) / beta + 1 / (1 - prev))
    return var * ((1 - beta).sqrt() * xt / beta + prev.sqrt() * x0 / (1 - prev)), var


def test_vlb_term_matches_the_gaussian_posterior_and_diffusers_learned_range_variance() -> None:
    """``t2i.train.vlb_loss`` against an independent computation in float64: the posterior as a product of
    two Gaussians, the model's log-variance interpolated between log beta_t and the log posterior variance
    (diffusers' ``learned_range``, checked against DDPMScheduler where float32 is exact enough), and the KL
    (t > 0) or the decoder NLL (t = 0) from torch.distributions, in bits per dimension."""
    import math

    from torch.distributions import Normal, kl_divergence

    from t2i.model import train_scheduler
    from t2i.train import vlb_loss

    sched = train_scheduler(load_config("dit-xl-2"))
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    v = v.clamp(-1, 1)
    t = torch.tensor([0, 1, 2, 10, 500, 999])
    betas = sched.betas.double()
    ac = torch.cumprod(1 - betas, 0)
    xt = ac[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * eps
    eps_hat = eps + 0.3 * torch.randn(eps.shape, generator=g, dtype=torch.float64)  # an imperfect model
    expected = []
    for i, ti in enumerate(t.tolist()):
        x0_hat = (xt[i] - (1 - ac[ti]).sqrt() * eps_hat[i]) / ac[ti].sqrt()
        _, var_clipped = _posterior(xt[i], x0[i], betas[max(ti, 1)], ac[max(ti, 1) - 1])  # DiT: t=0 uses t=1's
        logvar = (v[i] + 1) / 2 * betas[ti].log() + (1 - v[i]) / 2 * var_clipped.log()
        if ti == 500:
            diffusers = sched._get_variance(ti, predicted_variance=v[i].float()).double()
            assert torch.allclose(logvar, diffusers, rtol=1e-5)
        if ti > 0:
            true_mean, true_var = _posterior(xt[i], x0[i], betas[ti], ac[ti - 1])
            model_mean, _ = _posterior(xt[i], x0_hat, betas[ti], ac[ti - 1])
            kl = kl_divergence(Normal(true_mean, true_var.sqrt()), Normal(model_mean, (0.5 * logvar).exp()))
            expected.append(kl.mean() / math.log(2))
        else:  # t = 0: the decoder's mean is the predicted x_0 (alpha_bar_{-1} = 1)
            expected.append(-Normal(x0_hat, (0.5 * logvar).exp()).log_prob(x0[i]).mean() / math.log(2))
    got = vlb_loss(sched, x0, xt, t, eps_hat, v)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-9)


def _random_clip_checkpoint(path: Path):
    import open_clip

    import testbed.models  # noqa: F401  (registers EmbeddedCLIP-Tiny)

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("EmbeddedCLIP-Tiny")
    torch.save({"state_dict": model.state_dict(), "model_name": "EmbeddedCLIP-Tiny"}, path)
    return model.eval(), preprocess, open_clip.get_tokenizer("EmbeddedCLIP-Tiny")


def test_open_clip_text_tower_converts_exactly_and_counts_truncation(tmp_path: Path) -> None:
    from t2i.components import export_open_clip_text, load_text_encoder

    clip, _, tokenizer = _random_clip_checkpoint(tmp_path / "clip.pt")
    export_open_clip_text(tmp_path / "clip.pt", "EmbeddedCLIP-Tiny", tmp_path / "hf")
    text = load_text_encoder(tmp_path / "hf", max_length=64)
    prompts = ["IMG_2031 Common Iguana by J. Smith", "", "A photo of one red bird, set against sand.", "word " * 90]
    hidden, mask = text.encode(prompts)
    ids = tokenizer(prompts)
    with torch.no_grad():
        ref = clip.ln_final(
            clip.transformer(clip.token_embedding(ids) + clip.positional_embedding, attn_mask=clip.attn_mask)
        )
    assert torch.equal(
        text.tokenizer(prompts, padding="max_length", max_length=64, truncation=True, return_tensors="pt").input_ids,
        ids,
    )
    assert torch.allclose(hidden * mask[..., None], ref * mask[..., None], atol=1e-5)
    assert text.truncated == 1 and text.encoded == 4
    # Loading straight from the checkpoint file converts on the fly.
    same = load_text_encoder(tmp_path / "clip.pt", 64, open_clip_model="EmbeddedCLIP-Tiny")
    assert torch.allclose(same.encode(prompts[:1])[0], hidden[:1], atol=1e-6)


def test_wrong_component_layouts_name_the_path_and_expected_layout(tmp_path: Path) -> None:
    from t2i.components import ComponentError, load_text_encoder, load_vae

    (tmp_path / "notvae").mkdir()
    (tmp_path / "notvae" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ComponentError, match=r"notvae.*UNet2DModel.*AutoencoderKL folder"):
        load_vae(tmp_path / "notvae")
    with pytest.raises(ComponentError, match=r"empty.*no config.json"):
        (tmp_path / "empty").mkdir()
        load_vae(tmp_path / "empty")
    with pytest.raises(ComponentError, match=r"text_encoder=.*empty.*text_encoder/.*tokenizer/"):
        load_text_encoder(tmp_path / "empty", 64)


def test_clipscore_adapter_matches_direct_open_clip(tmp_path: Path) -> None:
    from t2i.evaluate import ClipJudge, direct_clip_score

    clip, preprocess, tokenizer = _random_clip_checkpoint(tmp_path / "clip.pt")
    g = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(5)
    ]
    prompts = ["a red bird", "two blue fish on sand", "stock photo", "a photo of a lotus", "x " * 80]
    judge = ClipJudge(clip, preprocess, tokenizer)
    via_torchmetrics = judge.mean_score(images, prompts)
    direct = direct_clip_score(clip, preprocess, tokenizer, images, prompts)
    assert via_torchmetrics == pytest.approx(max(direct, 0.0), abs=1e-3)
    per = judge.per_image(images, prompts)
    assert sum(per) / len(per) == pytest.approx(direct, abs=1e-3)
    # The 80-word prompt exceeds the 64-token context: one truncated prompt, however often it was scored
    # (the pipeline scores each prompt list twice, plus reference images; it was counted per call).
    assert judge.processor.count_truncated(prompts) == 1


def test_judge_loads_a_local_open_clip_checkpoint_and_names_a_wrong_one(tmp_path: Path) -> None:
    from t2i.components import ComponentError
    from t2i.evaluate import load_open_clip
    from training.checkpoint import CheckpointError

    clip, _, tokenizer = _random_clip_checkpoint(tmp_path / "clip.pt")
    model, preprocess, tok = load_open_clip("EmbeddedCLIP-Tiny", str(tmp_path / "clip.pt"))
    ids = tok(["a red bird"])
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), clip.encode_text(tokenizer(["a red bird"])))
    img = preprocess(Image.new("RGB", (80, 50)))
    assert img.shape == (3, 64, 64)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_open_clip("EmbeddedCLIP-Tiny", str(tmp_path / "bad.pt"))
    with pytest.raises(ComponentError, match="EmbeddedCLIP-Tiny"):
        load_open_clip("EmbeddedCLIP-Tiy", str(tmp_path / "clip.pt"))


def test_report_layout(tmp_path: Path) -> None:
    from t2i.report import format_table, write_t2i_report

    grid = tmp_path / "g.png"
    Image.new("RGB", (8, 4)).save(grid)
    runs = [
        {
            "p": 1.0,
            "clip_score": {"original": 21.25, "synthetic": 24.5},
            "eval_prompts": 16,
            "steps": 5,
            "grid": str(grid),
        },
        {
            "p": 0.0,
            "clip_score": {"original": 20.0, "synthetic": 19.0},
            "eval_prompts": 16,
            "steps": 5,
            "grid": str(grid),
        },
    ]
    table = format_table(runs)
    rows = table.splitlines()
    assert rows[0].startswith("| training data | original prompt | synthetic prompt")
    # Deltas against the p=0 row, as Table 6 (issue 14 item 6); the p=1 label does not read like the
    # paper's "w/o alt-texts" captioner ablation.
    assert "| alt-texts only (p=0) | 20.0 | 19.0 | 16 |" in rows[2]
    assert "| altogether, p=1 (all captions drawn synthetic) | 21.2 (+1.2) | 24.5 (+5.5) | 16 |" in rows[3]
    assert "no alt-text" not in table and "w/o" not in table
    half = {"p": 0.5, "clip_score": {"original": 18.5}, "eval_prompts": 16, "steps": 5}
    assert "| altogether, p=0.5 | 18.5 (-1.5) | n/a | 16 |" in format_table([*runs, half])
    assert "(+" not in format_table([runs[0], half]) and "(-" not in format_table([runs[0], half])  # no p=0 row
    runs[1]["clip_score_reference"] = {
        "real_images": {"original": 30.0, "synthetic": 50.0},
        "noise_images": {"original": 25.0, "synthetic": 4.0},
    }
    rows = format_table(runs).splitlines()
    assert rows[4].startswith("| held-out real images (ceiling) | 30.0 | 50.0 | 16 |")
    assert rows[5].startswith("| uniform-noise images (floor) | 25.0 | 4.0 | 16 |")
    paths = write_t2i_report(runs, tmp_path / "report", notice="testbed notice")
    md = paths["markdown"].read_text()
    assert "testbed notice" in md and "t2i_grid_p1.png" in md and paths["grid_p0"].is_file()
    assert json.loads(paths["json"].read_text())["runs"][0]["p"] == 1.0


def test_training_threads_leave_a_core_per_loader_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """t2i trains under training.device.cpu_threads(device, workers) (intra-op threads + workers <= cores)."""
    from training.device import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = load_config("embedded", {"workers": 1, "device": "cpu"})
        with cpu_threads(cfg.device, cfg.workers) as n:
            assert n == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit setting wins
        with cpu_threads(cfg.device, cfg.workers) as n:
            assert n == 2
    finally:
        torch.set_num_threads(old)


def test_embedded_components_are_built_once_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's points share one build; the folder appears only when complete (built aside, then renamed);
    CLIP and VAE are cached apart, so changing the VAE's recipe does not retrain the CLIP."""
    from types import SimpleNamespace

    import t2i.components
    import t2i.embedded as emb

    for i in range(2):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    testbed = SimpleNamespace(
        root=tmp_path / "testbed", fingerprint="fp", train_shards=str(tmp_path / "{00000..00001}.tar")
    )
    calls: list[str] = []

    def fake_clip_train(out: Path, cfg, tb, shards) -> Path:
        calls.append("clip")
        assert shards == [str(tmp_path / "00000.tar")]  # the last shard is held out
        assert out.parent.name.startswith(".t2i-clip-fp-")  # built aside, not in the final folder
        out.mkdir(parents=True)
        (out / "step.pt").write_bytes(b"ckpt")
        return out / "step.pt"

    monkeypatch.setattr(emb, "train_embedded_clip", fake_clip_train)
    monkeypatch.setattr(t2i.components, "export_open_clip_text", lambda ckpt, name, out: Path(out).mkdir())
    monkeypatch.setattr(emb, "train_tiny_vae", lambda out, shards, cfg: calls.append("vae") or Path(out).mkdir())
    cfg = load_config("embedded")
    first = emb.ensure_embedded_components(cfg, testbed)
    again = emb.ensure_embedded_components(load_config("embedded", {"p": 0.0, "max_steps": 7}), testbed)
    assert calls == ["clip", "vae"] and first == again
    assert first.clip_checkpoint.read_bytes() == b"ckpt" and first.vae.is_dir() and first.text_encoder.is_dir()
    folders = sorted(p.name for p in tmp_path.glob("*t2i-*"))  # no temp folder left
    assert folders == sorted([first.vae.parent.name, first.clip_checkpoint.parent.name])
    other = emb.ensure_embedded_components(load_config("embedded", {"embedded_vae_steps": 10}), testbed)
    assert other.vae != first.vae and other.text_encoder == first.text_encoder and calls == ["clip", "vae", "vae"]
    seed = emb.ensure_embedded_components(load_config("embedded", {"seed": 1}), testbed)
    assert seed.vae != first.vae and seed.clip_checkpoint != first.clip_checkpoint and calls[3:] == ["clip", "vae"]


def test_embedded_clip_is_clip_train_run_as_a_child_with_the_same_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m clip_train`` gets the values the in-process call used (so the cached build stays valid),
    one process whatever launched us, and its failure names the command and exit code."""
    import sys

    from caption_mixing.presets import parse_overrides
    from clip_train.config import load_config as clip_config
    from t2i.embedded import ClipTrainError, clip_train_command, embedded_clip_overrides, run_clip_train

    shards = [str(tmp_path / "a b" / "00000.tar"), str(tmp_path / "00001.tar")]
    argv = clip_train_command(
        tmp_path / "out", tmp_path / "tb", embedded_clip_overrides(load_config("embedded"), shards)
    )
    assert argv[:3] == [sys.executable, "-m", "clip_train"] and argv[argv.index("--out") + 1] == str(tmp_path / "out")
    sets = parse_overrides([argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    child = clip_config("embedded", sets)
    t2i_cfg = load_config("embedded")  # the in-process call this replaced, with the preset's values
    before = clip_config(
        "embedded", {"p": 0.5, "samples_seen": t2i_cfg.embedded_clip_samples, "batch_size": 64, "seed": 0}
    )
    assert {**child.to_dict(), "train_shards": None} == {**before.to_dict(), "train_shards": None}
    assert child.train_shards.split("::") == shards

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    probe = "import os, sys; sys.exit(3 if {'RANK', 'SLURM_NTASKS'} & set(os.environ) else 0)"
    run_clip_train([sys.executable, "-c", probe])  # launcher variables are not handed on
    with pytest.raises(ClipTrainError, match=r"-m clip_train .*exited with code 2"):
        run_clip_train(clip_train_command(tmp_path / "out", tmp_path / "tb", {"no_such_key": 1}))


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    """Issue 13 item 14: components load from safetensors; a .bin-only folder names itself."""
    from safetensors.torch import load_file

    from t2i.components import ComponentError, export_open_clip_text, load_text_encoder, load_vae
    from t2i.embedded import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae", safe_serialization=False)
    assert not list((tmp_path / "vae").glob("*.safetensors"))
    with pytest.raises(ComponentError, match=r"vae: .*/vae holds only pickle weights \(diffusion_pytorch_model.bin\)"):
        load_vae(tmp_path / "vae")
    assert load_vae(tmp_path / "vae", allow_pickle=True).config.latent_channels == 4

    _random_clip_checkpoint(tmp_path / "clip.pt")
    export_open_clip_text(tmp_path / "clip.pt", "EmbeddedCLIP-Tiny", tmp_path / "text")
    safe = load_text_encoder(tmp_path / "text", 64)
    weights = tmp_path / "text" / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), weights.with_name("pytorch_model.bin"))
    weights.unlink()
    with pytest.raises(ComponentError, match=r"text_encoder: .*text_encoder holds only pickle weights"):
        load_text_encoder(tmp_path / "text", 64)
    pickled = load_text_encoder(tmp_path / "text", 64, allow_pickle=True)
    assert torch.equal(pickled.encode(["a red bird"])[0], safe.encode(["a red bird"])[0])
    cfg = load_config("embedded", {"allow_pickle_weights": True})
    assert cfg.allow_pickle_weights


def test_multi_process_epochs_need_a_known_size_and_a_shard_per_reader() -> None:
    from t2i.train import DataSpec, micro_batches_per_epoch

    cfg = load_config("embedded", {"batch_size": 8, "grad_accum": 2, "workers": 2})
    shards = "/data/{00000..00007}.tar"  # 8 shards; existence is not checked here
    assert micro_batches_per_epoch(cfg, DataSpec(shards, False, None, None), world=1) is None
    assert micro_batches_per_epoch(cfg, DataSpec(shards, False, None, 100), world=2) == 100 // 8 * 2
    with pytest.raises(ValueError, match="dataset_size is not set .* pass --set dataset_size=N"):
        micro_batches_per_epoch(cfg, DataSpec(shards, False, None, None), world=2)
    with pytest.raises(ValueError, match="dataset_size=4 is less than one global batch"):
        micro_batches_per_epoch(cfg, DataSpec(shards, False, None, 4), world=2)
    with pytest.raises(ValueError, match="8 shards cannot feed 8 processes x 2 workers"):
        micro_batches_per_epoch(cfg, DataSpec(shards, False, None, 100), world=8)


def test_min_snr_weighting_downweights_nearly_clean_timesteps() -> None:
    """snr_gamma weights each sample's epsilon MSE by min(SNR, gamma) / SNR; null keeps DiT's plain MSE."""
    from accelerate import Accelerator

    from t2i.model import train_scheduler
    from t2i.train import diffusion_loss

    class Zero(torch.nn.Module):  # predicts eps = 0, so the loss is the weighted mean of noise^2
        def forward(self, x, **_):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    with pytest.raises(ValueError, match="snr_gamma=0"):
        load_config("embedded", {"snr_gamma": 0})
    eps = {"prediction_type": "epsilon", "beta_schedule": "linear"}  # DiT's recipe
    cfg = load_config("embedded", {**eps, "snr_gamma": 5.0})
    plain = load_config("embedded", {**eps, "snr_gamma": None})
    sched, acc, lat = train_scheduler(cfg), Accelerator(cpu=True), torch.zeros(64, 4, 8, 8)
    h, m = torch.zeros(64, 3, 16), torch.ones(64, 3)

    def loss(c):
        return diffusion_loss(Zero(), acc, c, sched, lat, h, m, torch.Generator().manual_seed(0)).item()

    gen = torch.Generator().manual_seed(0)  # the draws diffusion_loss makes, in its order
    noise = torch.randn(lat.shape, generator=gen)
    t = torch.randint(0, cfg.num_train_timesteps, (64,), generator=gen)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    per_sample = noise.pow(2).mean(dim=(1, 2, 3))
    assert loss(plain) == pytest.approx(per_sample.mean().item(), rel=1e-5)
    expected = (snr.clamp(max=5.0) / snr * per_sample).mean().item()
    assert loss(cfg) == pytest.approx(expected, rel=1e-5)
    assert (snr > 5).any() and loss(cfg) < loss(plain)  # clean timesteps weigh less


def test_v_prediction_target_schedule_and_exported_sampler() -> None:
    """prediction_type=v_prediction regresses v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho), and the exported
    sampler is told so; the cosine schedule reaches the scheduler; learned sigma refuses v."""
    from accelerate import Accelerator

    from t2i.model import sample_scheduler, train_scheduler
    from t2i.train import diffusion_loss

    class Zero(torch.nn.Module):
        def forward(self, x, **_):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    with pytest.raises(ValueError, match="learned_sigma=true needs prediction_type=epsilon"):
        load_config("embedded", {"learned_sigma": True, "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        load_config("embedded", {"prediction_type": "x0"})
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        load_config("embedded", {"beta_schedule": "cosine"})
    over = {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2", "snr_gamma": None}
    cfg = load_config("embedded", over)
    sched = train_scheduler(cfg)
    assert sample_scheduler(cfg).config.prediction_type == "v_prediction"
    assert sample_scheduler(cfg).config.beta_schedule == "squaredcos_cap_v2"
    linear = train_scheduler(load_config("embedded", {"beta_schedule": "linear"}))
    assert sched.alphas_cumprod[500] > 2 * linear.alphas_cumprod[500]  # cosine keeps more signal mid-way
    lat = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    h, m = torch.zeros(16, 3, 16), torch.ones(16, 3)
    got = diffusion_loss(Zero(), Accelerator(cpu=True), cfg, sched, lat, h, m, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(lat.shape, generator=gen)
    t = torch.randint(0, cfg.num_train_timesteps, (16,), generator=gen)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * lat
    assert got.item() == pytest.approx(v.pow(2).mean().item(), rel=1e-5)
    assert got.item() != pytest.approx(noise.pow(2).mean().item(), rel=1e-2)  # not the epsilon target


def test_x0_prediction_loss_and_sampler() -> None:
    """prediction_type=sample regresses the clean latents (min-SNR weighted by min(SNR, gamma) when set), and the
    exported sampler reads the model's output as x0: a model that always answers one image samples that image."""
    from accelerate import Accelerator

    from t2i.model import sample_scheduler, train_scheduler
    from t2i.train import diffusion_loss

    class Constant(torch.nn.Module):
        def __init__(self, image: torch.Tensor) -> None:
            super().__init__()
            self.image = image

        def forward(self, x, **_):
            return type("Out", (), {"sample": self.image.expand_as(x).clone()})()

    over = {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2", "snr_gamma": None}
    cfg, weighted = load_config("embedded", over), load_config("embedded", {**over, "snr_gamma": 5.0})
    sched = train_scheduler(cfg)
    lat = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    h, m, acc = torch.zeros(16, 3, 16), torch.ones(16, 3), Accelerator(cpu=True)
    zero = Constant(torch.zeros(1, 4, 8, 8))
    got = diffusion_loss(zero, acc, cfg, sched, lat, h, m, torch.Generator().manual_seed(0))
    assert got.item() == pytest.approx(lat.pow(2).mean().item(), rel=1e-5)  # the target is x0 itself
    gen = torch.Generator().manual_seed(0)  # the draws diffusion_loss makes, in its order
    torch.randn(lat.shape, generator=gen)
    t = torch.randint(0, cfg.num_train_timesteps, (16,), generator=gen)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    expected = (snr.clamp(max=5.0) * lat.pow(2).mean(dim=(1, 2, 3))).mean().item()
    assert diffusion_loss(zero, acc, weighted, sched, lat, h, m, torch.Generator().manual_seed(0)).item() == (
        pytest.approx(expected, rel=1e-5)
    )

    sampler = sample_scheduler(cfg)
    assert sampler.config.prediction_type == "sample"
    sampler.set_timesteps(10)
    target, oracle = lat[:1], Constant(lat[:1])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for step in sampler.timesteps:
        x = sampler.step(oracle(x).sample, step, x).prev_sample
    assert torch.allclose(x, target, atol=1e-3)
    v_sampler = sample_scheduler(load_config("embedded", {**over, "prediction_type": "v_prediction"}))
    v_sampler.set_timesteps(10)
    y = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for step in v_sampler.timesteps:
        y = v_sampler.step(oracle(y).sample, step, y).prev_sample
    assert not torch.allclose(y, target, atol=1e-1)  # the same answers read as v land elsewhere


def test_timestep_power_draws_noisy_steps_more_often_and_one_stays_uniform() -> None:
    """timestep_power 1 is DiT's uniform draw (same numbers as torch.randint, so recorded runs reproduce); k = 2
    has density proportional to t (mean 2T/3, three quarters of the draws above T/2); 0 is refused."""
    from t2i.train import sample_timesteps

    uniform, ramp = load_config("embedded"), load_config("embedded", {"timestep_power": 2.0})
    assert uniform.timestep_power == 1.0
    t1 = sample_timesteps(uniform, 4096, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(t1, torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0)))
    t2 = sample_timesteps(ramp, 20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t2.dtype == torch.long and int(t2.min()) >= 0 and int(t2.max()) <= 999
    assert t2.float().mean().item() == pytest.approx(2 / 3 * 1000, abs=10)
    assert (t2 >= 500).float().mean().item() == pytest.approx(0.75, abs=0.02)
    with pytest.raises(ValueError, match="timestep_power"):
        load_config("embedded", {"timestep_power": 0})


def test_dit_starts_from_pixart_initialisation() -> None:
    """PixArt-alpha's initialize_weights: zero output layer and cross-attention outputs (the untrained model
    predicts 0 whatever the prompt), zero linear biases, N(0, 0.02) adaLN-single projection."""
    from t2i.model import build_transformer

    cfg = load_config("embedded")
    torch.manual_seed(0)
    model = build_transformer(cfg, 16)
    assert not model.proj_out.weight.any() and not model.proj_out.bias.any()
    assert all(not block.attn2.to_out[0].weight.any() for block in model.transformer_blocks)
    assert not model.transformer_blocks[0].attn1.to_q.bias.any()
    assert model.adaln_single.linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    x = torch.randn(2, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    out = model(x, encoder_hidden_states=torch.randn(2, 3, 16), timestep=torch.tensor([10, 900])).sample
    assert out.shape == x.shape and not out.any()
