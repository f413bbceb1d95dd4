"""benchmarks/memory_plan.py and the plumbing of benchmarks/gpu_check.sh, on CPU.

- Parameter counts of models built on the meta device equal those of the real models.
- The activation estimate (fake tensors, saved-tensor hooks) matches what a real CPU forward keeps
  alive, measured independently by torch.profiler's allocation events: within 2% without and 3%
  with gradient checkpointing (measured: within 0.8%).
- The plan for ViT-B/32 at 512 per GPU reports figures in a sane range.
- ``gpu_check.sh --dry-run`` checks the imports and prints every step without a GPU; the helpers it
  calls (MFU peak lookup, FLOP count, run-folder figures, the measured-step path) work.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.profiler import ProfilerActivity, profile

from benchmarks import memory_plan as mp
from benchmarks.mfu import clip_flops_per_sample, mfu_pct, peak_tflops, train_flops
from benchmarks.point_figures import figures

REPO = Path(__file__).resolve().parent.parent
TOL_SAVED, TOL_CKPT = 0.02, 0.03
B = 8


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_clip() -> torch.nn.Module:
    """A two-tower ViT CLIP small enough for a CPU test (open_clip's own classes)."""
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2),
    )


def tiny_dit_cfg():
    from t2i.config import load_config

    return load_config("embedded", {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "latent_size": 8})


