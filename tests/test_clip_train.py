"""CLIP training application: presets, checkpoints in open_clip's format, bad input, an end-to-end sweep."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from caption_mixing.testbed import TestbedConfig, build_testbed
from clip_train.checkpoint import load_checkpoint, load_model_state
from clip_train.config import ClipTrainConfig, list_presets, load_config, parse_overrides
from clip_train.experiment import RunConflictError, run_point
from clip_train.model import check_model_name, create_model
from experiments.sweep_ratio import main as sweep_main

REPO = Path(__file__).resolve().parent.parent
TINY = TestbedConfig(num_train=384, shard_size=96, eval_per_class=2, eval_per_class_small=4, num_retrieval=16, seed=3)
FAST = {"batch_size": 32, "samples_seen": 320, "workers": 0, "checkpoint_every": 5, "log_every": 2, "warmup_steps": 2}


@pytest.fixture(scope="module")
def testbed_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("testbed")
    build_testbed(root, TINY, progress=False)
    return str(root)


def test_presets_resolve_with_paper_hyperparameters() -> None:
    assert {"embedded", "vit-b-32", "vit-h-14"} <= set(list_presets())
    b32 = load_config("vit-b-32", {"train_shards": "/data/{00000..00009}.tar"})
    assert (b32.model, b32.batch_size, b32.lr, b32.warmup_steps) == ("ViT-B-32-quickgelu", 32768, 5e-4, 2000)
    assert b32.samples_seen == 12_800_000_000 and b32.steps == 390_625
    h14 = load_config("vit-h-14", {"train_shards": "/data/x.tar"})
    assert (h14.model, h14.batch_size, h14.lr, h14.beta2, h14.weight_decay) == ("ViT-H-14", 120000, 4e-4, 0.95, 0.1)
    assert h14.precision == "amp_bf16"


def test_overrides_and_bad_config_keys() -> None:
    cfg = load_config("embedded", parse_overrides(["lr=3e-4", "workers=0"]))
    assert cfg.lr == 3e-4 and cfg.workers == 0
    with pytest.raises(ValueError, match="did you mean lr"):
        load_config("embedded", {"lrr": 1})
    with pytest.raises(ValueError, match="train_shards"):
        load_config("vit-b-32")  # real presets need the user's shards
    with pytest.raises(ValueError, match="--preset"):
        load_config("no-such-preset")


def test_unknown_model_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="Valid models: .*ViT-B-32"):
        check_model_name("ViT-B-33")


def test_embedded_sweep_end_to_end(testbed_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["--p", "0,1.0", "--out", str(out), "--testbed-dir", testbed_dir]
    for key, value in FAST.items():
        argv += ["--set", f"{key}={value}"]
    assert sweep_main(argv) == 0

    for p in ("0", "1"):
        run = out / f"clip-embedded-p{p}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == 10
        assert set(metrics["tasks"]) == {"concept", "category", "color", "count", "retrieval"}
        assert all(t["status"] == "ok" for t in metrics["tasks"].values())
        assert 0.0 <= metrics["tasks"]["color"]["acc1"] <= 1.0
        realized = metrics["mixing"]["used"]
        if p == "0":
            assert set(realized) == {"alt"}
        else:
            assert realized.get("alt", 0) < 0.05 * sum(realized.values())  # only fallbacks use alt-text
        config = json.loads((run / "config.json").read_text())
        assert config["p"] == float(p) and "config_hash" in config
        prov = json.loads((run / "provenance.json").read_text())
        assert prov["seed"] == 0 and prov["packages"]["open_clip_torch"] and "commit" in prov["git"]
        assert (run / "train_log.jsonl").read_text().count("\n") == 5

    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [float(r["p"]) for r in rows] == [0.0, 1.0]
    assert (out / "accuracy_vs_p.png").read_bytes()[:4] == b"\x89PNG"
    assert "p" in (out / "report.md").read_text()

    # Re-running the same sweep reuses finished points; a different config in the same folder is refused.
    assert sweep_main(argv) == 0
    cfg = load_config("embedded", {**FAST, "p": 0.0, "lr": 5e-4})
    with pytest.raises(RunConflictError, match="different config"):
        run_point(cfg, out, testbed_dir=testbed_dir)


def test_checkpoint_loads_through_open_clip_and_rejects_other_architectures(testbed_dir: str, tmp_path: Path) -> None:
    cfg = load_config("embedded", {**FAST, "p": 0.15})
    metrics = run_point(cfg, tmp_path, testbed_dir=testbed_dir)
    ckpt = tmp_path / "clip-embedded-p0.15" / metrics["checkpoint"]
    state = load_checkpoint(ckpt)  # weights_only=True

    model, _, _ = open_clip.create_model_and_transforms("EmbeddedCLIP-Tiny", pretrained=str(ckpt))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["state_dict"][name]), name

    other, *_ = create_model("RN50")
    with pytest.raises(ValueError, match="EmbeddedCLIP-Tiny.*RN50"):
        load_model_state(other, state, "RN50", ckpt)


def test_resume_continues_to_the_same_step_count(testbed_dir: str, tmp_path: Path) -> None:
    from caption_mixing.testbed import Testbed
    from clip_train.checkpoint import list_checkpoints
    from clip_train.train import train

    tb = Testbed.load(testbed_dir)
    cfg = ClipTrainConfig(**{**load_config("embedded", FAST).__dict__, "keep_last": 5})
    run = tmp_path / "run"
    run.mkdir()
    train(cfg, run, tb.train_shards)
    steps = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert steps == [5, 10]
    (run / "checkpoints" / "step_00000010.pt").unlink()  # as if killed after the step-5 checkpoint
    final = train(cfg, run, tb.train_shards)
    state = load_checkpoint(final)
    assert state["step"] == 10 and state["mixing"]["used"]


def test_cli_rejects_bad_p_naming_the_flag() -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "sweep_ratio.py"), "--p", "0,1.7"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "--p" in res.stderr and "1.7" in res.stderr


def test_mixture_spec_rescales_with_p_and_bad_specs_name_the_key() -> None:
    cfg = load_config("embedded", {"captions": "alt=0.5,altogether=0.3,scratch=0.2"})
    assert cfg.p == 0.5  # p follows the written mixture
    assert dict(cfg.mixture().weights) == pytest.approx({"alt": 0.5, "altogether": 0.3, "scratch": 0.2})
    swept = load_config("embedded", {"captions": "alt=0.5,altogether=0.3,scratch=0.2", "p": 0.2})
    assert dict(swept.mixture().weights) == pytest.approx({"alt": 0.8, "altogether": 0.12, "scratch": 0.08})
    with pytest.raises(ValueError, match="captions"):
        load_config("embedded", {"captions": "alt=0.5,altogether=0.6"})
    with pytest.raises(ValueError, match="p_schedule"):
        load_config("embedded", {"p_schedule": "cosine:0:1"})
    with pytest.raises(ValueError, match="long_captions"):
        load_config("embedded", {"long_captions": "tail"})


def test_multi_source_step_schedule_and_long_caption_policy_reach_training(testbed_dir: str, tmp_path: Path) -> None:
    from caption_mixing.testbed import Testbed
    from clip_train.train import train

    tb = Testbed.load(testbed_dir)
    overrides = {**FAST, "samples_seen": 2 * 12 * 32, "checkpoint_every": 100}  # 2 epochs of 12 steps
    overrides.update(captions="alt=0.5,altogether=0.3,scratch=0.2", p_schedule="step:0@0,1@0.5")
    overrides.update(long_captions="sentences")
    cfg = load_config("embedded", overrides)
    state = load_checkpoint(train(cfg, tmp_path, tb.train_shards, num_samples=tb.num_train))
    used, fallbacks = state["mixing"]["used"], state["mixing"]["fallbacks"]
    assert state["step"] == 24
    # Epoch 0 has p=0 (alt-text only), epoch 1 p=1 (synthetic only, alt-text only as a counted fallback).
    assert used["alt"] == 12 * 32 + sum(fallbacks.values())
    synthetic = used["altogether"] + used["scratch"]
    assert synthetic + sum(fallbacks.values()) == 12 * 32
    assert abs(used["scratch"] / synthetic - 0.4) < 0.15  # 0.2 / (0.3 + 0.2), binomial over ~380 draws
