"""CLIP training application: presets, checkpoints in open_clip's format, bad input, an end-to-end sweep."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from caption_mixing.mixconfig import mixing_plan
from clip_train.config import ClipTrainConfig, list_presets, load_config, parse_overrides
from clip_train.experiment import run_point
from clip_train.model import check_model_name, create_model
from experiments.sweep_ratio import main as sweep_main
from testbed import EVAL_TASKS, Testbed, TestbedConfig, build_testbed
from training.checkpoint import load_checkpoint, load_model_state
from training.rundir import RunConflictError

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
    with pytest.raises(ValueError, match="not an open_clip model config; did you mean .*Valid models: .*ViT-B-32"):
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
        assert set(metrics["tasks"]) == set(EVAL_TASKS)
        assert all(t["status"] == "ok" for t in metrics["tasks"].values())
        assert 0.0 <= metrics["tasks"]["color"]["acc1"] <= 1.0
        # One evaluation path: the registry's metric per task, the schema `python -m eval zeroshot` writes.
        assert (
            metrics["schema"] == "caption-mixing/metrics/1"
            and metrics["summary"]["average_over"] == f"{len(EVAL_TASKS)}/{len(EVAL_TASKS)}"
        )
        assert metrics["tasks"]["retrieval"]["main_metric"] == "mean_recall@1"
        assert metrics["data_errors"] == {}
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
    cfg = load_config("embedded", {**FAST, "p": 0.0, "lr": 1.234e-3})
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
    from clip_train.train import train
    from testbed import Testbed
    from training.checkpoint import list_checkpoints

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
    assert dict(mixing_plan(cfg).mixture.weights) == pytest.approx({"alt": 0.5, "altogether": 0.3, "scratch": 0.2})
    swept = load_config("embedded", {"captions": "alt=0.5,altogether=0.3,scratch=0.2", "p": 0.2})
    assert dict(mixing_plan(swept).mixture.weights) == pytest.approx({"alt": 0.8, "altogether": 0.12, "scratch": 0.08})
    with pytest.raises(ValueError, match="captions"):
        load_config("embedded", {"captions": "alt=0.5,altogether=0.6"})
    with pytest.raises(ValueError, match="p_schedule"):
        load_config("embedded", {"p_schedule": "cosine:0:1"})
    with pytest.raises(ValueError, match="long_captions"):
        load_config("embedded", {"long_captions": "tail"})


def test_multi_source_step_schedule_and_long_caption_policy_reach_training(testbed_dir: str, tmp_path: Path) -> None:
    from clip_train.train import train
    from testbed import Testbed

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


# ---------------------------------------------------------------------------------------------
# Bad inputs: stop before the first step, resume past a truncated checkpoint, exact counts
# ---------------------------------------------------------------------------------------------


def _shards_with_corrupt_images(root: Path, n_shards: int = 2, per_shard: int = 40, every: int = 7) -> str:
    """Shards of solid-colour JPEGs where every ``every``-th image is not a JPEG, with altogether sidecars."""
    import io
    import tarfile

    from caption_mixing.sidecar import sidecar_path, write_sidecar
    from tests.conftest import jpeg_bytes

    root.mkdir(parents=True)
    for s in range(n_shards):
        shard = root / f"{s:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image = b"not a jpeg" if i % every == every - 1 else jpeg_bytes((40 * s, 5 * i, 90))
                for ext, data in (("jpg", image), ("txt", f"alt text {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        captions = {f"{s:05d}{i:04d}": f"a synthetic caption of sample {s} {i}" for i in range(per_shard)}
        write_sidecar(sidecar_path(shard, "altogether"), shard, "altogether", captions)
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")


def test_truncated_checkpoint_is_skipped_log_is_trimmed_and_counts_survive_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """A truncated newest checkpoint is named and the run resumes from the previous one; the steps
    logged after that checkpoint are not duplicated; data_errors equal an uninterrupted run's."""
    from clip_train.train import train

    shards = _shards_with_corrupt_images(tmp_path / "shards")
    cfg = load_config("embedded", {**FAST, "samples_seen": 6 * 16, "batch_size": 16, "checkpoint_every": 3})
    cfg = ClipTrainConfig(**{**cfg.__dict__, "log_every": 1, "keep_last": 10, "shuffle_buffer": 0, "logger": "none"})
    run = tmp_path / "run"
    uninterrupted = load_checkpoint(train(cfg, run, shards))
    assert uninterrupted["data_errors"]["corrupt_image"] >= 6 * 16 // 7  # every 7th image, counted exactly
    ckpt = run / "checkpoints" / "step_00000006.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # as if the disk filled up mid-copy
    capsys.readouterr()

    with caplog.at_level("WARNING"):
        resumed = load_checkpoint(train(cfg, run, shards))
    assert any(str(ckpt) in r.getMessage() for r in caplog.records), caplog.text
    assert f"resuming from {run / 'checkpoints' / 'step_00000003.pt'} at step 3" in capsys.readouterr().out
    assert resumed["step"] == 6
    assert resumed["data_errors"] == uninterrupted["data_errors"]
    assert resumed["mixing"] == uninterrupted["mixing"]
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # not 1..6 then 4, 5, 6 again
    logged = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    assert logged["data_errors"] == resumed["data_errors"]  # the log shows the global count, across the resume