def held_by_graph(forward_loss) -> int:
    """Bytes a forward leaves allocated (what autograd keeps for backward), from the profiler's
    allocation events: the net allocation over the call, less the returned loss."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward_loss()
    return sum(e.self_cpu_memory_usage for e in prof.events()) - loss.untyped_storage().nbytes()


def clip_forward_loss(model: torch.nn.Module, autocast: torch.dtype | None):
    def run() -> torch.Tensor:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            images, texts = torch.randn(B, 3, 32, 32), torch.randint(1, 100, (B, 16))
            return mp.contrastive_loss(*mp.clip_outputs(model(images, texts)), 2, True)

    return run


def dit_forward_loss(model: torch.nn.Module, cfg, autocast: torch.dtype | None):
    def run() -> torch.Tensor:
        c, s, n = cfg.latent_channels, cfg.latent_size, cfg.max_sequence_length
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            noisy, noise = torch.randn(B, c, s, s), torch.randn(B, c, s, s)
            hidden, mask = torch.randn(B, n, 16), torch.ones(B, n, dtype=torch.long)
            t = torch.randint(0, 1000, (B,))
            out = model(noisy, encoder_hidden_states=hidden, timestep=t, encoder_attention_mask=mask).sample.float()
            return F.mse_loss(out[:, :c], noise)

    return run


def test_meta_parameter_counts_equal_real_models() -> None:
    from t2i.model import build_transformer

    torch.manual_seed(0)
    real_clip, cfg = tiny_clip(), tiny_dit_cfg()
    real_dit = build_transformer(cfg, 16)
    with torch.device("meta"):
        meta_clip, meta_dit = tiny_clip(), build_transformer(cfg, 16)
    for real, meta in ((real_clip, meta_clip), (real_dit, meta_dit)):
        assert all(p.is_meta for p in meta.parameters())
        shapes = [(n, p.shape) for n, p in real.named_parameters()]
        assert [(n, p.shape) for n, p in meta.named_parameters()] == shapes
        fake, _ = mp.fake_on_cpu(copy.deepcopy(meta))  # what the plan runs: same parameters, still no storage
        assert sum(p.numel() for p in fake.parameters()) == sum(p.numel() for p in real.parameters()) > 10_000
        assert all(isinstance(p, FakeTensor) for p in fake.parameters())


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_estimate_matches_real_cpu_measurement(autocast) -> None:
    from t2i.model import build_transformer

    torch.manual_seed(0)
    cfg = tiny_dit_cfg()
    real_clip, real_dit = tiny_clip().train(), build_transformer(cfg, 16).train()
    with torch.device("meta"):
        meta_clip, meta_dit = tiny_clip(), build_transformer(cfg, 16)
    est_clip = mp.clip_activations(meta_clip, B, 2, True, autocast)
    est_dit = mp.dit_activations(meta_dit, cfg, B, 16, autocast)

    measured = {
        "clip": held_by_graph(clip_forward_loss(real_clip, autocast)),
        "dit": held_by_graph(dit_forward_loss(real_dit, cfg, autocast)),
    }
    real_clip.set_grad_checkpointing(True)
    real_dit.enable_gradient_checkpointing()
    measured_ckpt = {
        "clip": held_by_graph(clip_forward_loss(real_clip, autocast)),
        "dit": held_by_graph(dit_forward_loss(real_dit, cfg, autocast)),
    }
    for name, est in (("clip", est_clip), ("dit", est_dit)):
        assert est.saved == pytest.approx(measured[name], rel=TOL_SAVED), name
        assert est.held_ckpt == pytest.approx(measured_ckpt[name], rel=TOL_CKPT), name
        assert 0 < est.block_peak < est.saved and est.ckpt < est.saved, name
    # the fake run and a run of the real model through the same hooks see the same tensors
    real_clip.set_grad_checkpointing(False)
    same = mp.clip_activations(real_clip, B, 2, True, autocast)
    assert same.saved == pytest.approx(est_clip.saved, rel=0.005)


def test_plan_vit_b_32_at_512_is_in_a_sane_range() -> None:
    plan = mp.clip_plan("vit-b-32")
    assert (plan.per_gpu_batch, plan.world, plan.precision, plan.preset_ckpt) == (512, 64, "amp_bf16", False)
    assert plan.params == 151_277_313  # open_clip's published count for ViT-B-32-quickgelu
    parts = plan.parts()
    assert parts["weights fp32"] == 4 * plan.params and parts["AdamW m+v fp32"] == 8 * plan.params
    assert parts["DDP grad buckets"] == 4 * plan.params and parts["EMA fp32"] == 0
    per_sample_mib = plan.act.saved / plan.per_gpu_batch / mp.MIB
    # floor: each of 24 layers keeps at least its bf16 qkv (3 x width x tokens x 2 bytes) per sample
    floor = (12 * 3 * 768 * 50 * 2 + 12 * 3 * 512 * 77 * 2) / mp.MIB
    assert floor < per_sample_mib < 100, per_sample_mib
    total, ckpt = plan.total(False) / mp.GIB, plan.total(True) / mp.GIB
    assert 8 < total < 60 and 2 < ckpt < total / 2, (total, ckpt)
    assert mp.fits(plan.total(False), mp.GPUS[0][1]) == "yes"
    figures_ = mp.figures([plan])
    assert figures_["clip_vit_b_32_params"] == "151277313" and figures_["clip_vit_b_32_preset_fits_80gb"] == "yes"


def test_fit_rule_and_cli_on_the_embedded_presets(capsys) -> None:
    cap = mp.GPUS[0][1]
    assert [mp.fits(int(x * cap), cap) for x in (0.5, 0.95, 1.1)] == ["yes", "tight", "no"]
    assert mp.main(["--presets", "clip:embedded,t2i:embedded"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "memory_plan_ok=1"
    assert any(line.startswith("| clip:embedded | 128 |") for line in out)  # global 128 on one process
    assert any(line.startswith("| t2i:embedded | 32 |") for line in out)
    assert any(line.startswith("t2i_embedded_act_ckpt_gib=") for line in out)
    with pytest.raises(ValueError, match="clip:PRESET or t2i:PRESET"):
        mp.all_plans(["vit-b-32"])


def test_measured_step_path_runs_on_cpu(monkeypatch) -> None:
    """The --measure-cuda code (model, optimizer, two steps) on CPU with the CUDA counters stubbed."""
    peaks = iter([111, 222])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(peaks))
    clip = mp.clip_plan("embedded", batch=4)
    dit = mp.dit_plan("embedded", batch=2)
    assert dit.text_width == 128 and dit.frozen_params == 0
    assert mp.measure_cuda(clip, ckpt=True, dev="cpu") == 111
    assert mp.measure_cuda(dit, ckpt=True, dev="cpu") == 222


# ---------------------------------------------------------------------------------------------
# gpu_check.sh plumbing
# ---------------------------------------------------------------------------------------------


def test_gpu_check_dry_run_checks_imports_and_prints_every_step() -> None:
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    steps = [
        "testbed",
        "clip_bench",
        "t2i_bench",
        "clip_point",
        "eval",
        "t2i_point",
        "memory",
        "t2i_square",
        "t2i_scene",
        "t2i_objects",
    ]
    for step in steps:
        assert f"[{step}] timeout" in res.stdout, step
    assert "dry_run_imports_ok=1" in res.stdout and "missing:" not in res.stdout
    scripts = ("clip_train_throughput.py", "t2i_throughput.py", "eval_crosscheck.py", "memory_plan.py")
    for script in (*scripts, "t2i_one_square.py", "t2i_scene_probe.py", "t2i_steps_to_objects.py"):
        assert f"benchmarks/{script}" in res.stdout and (REPO / "benchmarks" / script).is_file()
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
    # an interpreter without site-packages (python -S) stands for a machine missing the wheels
    bare = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--only", "memory"],
        env={**os.environ, "PYTHON": f"{sys.executable} -S"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bare.returncode == 1 and "dry_run_imports_ok=0" in bare.stdout
    assert "missing: torch" in bare.stdout and "pip install --no-index --find-links wheelhouse" in bare.stdout
    assert "pip download -d wheelhouse" in bare.stdout and " torch " in bare.stdout


def test_gpu_check_harness_records_figures_timeouts_failures_and_budget(tmp_path: Path) -> None:
    """The step runner on CPU (--no-gpu) with a plan of its own: each step's name=value lines land in the
    results file prefixed by the step; a hung step is cut by its timeout and the next one still runs."""
    plan = tmp_path / "plan.txt"
    plan.write_text(
        "# name|timeout|command\n"
        "ok|30|echo a=1; echo 'b=two words'; echo not a figure\n"
        "slow|2|sleep 60\n"
        "fail|30|echo c=3; exit 3\n"
    )
    script = str(REPO / "benchmarks" / "gpu_check.sh")

    def run(out: Path, budget: int, *extra: str) -> tuple[int, list[str]]:
        env = {**os.environ, "OUT": str(out), "GPU_CHECK_BUDGET_S": str(budget)}
        cmd = ["bash", script, "--no-gpu", "--plan", str(plan), *extra]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        return res.returncode, (out / "gpu_check_results.txt").read_text().splitlines()

    rc, lines = run(tmp_path / "full", 300)
    assert rc == 1  # a step failed
    for line in ("ok_a=1", "ok_b=two words", "ok_status=ok", "slow_status=timeout", "fail_c=3"):
        assert line in lines, line
    assert "fail_status=failed_rc_3" in lines and "steps_not_ok=2" in lines and "preflight_status=ok" in lines
    assert any(x.startswith("date=") for x in lines) and any(x.startswith("# step ok (timeout 30s)") for x in lines)
    assert int(next(x for x in lines if x.startswith("slow_seconds=")).split("=")[1]) < 20
    rc, lines = run(tmp_path / "late", 1, "--only", "ok")  # the imports check alone outlasts a 1 s budget
    assert rc == 1 and "ok_status=skipped_out_of_budget" in lines and "ok_a=1" not in lines
    assert not any(x.startswith(("slow_", "fail_")) for x in lines)  # --only ran nothing else


def test_mfu_helpers() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Tesla T4") is None and peak_tflops("Tesla T4", 65.0) == 65.0
    assert mfu_pct(1000.0, 1e12, 989.0) == pytest.approx(100 * 1e15 / 989e12)
    assert mfu_pct(1000.0, 1e12, None) is None
    # a linear layer: forward 2*B*I*O, backward twice that (input and weight gradients)
    with torch.device("meta"):
        lin, x = torch.nn.Linear(64, 32, bias=False), torch.randn(4, 64, requires_grad=True)
    assert train_flops(lambda: lin(x).sum()) == 3 * 2 * 4 * 64 * 32
    assert train_flops(lambda: lin(x).sum(), backward=False) == 2 * 4 * 64 * 32
    per_sample = clip_flops_per_sample("EmbeddedCLIP-Tiny")
    assert 1e8 < per_sample < 1e9  # 0.27 GFLOPs: a 64 px ResNet tower and a 2-layer text tower


def test_point_figures_reads_a_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "clip-embedded-p0.15"
    (run / "checkpoints").mkdir(parents=True)
    metrics = {"steps": 20, "device": "cuda:0", "train_seconds": 12.5, "checkpoint": "checkpoints/step_00000020.pt"}
    (run / "metrics.json").write_text(json.dumps({**metrics, "summary": {"average": 0.4321}}))
    (run / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n" for s in (5, 20)))
    got = figures(run)
    assert got["steps"] == 20 and got["eval_average_pct"] == 43.21 and got["losses_finite"] == 1
    assert (got["first_loss"], got["last_loss"]) == (4.5, 3.0)
    (run / "train_log.jsonl").write_text(json.dumps({"step": 5, "loss": None}) + "\n")
    assert figures(run)["losses_finite"] == 0
    with pytest.raises(ValueError, match="metrics.json"):
        figures(tmp_path / "nowhere")
