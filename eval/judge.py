"""The GenEval-style judge for testbed images: a small CNN with category, colour and count heads.

GenEval checks generated images with a COCO detector and a CLIP colour classifier; on the testbed the
renderer knows every scene's truth, so a small classifier trained on labelled renderings
(``testbed.judge_data``) replaces both, and its own accuracy is measured and stored with it:

* ``accuracy_real`` -- per head, on held-out real testbed renderings (the testbed's textures, a stream
  the judge never saw), labels balanced;
* ``accuracy_noise`` -- per head, on uniform-noise images paired with the same labels: the floor a
  judge that sees nothing reaches (``chance`` is 1/classes for balanced labels).

Images go through the text-to-image data path's transform (``t2i.embedded.image_tensor_transform``:
bicubic antialiased resize to the resolution, centre crop), so a 64 px testbed image and a 32 px
generated image reach the network alike. Saved as ``judge.safetensors`` (no pickle) + ``judge.json`` (the card).
Known limit at 32 px: a white object with dark stripes or checks and a black one with light ones differ only
in the phase of a 2-3 px pattern, so most colour errors are white <-> black.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from caption_mixing.atomic import atomic_write, atomic_write_json
from testbed.judge_data import COUNTS, Scene, render_scenes
from testbed.world import CATEGORIES, COLORS

FORMAT = "caption_mixing.judge/1"
WEIGHTS = "judge.safetensors"
CARD = "judge.json"
HEADS: dict[str, tuple[Any, ...]] = {"category": CATEGORIES, "color": tuple(COLORS), "count": COUNTS}
DEFAULT_STEPS = 1200
DEFAULT_TRAIN_IMAGES = 8_000
BATCH = 64
DEFAULT_EVAL_IMAGES = 2_000


class JudgeNet(nn.Module):
    """Space-to-depth (lossless 2x downsampling, cheap on a CPU), three conv stages, global average
    pooling (counts survive it as summed evidence), one linear layer per head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            nn.PixelUnshuffle(2),
            *block(12, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, len(classes)) for name, classes in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.features(x)
        return {name: head(z) for name, head in self.heads.items()}


def image_transform(resolution: int):
    """PIL -> uint8 tensor [3, r, r]: bicubic resize of the short side, centre crop.

    The one resize and crop of testbed images: ``t2i.embedded.image_tensor_transform`` (the generator's
    data path) builds on it, so the judge sees images as the generator was trained on them.
    """
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(resolution),
            transforms.PILToTensor(),
        ]
    )


