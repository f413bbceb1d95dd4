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


def test_bad_config_keys_and_values_name_the_culprit() -> None:
    with pytest.raises(ValueError, match="guidance_scale"):
        load_config("embedded", {"guidance_scal": 3})
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        load_config("embedded", {"gradient_checkpointing": "maybe"})
    with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_heads=3"):
        load_config("embedded", {"hidden_size": 100, "num_heads": 3})
    with pytest.raises(ValueError, match="--preset"):
        load_config("no-such-preset")


def test_dit_xl_2_transformer_size() -> None:
    """PixArtTransformer2DModel at DiT-XL/2 shape (built on the meta device: no memory)."""
    from t2i.model import build_transformer

    with torch.device("meta"):
        model = build_transformer(load_config("dit-xl-2"), caption_channels=768)
    n = sum(p.numel() for p in model.parameters())
    assert 550e6 < n < 700e6, n  # DiT-XL/2 is 675M with class embeddings; PixArt-alpha XL/2 ~611M
    assert len(model.transformer_blocks) == 28


def _random_clip_checkpoint(path: Path):
    from clip_train.model import create_model

    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model("EmbeddedCLIP-Tiny")
    torch.save({"state_dict": model.state_dict(), "model_name": "EmbeddedCLIP-Tiny"}, path)
    return model.eval(), preprocess, tokenizer


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
    assert judge.processor.truncated >= 1  # the 80-word prompt exceeds the 64-token context


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
    assert "alt-texts only (p=0) | 20.0 | 19.0" in rows[2] and "p=1 (no alt-text) | 21.2 | 24.5" in rows[3]
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


def test_cpu_threads_leave_a_core_per_loader_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from t2i.train import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_threads(load_config("embedded", {"workers": 1, "device": "cpu"})) as n:
            assert n == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit setting wins
        with cpu_threads(load_config("embedded", {"workers": 1, "device": "cpu"})) as n:
            assert n == 2
    finally:
        torch.set_num_threads(old)


def test_drop_log_after_keeps_records_up_to_the_resumed_step(tmp_path: Path) -> None:
    from t2i.train import drop_log_after

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    drop_log_after(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_embedded_components_are_built_once_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's points share one build; the folder appears only when complete (built aside, then renamed)."""
    from types import SimpleNamespace

    import t2i.components
    import t2i.embedded as emb

    for i in range(2):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    testbed = SimpleNamespace(
        root=tmp_path / "testbed", fingerprint="fp", train_shards=str(tmp_path / "{00000..00001}.tar")
    )
    calls: list[str] = []

    def fake_clip_train(cfg, run_dir: Path, shards) -> Path:
        calls.append("clip")
        assert shards == [str(tmp_path / "00000.tar")]  # the last shard is held out
        assert run_dir.parent.name.startswith(".t2i-embedded-fp-")  # built aside, not in the final folder
        run_dir.mkdir(parents=True)
        (run_dir / "step.pt").write_bytes(b"ckpt")
        return run_dir / "step.pt"

    monkeypatch.setattr("clip_train.train.train", fake_clip_train)
    monkeypatch.setattr(t2i.components, "export_open_clip_text", lambda ckpt, name, out: Path(out).mkdir())
    monkeypatch.setattr(emb, "train_tiny_vae", lambda out, shards, cfg: calls.append("vae") or Path(out).mkdir())
    cfg = load_config("embedded")
    first = emb.ensure_embedded_components(cfg, testbed)
    again = emb.ensure_embedded_components(load_config("embedded", {"p": 0.0, "max_steps": 7}), testbed)
    assert calls == ["clip", "vae"] and first == again
    assert first.clip_checkpoint.read_bytes() == b"ckpt" and first.vae.is_dir() and first.text_encoder.is_dir()
    assert [p.name for p in tmp_path.glob("*t2i-embedded-*")] == [first.root.name]  # no temp folder left
    other = emb.ensure_embedded_components(load_config("embedded", {"embedded_vae_steps": 10}), testbed)
    assert other.root != first.root and calls == ["clip", "vae", "clip", "vae"]


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
