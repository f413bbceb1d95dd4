"""Our runner against clip_benchmark's own CLI on the same checkpoint and the same local wds folders.

The CLI runs in a subprocess through eval.cb_launcher (its numpy>=2.4-broken ``accuracy`` swapped for a
numpy-safe copy, nothing else changed); top-1, mean per-class recall and retrieval recall@k must agree
within 0.1 points.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.__main__ import main
from eval.cb_launcher import numpy_safe_accuracy
from tests.test_eval import make_classification, make_retrieval
from tests.test_eval_support import TINY_MODEL, write_tiny_model

REPO = Path(__file__).resolve().parents[1]
TOL = 0.001  # 0.1 points, as fractions


def _clip_benchmark(cfg: Path, ckpt: Path, folder: Path, task: str, out: Path) -> tuple[subprocess.Popen, Path]:
    """Start the CLI (both runs go in parallel: its start-up dominates on a small machine)."""
    cmd = [sys.executable, "-m", "eval.cb_launcher", "--model-config-dir", str(cfg), "eval",
           "--dataset", f"wds/{folder.name}", "--dataset_root", str(folder), "--task", task, "--model", TINY_MODEL,
           "--pretrained", str(ckpt), "--output", str(out), "--no_amp", "--num_workers", "0", "--batch_size", "7",
           "--recall_k", "1", "5", "10", "--quiet"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out


def _result(run: tuple[subprocess.Popen, Path]) -> dict:
    proc, out = run
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.read_text())["metrics"]


def test_numpy_safe_accuracy_matches_definition():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    target = torch.tensor([1, 2, 2, 1])
    assert numpy_safe_accuracy(logits, target, topk=(1, 2)) == [0.5, 0.75]


def test_matches_clip_benchmark_cli(tmp_path):
    cfg, ckpt = write_tiny_model(tmp_path)
    root = tmp_path / "data"
    make_classification(root / "wds_cifar10")
    make_retrieval(root / "wds_flickr30k")
    runs = [
        _clip_benchmark(cfg, ckpt, root / "wds_cifar10", "zeroshot_classification", tmp_path / "cb_cls.json"),
        _clip_benchmark(cfg, ckpt, root / "wds_flickr30k", "zeroshot_retrieval", tmp_path / "cb_ret.json"),
    ]
    out = tmp_path / "ours"
    code = main(["zeroshot", "--checkpoint", str(ckpt), "--model", TINY_MODEL, "--model-config-dir", str(cfg),
                 "--tasks", "cifar10,flickr30k", "--dataset-root", str(root), "--out", str(out), "--num-workers", "0",
                 "--batch-size", "5"])  # fmt: skip
    assert code == 0
    ours_cls = json.loads((out / "tasks" / "cifar10.json").read_text())
    ours_ret = json.loads((out / "tasks" / "flickr30k.json").read_text())

    cb_cls, cb_ret = _result(runs[0]), _result(runs[1])

    assert 0.0 < ours_cls["acc1"] < 1.0, "a degenerate fixture would make the comparison vacuous"
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours_cls[key] == pytest.approx(cb_cls[key], abs=TOL), key
    for d in ("image_retrieval", "text_retrieval"):
        for k in (1, 5, 10):
            key = f"{d}_recall@{k}"
            assert ours_ret[key] == pytest.approx(cb_ret[key], abs=TOL), key
