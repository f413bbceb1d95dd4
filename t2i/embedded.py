"""Small frozen components the suite builds itself for the embedded preset (nothing is downloaded).

* a tiny ``AutoencoderKL`` (SD layout, factor 4) trained briefly on the testbed images;
* a CLIP trained on the testbed by running ``python -m clip_train`` in a child process (its text
  tower is the text encoder, exported as a ``CLIPTextModel`` folder; the whole model is the
  default scoring CLIP). Running the CLIP application as a user would keeps the two applications
  free of imports of each other.

They go through the same loaders as real components (``load_vae``, ``load_text_encoder``), and are
cached next to the testbed by a hash of what determines them, so a sweep builds them once.
Evaluation with the same CLIP whose text tower conditions the generator is a known bias of the
embedded default; pass eval_clip_model/eval_clip_checkpoint for an independent scorer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from diffusers import AutoencoderKL
from tqdm import tqdm

from caption_mixing.atomic import atomic_write_json, build_folder_once
from caption_mixing.shards import expand_shards
from t2i.config import T2IConfig
from testbed.models import EMBEDDED_CLIP_MODEL

DONE = "components.json"
CLIP_PRESET = "embedded"  # clip_train's preset for the embedded CLIP; embedded_clip_overrides() sets the rest
# Where this job sits in a multi-process launch: not handed to the one-process child (it would wait for peers).
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


NOTICE = "Embedded components trained on the synthetic testbed; not paper models."
CLIP_FILE, TEXT_DIR, VAE_DIR = "clip.pt", "clip_text", "vae"
# Bumped when a recipe changes in a way the key's fields do not show (numbering continues the former joint cache).
CLIP_RECIPE_VERSION = 3
VAE_RECIPE_VERSION = 3  # 3: object-weighted L1, one-cycle lr


@dataclass(frozen=True)
class EmbeddedComponents:
    vae: Path  # AutoencoderKL folder
    text_encoder: Path  # folder with text_encoder/ + tokenizer/
    clip_checkpoint: Path  # open_clip checkpoint of EMBEDDED_CLIP_MODEL
    clip_model: str = EMBEDDED_CLIP_MODEL


def embedded_split(train_pattern: str) -> tuple[list[str], list[str]]:
    """Testbed shards -> (train shards, held-out shards): the last shard is held out for evaluation."""
    urls = expand_shards(train_pattern)
    if len(urls) < 2:
        raise ValueError(f"the embedded split needs >= 2 testbed shards, {train_pattern!r} has {len(urls)}")
    return urls[:-1], urls[-1:]


def image_tensor_transform(resolution: int):
    """PIL -> float tensor in [-1, 1], resized and center-cropped to ``resolution``.

    The resize and crop are the GenEval judge's (``eval.judge.image_transform``), so the judge sees
    testbed images exactly as the generator was trained on them.
    """
    import torch
    from torchvision import transforms

    from eval.judge import image_transform

    return transforms.Compose(
        [image_transform(resolution), transforms.ConvertImageDtype(torch.float32), transforms.Normalize([0.5], [0.5])]
    )


def _key(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def clip_key(cfg: T2IConfig, fingerprint: str) -> str:
    """What determines the embedded CLIP (and the text encoder exported from it)."""
    doc = {"testbed": fingerprint, "clip_samples": cfg.embedded_clip_samples, "clip_p": cfg.embedded_clip_p}
    return _key({**doc, "seed": cfg.seed, "version": CLIP_RECIPE_VERSION})


def vae_key(cfg: T2IConfig, fingerprint: str) -> str:
    """What determines the embedded VAE; its own cache entry, so a VAE change does not retrain the CLIP."""
    doc = {"testbed": fingerprint, "resolution": cfg.resolution, "latent_channels": cfg.latent_channels}
    doc.update(latent_size=cfg.latent_size, vae_steps=cfg.embedded_vae_steps, seed=cfg.seed)
    return _key({**doc, "version": VAE_RECIPE_VERSION})


TINY_VAE_WIDTHS = (32, 64, 64)  # channels per block; block i > 0 halves the resolution


def tiny_vae(latent_channels: int = 4, factor: int = 4) -> AutoencoderKL:
    """SD-VAE layout at toy width, downsampling by ``factor`` (1, 2 or 4), no mid-block attention.

    The factor follows the preset (resolution / latent_size). At 32 px a factor-4 VAE trained for the
    CPU budget loses the objects (600 steps: recon L1 0.13, sprites gone), factor 2 keeps shapes but not
    colours (L1 0.07); factor 1 is a learned colour transform that keeps both, the DiT's patches do the
    spatial compression instead.
    """
    blocks = {1: 1, 2: 2, 4: 3}.get(factor)
    if blocks is None:
        raise ValueError(f"embedded VAE factor (resolution / latent_size) must be 1, 2 or 4, got {factor}")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=TINY_VAE_WIDTHS[:blocks],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        mid_block_add_attention=False,
    )


def _image_batches(shards: list[str], resolution: int, batch: int, seed: int):
    from caption_mixing.pipeline import decode_image

    tf = image_tensor_transform(resolution)
    pipe = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.tarfile_to_samples(),
        wds.shuffle(500, rng=__import__("random").Random(seed)),
        decode_image,
        wds.map(lambda s: tf(s["image"])),
        wds.batched(batch, collation_fn=torch.stack, partial=False),
    )
    while True:
        yield from pipe


def object_weighted_l1(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 with pixels weighted by how far they stand from their image's mean colour.

    Testbed objects cover a small share of the pixels; plain L1 is spent on the background textures
    and the VAE washes the objects' colours out (red turns brown, green grey). Weighting the pixels that
    stand out keeps them: 300 steps at 32 px gave recon L1 0.053 with the colours visible, against 0.058
    and greyed objects unweighted.
    """
    dev = (x - x.mean(dim=(2, 3), keepdim=True)).abs().mean(dim=1, keepdim=True)
    weight = 1 + 8 * dev
    return ((rec - x).abs() * weight).mean() / weight.mean()