def to_batch(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """uint8 [N, 3, r, r] of RGB images at the judge's resolution."""
    tf = image_transform(resolution)
    if not images:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    return torch.stack([tf(im.convert("RGB")) for im in images])


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(127.5).sub(1.0)


def _targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor([classes.index(getattr(s, name)) for s in scenes], dtype=torch.long)
        for name, classes in HEADS.items()
    }


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light: a shift of up to r/16 px (reflect padded), a horizontal flip, +-10% brightness and contrast."""
    n, _, r, _ = x.shape
    pad = max(1, r // 16)
    xp = F.pad(x, (pad,) * 4, mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    x = xp[:, :, dy : dy + r, dx : dx + r]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    gain = 1 + 0.1 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    bias = 0.1 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    return x * gain + bias


def _fit(net: JudgeNet, x: torch.Tensor, y: dict[str, torch.Tensor], steps: int, seed: int, progress: bool) -> None:
    """AdamW with one-cycle learning rate, batch 64, sum of the three heads' cross-entropies."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    net.train()
    bar = tqdm(range(steps), desc="judge", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        out = net(_augment(_normalize(x[idx]), g))
        loss = sum(F.cross_entropy(out[name], y[name][idx]) for name in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()


@torch.no_grad()
def _logits(net: JudgeNet, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    net.eval()
    outs = [net(_normalize(x[i : i + batch])) for i in range(0, len(x), batch)]
    return {name: torch.cat([o[name] for o in outs]) for name in HEADS}


def head_accuracy(net: JudgeNet, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    """Top-1 accuracy per head of ``net`` on uint8 images ``x`` with targets ``y``."""
    logits = _logits(net, x)
    return {name: float((logits[name].argmax(1) == y[name]).float().mean()) for name in HEADS}


def uniform_noise(n: int, resolution: int, seed: int) -> list[Image.Image]:
    """Uniform RGB noise images at ``resolution`` (the size a generator outputs), as the CLIP noise floor uses."""
    g = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (resolution, resolution, 3), generator=g, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


def _measure(net: JudgeNet, resolution: int, seed: int, n_eval: int) -> dict[str, Any]:
    """The card's accuracy block: real held-out renderings, noise with the same labels, chance."""
    held = render_scenes(n_eval, seed, split="holdout")
    y = _targets(held)
    real = head_accuracy(net, to_batch([s.image for s in held], resolution), y)
    noise = head_accuracy(net, to_batch(uniform_noise(n_eval, resolution, seed), resolution), y)
    majority = {name: float(np.bincount(y[name].numpy()).max() / len(held)) for name in HEADS}
    return {
        "accuracy_real": real,
        "accuracy_noise": noise,
        "chance": {name: 1.0 / len(classes) for name, classes in HEADS.items()},
        "majority_share": majority,
        "n_eval": n_eval,
        "eval_source": f"testbed.judge_data.render_scenes(split='holdout', seed={seed}): the default testbed's "
        "textures, a stream disjoint from the testbed's and from the judge's training scenes; noise: uniform "
        f"RGB at {resolution} px paired with the same labels",
    }


def _shard_accuracy(net: JudgeNet, resolution: int, shards: str | list[str], limit: int) -> dict[str, Any]:
    """Per-head accuracy on real testbed images read from built train shards (their own label distribution)."""
    from testbed.judge_data import read_shard_scenes

    scenes = read_shard_scenes(shards, limit=limit)
    acc = head_accuracy(net, to_batch([s.image for s in scenes], resolution), _targets(scenes))
    return {"accuracy": acc, "n": len(scenes), "shards": shards if isinstance(shards, str) else list(shards)}


def _save_weights(net: JudgeNet, path: Path) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    data = save(tensors, metadata={"format": FORMAT})
    atomic_write(path, lambda f: f.write(data))


def train_judge(
    out_dir: Path,
    resolution: int = 32,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    progress: bool = True,
    train_images: int = DEFAULT_TRAIN_IMAGES,
    eval_images: int = DEFAULT_EVAL_IMAGES,
    width: int = 32,
    real_shards: str | list[str] | None = None,
) -> Path:
    """Train a judge on fresh labelled renderings, measure it, write ``judge.safetensors`` + ``judge.json``.

    Returns the card's path. ``real_shards`` (built testbed train shards, e.g. the embedded run's held-out
    shard) adds ``accuracy_shards``: the accuracy on those real images with their stored labels.
    """
    if resolution < 8 or resolution % 4:
        raise ValueError(f"judge resolution {resolution}: must be a multiple of 4 and >= 8")
    if steps < 1 or train_images < BATCH or eval_images < 1:
        raise ValueError(f"judge: steps ({steps}) >= 1, train_images ({train_images}) >= {BATCH}, eval_images >= 1")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    scenes = render_scenes(train_images, seed, split="train")
    x, y = to_batch([s.image for s in scenes], resolution), _targets(scenes)
    del scenes
    torch.manual_seed(seed)
    net = JudgeNet(width)
    _fit(net, x, y, steps, seed, progress)
    seconds = time.perf_counter() - t0
    card: dict[str, Any] = {
        "format": FORMAT,
        "notice": "A classifier trained on synthetic testbed renderings; it judges testbed-like images only.",
        "resolution": resolution,
        "width": width,
        "heads": {name: list(classes) for name, classes in HEADS.items()},
        **_measure(net, resolution, seed, eval_images),
        "train": {
            "seed": seed,
            "steps": steps,
            "batch_size": BATCH,
            "images": train_images,
            "source": f"testbed.judge_data.render_scenes(split='train', seed={seed}): uniform category, colour, "
            "count 1-4, position and background, on the judge's own background textures",
            "augment": "shift <= r/16 px (reflect), horizontal flip, +-10% gain and offset",
            "seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads(),
        },
        "weights": WEIGHTS,
    }
    if real_shards is not None:
        card["accuracy_shards"] = _shard_accuracy(net, resolution, real_shards, eval_images)
    _save_weights(net, out_dir / WEIGHTS)
    return atomic_write_json(out_dir / CARD, card)


class Judge:
    """A trained judge: ``predict`` labels images, ``card`` is its ``judge.json`` (with its accuracy)."""

    def __init__(self, net: JudgeNet, card: dict[str, Any]) -> None:
        self.net = net.eval()
        self._card = card

    @property
    def card(self) -> dict[str, Any]:
        return self._card

    @property
    def resolution(self) -> int:
        return int(self._card["resolution"])

    def predict(self, images: list[Image.Image], batch_size: int = 256) -> list[dict[str, Any]]:
        """Top-1 per head for each image: {"category", "color", "count", "probs": {head: {class: p}}}."""
        if not images:
            return []
        logits = _logits(self.net, to_batch(list(images), self.resolution), batch_size)
        probs = {name: logits[name].softmax(1) for name in HEADS}
        out = []
        for i in range(len(images)):
            row: dict[str, Any] = {name: HEADS[name][int(probs[name][i].argmax())] for name in HEADS}
            row["probs"] = {
                name: {str(c): round(float(p), 4) for c, p in zip(HEADS[name], probs[name][i].tolist(), strict=True)}
                for name in HEADS
            }
            out.append(row)
        return out


def _card_path(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / CARD
    return path.with_name(CARD) if path.name == WEIGHTS else path


def load_judge(path: Path) -> Judge:
    """Load a judge from its folder, ``judge.json`` or ``judge.safetensors``; errors name the file at fault."""
    from safetensors.torch import load_file

    card_path = _card_path(path)
    if not card_path.is_file():
        raise FileNotFoundError(f"{card_path}: no judge card (train one with `python -m eval judge --out DIR`)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        resolution, width, heads = int(card["resolution"]), int(card["width"]), card["heads"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{card_path}: not a judge card ({type(e).__name__}: {e})") from e
    if card.get("format") != FORMAT:
        raise ValueError(f"{card_path}: format {card.get('format')!r}, expected {FORMAT!r}")
    expected = {name: list(classes) for name, classes in HEADS.items()}
    if heads != expected:
        raise ValueError(f"{card_path}: heads {heads} differ from the testbed's classes {expected}")
    weights = card_path.parent / card.get("weights", WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: judge weights missing (named by {card_path})")
    net = JudgeNet(width)
    try:
        net.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{weights}: weights do not fit a width-{width} judge ({e})") from e
    if resolution < 8:
        raise ValueError(f"{card_path}: resolution {resolution} < 8")
    return Judge(net, card)
