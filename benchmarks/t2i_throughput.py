"""DiT training throughput: t2i.train.train vs the plain diffusers training loop, same model, batch, precision.

Both read the same precomputed latent shards, encode the same captions with the same frozen text
encoder and train the same ``PixArtTransformer2DModel`` (``t2i.model.build_transformer``) with
AdamW, warm-up, grad clipping and EMA. "ours" is the real trainer (``t2i.train.train``, including
its loader, caption mixing, caption dropout and logging); "diffusers" follows
examples/text_to_image/train_text_to_image.py: tokenize in the dataset, encode text, noise,
``DDPMScheduler.add_noise``, forward, MSE, backward, clip, optimizer/lr step, ``EMAModel.step``.
Each runs in its own process, alternately, ``--repeats`` times; a run's rate is the median of its
per-window images/s after ``--skip-steps``; the best run of each side is compared.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward and one backward of
the DiT (meta device, math attention; ``benchmarks/mfu.py``): model FLOPs, so gradient checkpointing's
recomputation is not counted. MFU = achieved / peak, the peak from ``--peak-tflops`` or the GPU's name
(H100 SXM/H200 989, A100 312 dense bf16 TFLOP/s); DiT FLOPs only, the frozen text encoder is not counted.

    python benchmarks/t2i_throughput.py                                  # CPU: DiT-S/2 at 256 px, batch 2
    python benchmarks/t2i_throughput.py --preset dit-xl-2 --batch-size 32 --precision bf16 --device cuda \\
        --workers 8 --threads 0 --steps 60 --skip-steps 20 --log-every 5 --text-width 768 --text-layers 12 \\
        --text-heads 12 --peak-tflops 989                                 # H100 SXM dense bf16

Last line: ``ratio_vs_diffusers_loop=X`` (ours / diffusers; X >= 1 means ours is not slower).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = (
    "a photo of red green blue small large bird fish lotus iguana wooden table on the beach under a "
    "bright sky with two three people near old stone house river mountain road car dog cat"
).split()


def caption(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_inputs(args: argparse.Namespace, work: Path) -> dict:
    """Random text encoder (unless --text-encoder), tiny VAE (for its scaling factor), latent shards + sidecars."""
    import numpy as np
    import torch
    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    from caption_mixing.sidecar import sidecar_path, write_sidecar
    from t2i.components import write_clip_tokenizer
    from t2i.config import load_config
    from t2i.data import LATENT_MEMBER
    from t2i.embedded import tiny_vae

    transformers.utils.logging.disable_progress_bar()
    cfg = load_config(args.preset)
    text = args.text_encoder
    if text is None:
        text = str(work / "text")
        torch.manual_seed(0)
        tcfg = CLIPTextConfig(
            hidden_size=args.text_width,
            intermediate_size=4 * args.text_width,
            num_hidden_layers=args.text_layers,
            num_attention_heads=args.text_heads,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
        CLIPTextModel(tcfg).save_pretrained(Path(text) / "text_encoder")
        write_clip_tokenizer(Path(text) / "tokenizer", 77)
    vae = tiny_vae(cfg.latent_channels)
    vae.register_to_config(scaling_factor=0.18215)
    vae.save_pretrained(work / "vae")

    per_shard = max(64, (args.batch_size * (args.steps + 2) + 1) // 2)
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    shape = (2 * cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    shard_dir = work / "latents"
    shard_dir.mkdir()
    for s in range(2):
        shard = shard_dir / f"{s:05d}.tar"
        synthetic = {}
        with tarfile.open(shard, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                moments = np.full(shape, -6.0)  # second half: log-variance
                moments[: shape[0] // 2] = np_rng.standard_normal((shape[0] // 2, *shape[1:]))
                buf = io.BytesIO()
                np.save(buf, moments.astype(np.float16), allow_pickle=False)
                _add(tar, f"{key}.{LATENT_MEMBER}", buf.getvalue())
                _add(tar, f"{key}.txt", caption(rng, 80).encode())  # alt-text as long as the synthetic one
                _add(tar, f"{key}.json", b"{}")
                synthetic[key] = caption(rng, 80)
        write_sidecar(sidecar_path(shard, "altogether"), shard, "altogether", synthetic)
    return {
        "text": text,
        "vae": str(work / "vae"),
        "latents": str(shard_dir / "{00000..00001}.tar"),
        "sidecar_dir": str(shard_dir),
        "samples": 2 * per_shard,
    }


def config_for(args: argparse.Namespace, inputs: dict):
    from t2i.config import load_config

    return load_config(
        args.preset,
        {
            "batch_size": args.batch_size,
            "max_steps": args.steps,
            "precision": args.precision,
            "workers": args.workers,
            "log_every": args.log_every,
            "checkpoint_every": 10**9,  # one checkpoint at the end, after the last measured window
            "device": args.device,
            "shuffle_buffer": args.shuffle_buffer,
            "gradient_checkpointing": args.gradient_checkpointing,
            "train_latents": inputs["latents"],
            "train_shards": None,
            "holdout_shards": None,
            "sidecar_dir": inputs["sidecar_dir"],
            "dataset_size": inputs["samples"],
            "vae": inputs["vae"],
            "text_encoder": inputs["text"],
            "max_sequence_length": args.max_sequence_length,
            "lr": 1e-4,
            "warmup_steps": 10,
            "p": args.p,
        },
    )


def windows_after(records: list[dict], args: argparse.Namespace) -> list[float]:
    first = args.skip_steps + args.log_every  # the first window that starts after the skipped steps
    return [r["images_per_s"] for r in records if r["step"] >= first]


def role_ours(args: argparse.Namespace, inputs: dict, run_dir: Path) -> list[float]:
    from t2i.train import DataSpec, train

    cfg = config_for(args, inputs)
    data = DataSpec(inputs["latents"], True, inputs["sidecar_dir"], inputs["samples"])
    train(cfg, run_dir, data, inputs["vae"], inputs["text"])
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return windows_after(records, args)


def role_diffusers(args: argparse.Namespace, inputs: dict) -> list[float]:
    """The diffusers example loop (train_text_to_image.py) on precomputed latents and a PixArt transformer."""
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    import webdataset as wds
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from caption_mixing.shards import expand_shards
    from t2i.model import build_transformer, schedule_kwargs

    cfg = config_for(args, inputs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no", cpu=device == "cpu")
    weight_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    torch.manual_seed(cfg.seed)

    arch = json.loads((Path(inputs["text"]) / "text_encoder" / "config.json").read_text())["architectures"][0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(inputs["text"]) / "tokenizer")
    text_encoder = getattr(transformers, arch).from_pretrained(Path(inputs["text"]) / "text_encoder")
    vae = AutoencoderKL.from_pretrained(inputs["vae"])
    text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    vae.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    noise_scheduler = DDPMScheduler(**schedule_kwargs(cfg))

    model = build_transformer(cfg, text_encoder.config.hidden_size)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    ema.to(accelerator.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps)

    def preprocess(sample: dict) -> dict:
        tok = tokenizer(
            sample["txt"].decode(),
            max_length=cfg.max_sequence_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        moments = torch.from_numpy(np.load(io.BytesIO(sample["latent.npy"])).astype(np.float32))
        return {"moments": moments, "input_ids": tok.input_ids[0], "attention_mask": tok.attention_mask[0]}

    def collate(samples: list[dict]) -> dict:
        keys = ("moments", "input_ids", "attention_mask")  # webdataset's map adds __key__
        return {k: torch.stack([s[k] for s in samples]) for k in keys}

    dataset = wds.DataPipeline(
        wds.SimpleShardList(expand_shards(inputs["latents"])),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.shuffle(cfg.shuffle_buffer),
        wds.map(preprocess),
        wds.batched(cfg.batch_size, collation_fn=collate, partial=False),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.workers)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    global_step, windows = 0, []
    t_last, n_last = time.perf_counter(), 0
    while global_step < cfg.max_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                mean, logvar = batch["moments"].to(accelerator.device).chunk(2, dim=1)
                latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                mask = batch["attention_mask"].to(accelerator.device)
                encoder_hidden_states = text_encoder(
                    batch["input_ids"].to(accelerator.device), attention_mask=mask, return_dict=False
                )[0]
                model_pred = model(
                    noisy_latents, encoder_hidden_states=encoder_hidden_states, timestep=timesteps,
                    encoder_attention_mask=mask, return_dict=False,
                )[0]  # fmt: skip
                if noise_scheduler.config.prediction_type == "v_prediction":  # as diffusers' train_text_to_image
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                train_loss = accelerator.gather(loss.repeat(bsz)).mean().item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(model.parameters())
                global_step += 1
                n_last += bsz
                if global_step % cfg.log_every == 0:
                    now = time.perf_counter()
                    windows.append({"step": global_step, "images_per_s": n_last / (now - t_last), "loss": train_loss})
                    t_last, n_last = now, 0
            if global_step >= cfg.max_steps:
                break
    return windows_after(windows, args)


def count_flops(args: argparse.Namespace, text_width: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of the DiT per image (FlopCounterMode, meta device, math attention)."""
    import torch

    from benchmarks.mfu import train_flops
    from t2i.config import load_config
    from t2i.model import build_transformer

    cfg = load_config(args.preset)
    with torch.device("meta"):
        model = build_transformer(cfg, text_width)
        x = torch.randn(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        hidden = torch.randn(1, args.max_sequence_length, text_width)
        mask = torch.ones(1, args.max_sequence_length)
        t = torch.zeros(1, dtype=torch.long)

    def forward_loss() -> torch.Tensor:
        return model(x, encoder_hidden_states=hidden, timestep=t, encoder_attention_mask=mask).sample.float().sum()

    return train_flops(forward_loss, backward=False), train_flops(forward_loss)


def run_role(role: str, args: argparse.Namespace, argv: list[str], inputs: dict, work: Path, rep: int) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    payload = json.dumps({"inputs": inputs, "run_dir": str(work / f"{role}-{rep}")})
    cmd = [sys.executable, __file__, *argv, "--role", role, "--payload", payload]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{role} run failed:\n{res.stderr[-3000:]}")
    windows = json.loads(res.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    if not windows:
        raise RuntimeError(f"{role}: no log window after {args.skip_steps} steps; increase --steps")
    return statistics.median(windows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dit-s-2", help="t2i preset giving the DiT shape and latent size")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (one process each)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for both")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both (0: leave as is)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-steps", type=int, default=2, help="start-up steps left out of the rate")
    parser.add_argument("--log-every", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=100)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--p", type=float, default=1.0, help="ours: synthetic-caption ratio (both read 80 words)")
    parser.add_argument("--text-encoder", default=None, help="HF folder (text_encoder/ + tokenizer/); default random")
    parser.add_argument("--text-width", type=int, default=256, help="random CLIP text encoder: width")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--text-heads", type=int, default=4)
    parser.add_argument("--max-sequence-length", type=int, default=77)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak (dense) for MFU, e.g. 989")
    parser.add_argument("--role", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.role:  # a child process: train, then print the per-window rates
        payload = json.loads(args.payload)
        if args.role == "ours":
            windows = role_ours(args, payload["inputs"], Path(payload["run_dir"]))
        else:
            windows = role_diffusers(args, payload["inputs"])
        print("RESULT " + json.dumps(windows))
        return 0

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from t2i.config import load_config

    cfg = load_config(args.preset)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="t2i_bench_") as tmp:
        work = Path(tmp)
        inputs = make_inputs(args, work)
        width = json.loads((Path(inputs["text"]) / "text_encoder" / "config.json").read_text())["hidden_size"]
        fwd, step_flops = count_flops(args, width)
        print(
            f"preset={args.preset} ({cfg.num_layers} layers, width {cfg.hidden_size}, {cfg.resolution} px, latents "
            f"{cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size}) batch={args.batch_size} "
            f"precision={args.precision} device={device} workers={args.workers} "
            f"threads={args.threads or 'default'} steps={args.steps} (first {args.skip_steps} left out) "
            f"text encoder width {width}, {args.max_sequence_length} tokens"
        )
        print(
            f"DiT forward: {fwd / 1e9:.2f} GFLOPs/image, forward + backward {step_flops / 1e9:.2f} "
            f"({step_flops / fwd:.2f}x; FlopCounterMode)"
        )
        rates: dict[str, list[float]] = {"ours": [], "diffusers": []}
        for rep in range(args.repeats):
            order = ("ours", "diffusers") if rep % 2 == 0 else ("diffusers", "ours")
            for role in order:
                rates[role].append(run_role(role, args, argv, inputs, work, rep))
                print(f"run {rep}: {role} {rates[role][-1]:.3f} images/s", flush=True)
    print_figures(args, device, step_flops, rates)
    print(f"ratio_vs_diffusers_loop={max(rates['ours']) / max(rates['diffusers']):.3f}")
    return 0


def print_figures(args: argparse.Namespace, device: str, step_flops: float, rates: dict[str, list[float]]) -> None:
    """One name=value line per figure: images/s, step time, achieved TFLOP/s and MFU per loop."""
    from benchmarks.mfu import gpu_name, mfu_pct, peak_tflops

    name = gpu_name() if device.startswith("cuda") else None
    peak = peak_tflops(name, args.peak_tflops) if (name or args.peak_tflops) else None
    print(f"device_name={name or device}")
    print(f"train_gflops_per_image={step_flops / 1e9:.2f}")
    print(f"peak_tflops={peak if peak else 'n/a'}")
    names = {"ours": "t2i_train", "diffusers": "diffusers_loop"}
    for role in ("ours", "diffusers"):
        ips = max(rates[role])
        mfu = mfu_pct(ips, step_flops, peak)
        print(f"{names[role]}_images_per_s={ips:.3f}")
        print(f"{names[role]}_step_ms={1000 * args.batch_size / ips:.0f}")
        print(f"{names[role]}_achieved_tflops={ips * step_flops / 1e12:.4f}")
        print(f"{names[role]}_mfu_pct={f'{mfu:.1f}' if mfu is not None else 'n/a'}")


if __name__ == "__main__":
    sys.exit(main())