def train_tiny_vae(out: Path, shards: list[str], cfg: T2IConfig, batch: int = 32) -> Path:
    """Train the tiny VAE (object-weighted L1 + small KL, one-cycle lr), set ``scaling_factor`` to 1/std of
    its latents, save it."""
    torch.manual_seed(cfg.seed)
    vae = tiny_vae(cfg.latent_channels, cfg.resolution // cfg.latent_size)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    steps = cfg.embedded_vae_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    data = _image_batches(shards, cfg.resolution, batch, cfg.seed)
    bar = tqdm(range(steps), desc="embedded VAE", unit="step", dynamic_ncols=True)
    for _ in bar:
        x = next(data)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = object_weighted_l1(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(next(data)).latent_dist.sample() for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    vae.save_pretrained(out)
    return out


def embedded_clip_overrides(cfg: T2IConfig, shards: list[str]) -> dict[str, object]:
    """``--set`` values of the embedded CLIP run (on top of clip_train's ``embedded`` preset)."""
    return {
        "p": cfg.embedded_clip_p,
        "samples_seen": cfg.embedded_clip_samples,
        "batch_size": 64,
        "seed": cfg.seed,
        "train_shards": "::".join(shards),
    }


class ClipTrainError(RuntimeError):
    """``python -m clip_train`` failed or left no checkpoint; the message has the command and exit code."""


def clip_train_command(out: Path, testbed_dir: Path, overrides: dict[str, object]) -> list[str]:
    """argv of the child: this interpreter, ``-m clip_train``, every value a JSON (thus YAML) scalar."""
    argv = [sys.executable, "-m", "clip_train", "--preset", CLIP_PRESET, "--out", str(out)]
    argv += ["--testbed-dir", str(testbed_dir)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv


def run_clip_train(argv: list[str]) -> None:
    """Run ``argv`` as one process (no shell), its output streaming to ours; a failure names its exit code.

    The child imports the ``clip_train`` that sits beside this ``t2i`` (a source checkout or an
    install), and gets none of this job's launcher variables, so it never joins this job's process group.
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    shown = " ".join(argv[1:])
    print(f"t2i embedded components: running {shown}", flush=True)
    sys.stderr.flush()
    code = subprocess.run(argv, env=env, check=False).returncode
    if code != 0:
        raise ClipTrainError(f"embedded CLIP training `python {shown}` exited with code {code} (its output is above)")


def train_embedded_clip(out: Path, cfg: T2IConfig, testbed, shards: list[str]) -> Path:
    """Train the embedded CLIP into ``out`` with ``python -m clip_train``; return its final checkpoint."""
    run_clip_train(clip_train_command(out, Path(testbed.root), embedded_clip_overrides(cfg, shards)))
    runs = sorted(Path(out).glob("*/metrics.json"))
    if len(runs) != 1:
        raise ClipTrainError(f"embedded CLIP training: expected one run folder with metrics.json in {out}: {runs}")
    ckpt = runs[0].parent / json.loads(runs[0].read_text())["checkpoint"]
    if not ckpt.is_file():
        raise ClipTrainError(f"embedded CLIP training: {runs[0]} names checkpoint {ckpt}, which does not exist")
    return ckpt


def _build_clip(tmp: Path, cfg: T2IConfig, testbed) -> None:
    """Train the embedded CLIP into ``tmp`` (checkpoint + exported text tower), then mark it done."""
    from t2i.components import export_open_clip_text

    train_shards, _ = embedded_split(testbed.train_shards)
    t0 = time.perf_counter()
    ckpt = train_embedded_clip(tmp / "clip_run", cfg, testbed, train_shards)
    shutil.copyfile(ckpt, tmp / CLIP_FILE)
    export_open_clip_text(tmp / CLIP_FILE, EMBEDDED_CLIP_MODEL, tmp / TEXT_DIR)
    card = {"clip_model": EMBEDDED_CLIP_MODEL, "clip_p": cfg.embedded_clip_p, "clip_samples": cfg.embedded_clip_samples}
    atomic_write_json(tmp / DONE, {"notice": NOTICE, **card, "seconds": round(time.perf_counter() - t0, 1)})


def _build_vae(tmp: Path, cfg: T2IConfig, testbed) -> None:
    """Train the tiny VAE into ``tmp``, then mark it done."""
    train_shards, _ = embedded_split(testbed.train_shards)
    t0 = time.perf_counter()
    train_tiny_vae(tmp / VAE_DIR, train_shards, cfg)
    card = {"vae_steps": cfg.embedded_vae_steps, "vae_factor": cfg.resolution // cfg.latent_size}
    card["recipe_version"] = VAE_RECIPE_VERSION
    atomic_write_json(tmp / DONE, {"notice": NOTICE, **card, "seconds": round(time.perf_counter() - t0, 1)})


def _ensure(root: Path, what: str, build) -> Path:
    if (root / DONE).exists():
        print(f"t2i embedded {what}: reusing {root}", flush=True)
    else:
        print(f"t2i embedded {what}: building {root}", flush=True)
        build_folder_once(root, DONE, build)
    return root


def ensure_embedded_components(cfg: T2IConfig, testbed) -> EmbeddedComponents:
    """Build (or reuse) the embedded CLIP and VAE for this testbed and config, each in its own cache folder
    (keyed by what determines it: ``clip_key``, ``vae_key``) beside the testbed."""
    cache, fp = Path(testbed.root).parent, testbed.fingerprint
    clip = _ensure(cache / f"t2i-clip-{fp}-{clip_key(cfg, fp)}", "CLIP", lambda tmp: _build_clip(tmp, cfg, testbed))
    vae = _ensure(cache / f"t2i-vae-{fp}-{vae_key(cfg, fp)}", "VAE", lambda tmp: _build_vae(tmp, cfg, testbed))
    return EmbeddedComponents(vae / VAE_DIR, clip / TEXT_DIR, clip / CLIP_FILE)