def test_broken_eval_tasks_stop_before_the_first_step(testbed_dir: str, tmp_path: Path) -> None:
    """A missing eval folder, or a quick-eval name outside eval_tasks, stops before anything is written."""
    cfg = load_config("embedded", {**FAST, "eval_tasks": "x=/nonexistent"})
    with pytest.raises(
        ValueError, match=r"(?s)eval_tasks=.*x: no data found; looked for /nonexistent.*eval_keep_going=true"
    ):
        run_point(cfg, tmp_path / "out", testbed_dir=testbed_dir)
    assert not (tmp_path / "out").exists()

    cfg = load_config("embedded", {**FAST, "eval_every": 2, "quick_eval_tasks": "color,colour"})
    with pytest.raises(ValueError, match=r"quick_eval_tasks: \['colour'\] not among eval_tasks"):
        run_point(cfg, tmp_path / "out", testbed_dir=testbed_dir)
    assert not (tmp_path / "out").exists()

    # Wrong class names: fewer names than the labels in the shards.
    color = Testbed.load(testbed_dir).eval_tasks["color"]
    broken = tmp_path / "broken_color"
    import shutil

    shutil.copytree(color, broken)
    (broken / "classnames.txt").write_text("red\n")
    cfg = load_config("embedded", {**FAST, "eval_tasks": f"color={broken}"})
    with pytest.raises(ValueError, match=r"(?s)color: .*classnames"):
        run_point(cfg, tmp_path / "out", testbed_dir=testbed_dir)
    assert not (tmp_path / "out").exists()


