"""Our runner against clip_benchmark's own CLI on the same checkpoint and the same local wds folders.

The CLI (``clip_benchmark.cli.main`` with its usual arguments) runs through eval.cb_launcher, which swaps
only its numpy>=2.4-broken ``accuracy`` for the suite's own ``eval.metrics.topk_accuracy``; it runs in
this process so the test does not pay a second interpreter start-up. Top-1, top-5, mean per-class recall
and retrieval recall@k must agree within 0.1 points.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eval import cb_launcher
from eval.__main__ import main
from eval.metrics import topk_accuracy
from tests.test_eval import make_classification, make_retrieval
from tests.test_eval_support import TINY_MODEL, write_tiny_model

TOL = 0.001  # 0.1 points, as fractions


def _clip_benchmark(cfg: Path, ckpt: Path, folder: Path, task: str, out: Path) -> dict:
    """clip_benchmark's CLI on one local wds folder; its metrics as it writes them."""
    cb_launcher.main(["--model-config-dir", str(cfg), "eval", "--dataset", f"wds/{folder.name}",
                      "--dataset_root", str(folder), "--task", task, "--model", TINY_MODEL, "--pretrained", str(ckpt),
                      "--output", str(out), "--no_amp", "--num_workers", "0", "--batch_size", "7",
                      "--recall_k", "1", "5", "10", "--quiet"])  # fmt: skip
    return json.loads(out.read_text())["metrics"]


def test_one_topk_accuracy_matches_definition_and_is_patched_into_clip_benchmark():
    from clip_benchmark.metrics import zeroshot_classification

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    target = torch.tensor([1, 2, 2, 1])
    assert topk_accuracy(logits, target, topk=(1, 2)) == [0.5, 0.75]
    assert topk_accuracy(logits, target, topk=(5,)) == [1.0]  # k clamped to the 3 classes
    cb_launcher.patch_clip_benchmark()
    assert zeroshot_classification.accuracy is topk_accuracy


@pytest.mark.filterwarnings(r"ignore:WebDataset\(shardshuffle")  # clip_benchmark's own loader, unchanged
def test_matches_clip_benchmark_cli(tmp_path):
    cfg, ckpt = write_tiny_model(tmp_path)
    root = tmp_path / "data"
    make_classification(root / "wds_cifar10")
    make_retrieval(root / "wds_flickr30k")
    out = tmp_path / "ours"
    code = main(["zeroshot", "--checkpoint", str(ckpt), "--model", TINY_MODEL, "--model-config-dir", str(cfg),
                 "--tasks", "cifar10,flickr30k", "--dataset-root", str(root), "--out", str(out), "--num-workers", "0",
                 "--batch-size", "5", "--prompts", "clip_benchmark"])  # fmt: skip
    assert code == 0
    ours_cls = json.loads((out / "tasks" / "cifar10.json").read_text())
    ours_ret = json.loads((out / "tasks" / "flickr30k.json").read_text())

    cb_cls = _clip_benchmark(cfg, ckpt, root / "wds_cifar10", "zeroshot_classification", tmp_path / "cb_cls.json")
    cb_ret = _clip_benchmark(cfg, ckpt, root / "wds_flickr30k", "zeroshot_retrieval", tmp_path / "cb_ret.json")

    assert 0.0 < ours_cls["acc1"] < 1.0, "a degenerate fixture would make the comparison vacuous"
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours_cls[key] == pytest.approx(cb_cls[key], abs=TOL), key
    for d in ("image_retrieval", "text_retrieval"):
        for k in (1, 5, 10):
            key = f"{d}_recall@{k}"
            assert ours_ret[key] == pytest.approx(cb_ret[key], abs=TOL), key