def test_eval_keep_going_trains_and_reports_the_average_over_the_tasks_that_ran(
    testbed_dir: str, tmp_path: Path
) -> None:
    color = Testbed.load(testbed_dir).eval_tasks["color"]
    overrides = {**FAST, "samples_seen": 64, "eval_tasks": f"color={color},x=/nonexistent", "eval_keep_going": True}
    overrides.update(eval_every=2, quick_eval_tasks="color")  # the quick eval goes through the same runner
    metrics = run_point(load_config("embedded", overrides), tmp_path, testbed_dir=testbed_dir)
    log = [json.loads(x) for x in (tmp_path / "clip-embedded-p0.15" / "train_log.jsonl").read_text().splitlines()]
    quick = [r for r in log if "eval" in r]
    assert [(r["step"], list(r["eval"])) for r in quick] == [(2, ["color"])]
    assert quick[0]["eval"]["color"] == metrics["tasks"]["color"]["acc1"]  # the final weights, the same path
    text = (tmp_path / "clip-embedded-p0.15" / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["summary"] == metrics["summary"]
    assert metrics["tasks"]["x"]["status"] == "missing" and metrics["tasks"]["color"]["status"] == "ok"
    assert metrics["summary"]["average_over"] == "1/2" and metrics["summary"]["missing"] == ["x"]
    assert metrics["summary"]["average"] == metrics["tasks"]["color"]["acc1"]


def test_cli_refuses_a_file_as_out_and_a_derived_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from clip_train.__main__ import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as info:
        main(["--out", str(afile)])
    assert info.value.code == 2 and f"--out: {afile} exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "runs"), "--set", "steps=-5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "set samples_seen instead" in err and "did you mean" not in err
    assert not (tmp_path / "runs").exists()


# Issue 14: per-visit draws on resampled streams, resumed exactly; fp16 AMP with a GradScaler
# ---------------------------------------------------------------------------------------------


def test_resampled_run_resumed_mid_epoch_trains_on_what_an_uninterrupted_run_trains_on(
    testbed_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resampled=true, 2 steps per epoch, 6 steps: a run killed after the step-3 checkpoint (epoch 1,
    micro-batch 1) and started again replays epoch 1's shard draws and visit counts, so it trains on the
    uninterrupted run's samples with the same captions (webdataset's ResampledShards restarted its own
    epoch count in the new process and drew other shards)."""
    import clip_train.train as clip_train_loop

    tb = Testbed.load(testbed_dir)
    overrides = {**FAST, "samples_seen": 6 * 32, "checkpoint_every": 3, "train_num_samples": 64, "resampled": True}
    cfg = ClipTrainConfig(**{**load_config("embedded", overrides).__dict__, "keep_last": 5, "logger": "none"})
    seen: list[list[tuple[str, str]]] = []
    to_device = clip_train_loop.to_device

    def recording(batch: dict, device: str):
        seen.append(list(zip(batch["keys"], batch["sources"], strict=True)))
        return to_device(batch, device)

    monkeypatch.setattr(clip_train_loop, "to_device", recording)
    run = tmp_path / "run"
    uninterrupted = load_checkpoint(clip_train_loop.train(cfg, run, tb.train_shards))
    first, seen[:] = list(seen), []
    (run / "checkpoints" / "step_00000006.pt").unlink()  # as if killed after the step-3 checkpoint
    assert load_checkpoint(run / "checkpoints" / "step_00000003.pt")["epoch"] == 1
    resumed = load_checkpoint(clip_train_loop.train(cfg, run, tb.train_shards))
    assert len(first) == 6 and seen == first[3:]  # samples and their caption sources, batch by batch
    assert resumed["step"] == 6 and resumed["mixing"] == uninterrupted["mixing"]


class _Tiny(torch.nn.Module):
    """A linear map with CLIP's logit_scale, enough for ``optimizer_step``'s clamp."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.logit_scale = torch.nn.Parameter(torch.tensor(5.0))  # above ln(100): clamped by every step


def _step_with(scaler: torch.amp.GradScaler | None, clip: float | None, poison: bool = False) -> _Tiny:
    from clip_train.step import optimizer_step

    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.linspace(-1, 1, 8).view(2, 4)
    loss = (model.lin(x) ** 2).sum() * 100 + model.logit_scale
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if poison:
        model.lin.weight.grad[0, 0] = float("inf")  # an fp16 overflow
    optimizer_step(model, opt, scaler, clip)
    return model


@pytest.mark.parametrize("clip", [None, 0.5])
def test_optimizer_step_with_a_grad_scaler_unscales_before_clipping(clip: float | None) -> None:
    """``precision: amp``'s update (issue 14 item 7): a GradScaler, enabled or not, gives the fp32 update,
    clipping applies to the unscaled gradient, and an overflowing step is skipped with the scale halved.
    torch's GradScaler and fp16 autocast run on CPU (the end-to-end run: tests/test_accelerator_paths.py)."""
    ref = _step_with(None, clip)
    assert ref.logit_scale.item() == pytest.approx(math.log(100))
    for scaler in (torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", init_scale=2.0**16)):
        got = _step_with(scaler, clip)
        for (name, a), b in zip(ref.named_parameters(), got.parameters(), strict=True):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (scaler.is_enabled(), name)
        if scaler.is_enabled():
            assert scaler.get_scale() == 2.0**16  # no overflow: the scale is kept
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    skipped = _step_with(scaler, clip, poison=True)
    assert torch.equal(skipped.lin.weight, _Tiny().lin.weight) and scaler.get_scale() == 2.0**15
    assert skipped.logit_scale.item() == pytest.approx(math.log(100))  # still clamped


def test_b32_preset_says_why_it_trains_in_bf16_and_amp_is_the_metaclip_alternative() -> None:
    text = (REPO / "clip_train" / "presets" / "vit-b-32.yaml").read_text()
    assert "MetaCLIP's B/32 config trains with fp16 AMP" in text and "--set precision=amp" in text
    readme = (REPO / "README.md").read_text()
    presets_part = readme[readme.index("### Presets") : readme.index("### Training CLIP at scale")]
    assert "fp16 AMP" in presets_part and "precision=amp" in presets_part
    cfg = load_config("vit-b-32", {"train_shards": "/data/x.tar", "precision": "amp"})
    assert cfg.precision == "amp" and load_config("vit-b-32", {"train_shards": "/data/x.tar"}).precision == "amp_bf16"
