"""Memory plan per GPU for the paper-scale presets, from models that never allocate a weight.

For ViT-B/32 at 512 per GPU, ViT-H/14 and DiT-XL/2 at their presets' per-GPU batch (global batch /
the preset's job GPUs), it prints what one GPU holds during a training step and whether that fits
an 80 GB and a 141 GB GPU, with gradient checkpointing off and on.

How each figure is obtained:

- Parameters: the model is built on the meta device (``clip_train.model.create_model_meta``,
  ``t2i.model.build_transformer`` under ``torch.device("meta")``) and its parameters counted.
- Static memory, from the trainers' precision handling: both keep fp32 parameters and run the
  forward under autocast (clip_train ``amp_bf16``/``amp``, t2i ``bf16`` through accelerate), so
  there is no separate master copy: weights 4 B/param, gradients 4 B/param, AdamW ``exp_avg`` and
  ``exp_avg_sq`` 8 B/param, DDP's gradient buckets 4 B/param when world > 1 (both trainers wrap in
  DDP with ``gradient_as_bucket_view=False``, the default); t2i adds its fp32 EMA copy (4 B/param)
  and the frozen VAE and text encoder, kept in fp32 on the GPU by ``t2i.components``.
- Activations are measured, not modelled: the meta model is materialised as fake CPU tensors
  (``FakeTensorMode`` + ``to_empty``: shapes and dtypes, no storage), one forward and the loss run at
  the real per-GPU batch under the preset's autocast, and ``saved_tensors_hooks`` collect every tensor
  autograd keeps for backward. Bytes are summed once per storage (views share one), parameters and
  buffers left out. Fake CPU tensors dispatch like CPU ones, so autocast applies and attention takes
  the flash-style path that keeps q, k, v, the output and the log-sum-exp (what CUDA's flash and
  memory-efficient kernels keep), not the N x N matrix. The CLIP loss is open_clip's ``ClipLoss``
  with ``local_loss`` and ``gather_with_grad``: local rows against the features of all ranks (the
  other ranks' features stand in as tensors of their shape).
- With gradient checkpointing the same run tells which saved tensors belong to a checkpointed block
  (open_clip resblocks, PixArt transformer blocks): held = tensors saved outside blocks + every
  block's inputs and CPU RNG state (what ``torch.utils.checkpoint`` keeps to recompute), plus the larger of
  the largest single block's saved tensors (alive while that block is recomputed in backward) and, under
  autocast, its cache of low-precision copies of the blocks' weights (alive until the forward's autocast
  region exits).

The per-step total sums the parts, which is about the peak during backward (gradients fill while
activations are freed; activation gradients and transient workspaces are not counted). A GPU is said
to fit when the total is at most 90% of its memory as nvidia-smi reports it (81559 MiB for an 80 GB
H100, 143771 MiB for a 141 GB H200): the rest covers the CUDA context, NCCL and cuBLAS workspaces and
allocator fragmentation.
``--measure-cuda`` runs two real training steps on a GPU (one process, no DDP) and prints the peak
``torch.cuda.max_memory_allocated`` beside the plan for the same one-process setting.

    python benchmarks/memory_plan.py                 # all three presets (CPU, about a minute)
    python benchmarks/memory_plan.py --measure-cuda  # on a GPU: also the measured peak per preset
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1024**3
MIB = 1024**2
GPUS: tuple[tuple[str, int], ...] = (("80GB", 81559 * MIB), ("141GB", 143771 * MIB))  # nvidia-smi totals
FIT_SHARE = 0.90
AUTOCAST = {"fp32": None, "amp_bf16": torch.bfloat16, "bf16": torch.bfloat16, "amp": torch.float16}
PLACEHOLDER_SHARDS = "/plan/{00000..00099}.tar"  # the CLIP presets leave train_shards to the user


# ---------------------------------------------------------------------------------------------
# Activations: saved tensors of one fake forward
# ---------------------------------------------------------------------------------------------


@dataclass
class ActivationProfile:
    """Bytes autograd holds for backward at the end of one forward (and loss), with and without checkpointing."""

    batch: int
    saved: int  # no checkpointing: every saved tensor
    held_ckpt: int  # checkpointing: saved outside blocks + block inputs
    block_peak: int  # checkpointing: one block's saved tensors, recomputed in backward
    num_blocks: int
    cast_cache: int = 0  # checkpointing under autocast: low-precision copies of the blocks' weights

    @property
    def ckpt(self) -> int:
        """Held tensors plus the larger of: autocast's cache of cast block weights (alive until the
        forward's autocast region exits, just before backward) and one block's recomputation."""
        return self.held_ckpt + max(self.block_peak, self.cast_cache)

    def total(self, ckpt: bool) -> int:
        return self.ckpt if ckpt else self.saved


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it); works for real, meta and fake tensors."""
    return t.untyped_storage()._cdata


def _tensors(values: Iterable) -> Iterable[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, list | tuple):
            yield from _tensors(v)
        elif isinstance(v, dict):
            yield from _tensors(v.values())


def fake_on_cpu(model: torch.nn.Module) -> tuple[torch.nn.Module, contextlib.AbstractContextManager]:
    """Materialise a meta model as fake CPU tensors (no storage); return it and the fake mode to run it in."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model.to_empty(device="cpu")
    return model, mode


def profile_activations(
    model: torch.nn.Module,
    blocks: list[torch.nn.Module],
    forward_loss: Callable[[], torch.Tensor],
    batch: int,
    autocast: torch.dtype | None,
) -> ActivationProfile:
    """Run ``forward_loss`` (which builds its inputs) once and sum the storages autograd saves.

    Each saved tensor is attributed to the checkpointable block running when it was saved (forward
    pre/post hooks keep a stack); the block inputs are recorded by a pre-hook. Works on real tensors
    too (the tests compare a real CPU model with its fake copy).
    """
    static = {_key(t) for t in [*model.parameters(), *model.buffers()]}
    sizes: dict[int, int] = {}
    outside: set[int] = set()
    inside: list[set[int]] = [set() for _ in blocks]
    inputs: set[int] = set()
    running: list[int] = []
    keep: list[torch.Tensor] = []  # keeps storages alive so their keys are not reused during the run

    def note(t: torch.Tensor) -> int | None:
        k = _key(t)
        if k in static:
            return None
        sizes[k] = t.untyped_storage().nbytes()
        keep.append(t)
        return k

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = note(t)
        if k is not None:
            (inside[running[-1]] if running else outside).add(k)
        return t

    def pre(i: int) -> Callable:
        def hook(_module, args, kwargs) -> None:
            running.append(i)
            inputs.update(k for k in map(note, _tensors([args, kwargs])) if k is not None)

        return hook

    def post(*_) -> None:  # returns None: a forward hook's return value would replace the output
        running.pop()

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post) for b in blocks]
    cast = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
            forward_loss()
    finally:
        for h in handles:
            h.remove()
    saved = outside.union(*inside)
    held = outside | inputs
    peak = max((sum(sizes[k] for k in s - held) for s in inside), default=0)
    rng_state = torch.get_rng_state().nbytes  # torch.utils.checkpoint keeps one per block (preserve_rng_state)
    return ActivationProfile(
        batch=batch,
        saved=sum(sizes[k] for k in saved),
        held_ckpt=sum(sizes[k] for k in held) + rng_state * len(blocks),
        block_peak=peak,
        num_blocks=len(blocks),
        cast_cache=cast_weight_bytes(blocks, autocast),
    )


def cast_weight_bytes(blocks: list[torch.nn.Module], autocast: torch.dtype | None) -> int:
    """Bytes of the low-precision weight copies autocast caches for the blocks' matmuls and convolutions
    (Linear/Conv weights and biases, MultiheadAttention's packed input projection); 0 without autocast."""
    if autocast is None:
        return 0
    n = 0
    for block in blocks:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d):
                n += sum(p.numel() for p in m.parameters(recurse=False))
            elif isinstance(m, torch.nn.MultiheadAttention):
                n += sum(p.numel() for p in (m.in_proj_weight, m.in_proj_bias) if p is not None)
    return n * torch.empty(0, dtype=autocast).element_size()


# ---------------------------------------------------------------------------------------------
# The plan: static parts + activations
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one GPU holds in a training step of one preset."""

    task: str  # clip | t2i
    name: str  # the preset
    per_gpu_batch: int
    world: int
    precision: str
    preset_ckpt: bool  # the preset's own gradient-checkpointing setting
    params: int  # trainable
    act: ActivationProfile
    ema: bool = False
    frozen_params: int = 0  # fp32 frozen components on the GPU (t2i VAE + text encoder)
    text_width: int = 0  # t2i: the width of the text states the DiT is conditioned on
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Prefix of its name=value figures, e.g. clip_vit_b_32."""
        return f"{self.task}_{self.name}".replace("-", "_")

    def parts(self) -> dict[str, int]:
        """Static bytes by kind (see the module docstring for the rules)."""
        p = self.params
        out = {"weights fp32": 4 * p, "grads fp32": 4 * p, "AdamW m+v fp32": 8 * p}
        out["DDP grad buckets"] = 4 * p if self.world > 1 else 0
        out["EMA fp32"] = 4 * p if self.ema else 0
        out["frozen fp32"] = 4 * self.frozen_params
        return out

    def static(self) -> int:
        return sum(self.parts().values())

    def total(self, ckpt: bool) -> int:
        return self.static() + self.act.total(ckpt)


def fits(total: int, capacity: int) -> str:
    """yes (<= 90% of the GPU), tight (90-100%), no (over)."""
    if total <= FIT_SHARE * capacity:
        return "yes"
    return "tight" if total <= capacity else "no"


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, world: int, local_loss: bool
) -> torch.Tensor:
    """open_clip ``ClipLoss`` with ``gather_with_grad`` on one rank: the other ranks' features stand in as
    tensors of their shape (what the all-gather returns); ``local_loss`` scores local rows only."""
    others = (world - 1) * img.shape[0]
    all_img = torch.cat([img, img.new_zeros(others, img.shape[1]).requires_grad_()])
    all_txt = torch.cat([txt, txt.new_zeros(others, txt.shape[1]).requires_grad_()])
    rows_img, rows_txt = (img, txt) if local_loss else (all_img, all_txt)
    logits_img = scale * rows_img @ all_txt.T
    logits_txt = scale * rows_txt @ all_img.T
    labels = torch.arange(rows_img.shape[0], device=img.device)
    return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2


def clip_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features, text features, logit scale) from an open_clip forward (tuple or dict)."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def clip_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks ``set_grad_checkpointing`` checkpoints: the resblocks of both transformer towers."""
    towers = [getattr(model.visual, "transformer", None), getattr(model, "transformer", None)]
    return [b for t in towers if t is not None and hasattr(t, "resblocks") for b in t.resblocks]


def clip_activations(
    model: torch.nn.Module, batch: int, world: int, local_loss: bool, autocast: torch.dtype | None
) -> ActivationProfile:
    """Saved activations of an open_clip model (meta or real) for one step at ``batch`` per GPU."""
    fake = any(p.is_meta for p in model.parameters())
    mode: contextlib.AbstractContextManager = contextlib.nullcontext()
    if fake:
        model, mode = fake_on_cpu(model)
    size = model.visual.image_size
    size = size if isinstance(size, tuple | list) else (size, size)
    model.train()

    def forward_loss() -> torch.Tensor:
        images = torch.randn(batch, 3, *size)
        texts = torch.randint(1, 100, (batch, model.context_length))
        return contrastive_loss(*clip_outputs(model(images, texts)), world, local_loss)

    with mode:
        return profile_activations(model, clip_blocks(model), forward_loss, batch, autocast)


def dit_activations(
    model: torch.nn.Module, cfg, batch: int, text_width: int, autocast: torch.dtype | None
) -> ActivationProfile:
    """Saved activations of the PixArt DiT (meta or real) for one step, as ``t2i.train`` runs it."""
    fake = any(p.is_meta for p in model.parameters())
    mode: contextlib.AbstractContextManager = contextlib.nullcontext()
    if fake:
        model, mode = fake_on_cpu(model)
    model.train()
    c, s, n = cfg.latent_channels, cfg.latent_size, cfg.max_sequence_length

    def forward_loss() -> torch.Tensor:
        noisy, noise = torch.randn(batch, c, s, s), torch.randn(batch, c, s, s)
        hidden, mask = torch.randn(batch, n, text_width), torch.ones(batch, n, dtype=torch.long)
        t = torch.randint(0, cfg.num_train_timesteps, (batch,))
        out = model(noisy, encoder_hidden_states=hidden, timestep=t, encoder_attention_mask=mask).sample.float()
        return F.mse_loss(out[:, :c], noise)

    with mode:
        return profile_activations(model, list(model.transformer_blocks), forward_loss, batch, autocast)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def job_gpus(preset_dir: Path, preset: str) -> int:
    """GPUs of a preset's job block (nodes x gpus_per_node); 1 when it has none."""
    from caption_mixing.presets import read_job_shape

    job = read_job_shape(preset_dir, preset)
    return max(1, int(job.get("nodes", 1)) * int(job.get("gpus_per_node", 1) or 1))


def per_gpu(global_batch: int, world: int, accum: int, what: str) -> int:
    parts = world * accum
    if global_batch % parts:
        raise ValueError(f"{what}: global batch {global_batch} does not split over {world} GPUs x accum {accum}")
    return global_batch // parts


def clip_plan(preset: str, world: int | None = None, batch: int | None = None) -> Plan:
    """Plan for a clip_train preset (its model, precision, loss options and job shape)."""
    from clip_train.config import PRESET_DIR
    from clip_train.model import create_model_meta
    from experiments.tasks import get_task

    cfg = get_task("clip").load_config(preset, {"train_shards": PLACEHOLDER_SHARDS})
    world = world or job_gpus(PRESET_DIR, preset)
    batch = batch or per_gpu(cfg.batch_size, world, cfg.accum_freq, f"clip preset {preset}")
    model = create_model_meta(cfg.model)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    act = clip_activations(model, batch, world, cfg.local_loss, AUTOCAST[cfg.precision])
    note = f"{cfg.model}, global batch {cfg.batch_size} = {world} GPUs x {batch}, local_loss={cfg.local_loss}"
    return Plan("clip", preset, batch, world, cfg.precision, cfg.grad_checkpointing, params, act, notes=[note])


def embedded_text_width() -> int:
    """The text width of EmbeddedCLIP-Tiny (testbed/model_configs), what the embedded t2i preset conditions on."""
    import json

    from testbed.models import EMBEDDED_CLIP_MODEL, MODEL_CONFIG_DIR

    return int(json.loads((MODEL_CONFIG_DIR / f"{EMBEDDED_CLIP_MODEL}.json").read_text())["text_cfg"]["width"])


def frozen_t2i_params(text_width: int, text_layers: int, text_heads: int, max_len: int) -> int:
    """Parameters of the frozen parts t2i keeps on the GPU: the SD VAE and a CLIP text encoder (meta)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        )
        text_cfg = CLIPTextConfig(
            hidden_size=text_width,
            intermediate_size=4 * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=max(77, max_len),
        )
        text = CLIPTextModel(text_cfg)
    return sum(p.numel() for m in (vae, text) for p in m.parameters())


def dit_plan(
    preset: str,
    world: int | None = None,
    batch: int | None = None,
    text_width: int = 768,
    text_layers: int = 12,
    text_heads: int = 12,
) -> Plan:
    """Plan for a t2i preset; the frozen text encoder is a CLIP text tower of the given shape (ViT-L/14's).

    A preset with the embedded text encoder conditions on EmbeddedCLIP-Tiny's width; its tiny frozen
    parts are not counted.
    """
    from experiments.tasks import get_task
    from t2i.config import EMBEDDED, PRESET_DIR
    from t2i.model import build_transformer

    cfg = get_task("t2i").load_config(preset, {})
    world = world or job_gpus(PRESET_DIR, preset)
    batch = batch or per_gpu(cfg.batch_size, world, cfg.grad_accum, f"t2i preset {preset}")
    embedded = cfg.text_encoder == EMBEDDED
    if embedded:
        text_width = embedded_text_width()
    with torch.device("meta"):
        model = build_transformer(cfg, text_width)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    act = dit_activations(model, cfg, batch, text_width, AUTOCAST[cfg.precision])
    frozen = 0 if embedded else frozen_t2i_params(text_width, text_layers, text_heads, cfg.max_sequence_length)
    text = f"SD VAE + CLIP text {text_width}x{text_layers}"
    if embedded:
        text = "embedded text tower (frozen parts not counted)"
    note = (
        f"PixArt DiT {cfg.num_layers}x{cfg.hidden_size}, {cfg.latent_size}x{cfg.latent_size} latents, "
        f"global batch {cfg.batch_size} = {world} GPUs x {batch}; frozen {text}"
    )
    return Plan(
        "t2i",
        preset,
        batch,
        world,
        cfg.precision,
        cfg.gradient_checkpointing,
        params,
        act,
        ema=True,
        frozen_params=frozen,
        text_width=text_width,
        notes=[note],
    )


def all_plans(presets: list[str]) -> list[Plan]:
    """Plans for ``clip:PRESET`` / ``t2i:PRESET`` names."""
    plans = []
    for spec in presets:
        task, _, preset = spec.partition(":")
        if task not in ("clip", "t2i") or not preset:
            raise ValueError(f"--presets: {spec!r} is not clip:PRESET or t2i:PRESET")
        plans.append(clip_plan(preset) if task == "clip" else dit_plan(preset))
    return plans


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan) -> str:
    """One preset: the parts in GiB, activations and totals without / with checkpointing, and the fits."""
    act = plan.act
    lines = [
        f"== {plan.task}:{plan.name}: {plan.params / 1e6:.2f}M trainable params, {plan.per_gpu_batch} per GPU, "
        f"{plan.world} GPUs, {plan.precision} (preset grad checkpointing: {'on' if plan.preset_ckpt else 'off'})",
        *(f"   {n}" for n in plan.notes),
        f"   {'part':<28}{'GiB':>10}",
    ]
    lines += [f"   {name:<28}{gib(v):>10}" for name, v in plan.parts().items() if v]
    per_sample = act.saved / act.batch / MIB
    lines.append(f"   {'activations, no ckpt':<28}{gib(act.saved):>10}   ({per_sample:.1f} MiB/sample)")
    lines.append(
        f"   {'activations, ckpt':<28}{gib(act.ckpt):>10}   (held {gib(act.held_ckpt)} + max(one of "
        f"{act.num_blocks} blocks recomputed {gib(act.block_peak)}, cast weights {gib(act.cast_cache)}))"
    )
    for ckpt in (False, True):
        total = plan.total(ckpt)
        fit = ", ".join(f"{name}: {fits(total, cap)}" for name, cap in GPUS)
        lines.append(f"   {'total, ' + ('ckpt' if ckpt else 'no ckpt'):<28}{gib(total):>10}   fits {fit}")
    return "\n".join(lines)


def summary_table(plans: list[Plan]) -> str:
    """Markdown table: one row per preset and checkpointing setting."""
    head = "| preset | per-GPU batch | params | static GiB | ckpt | activations GiB | total GiB |"
    head += " " + " | ".join(f"fits {name}" for name, _ in GPUS) + " |"
    rows = [head, "|" + "---|" * (7 + len(GPUS))]
    for plan in plans:
        for ckpt in (False, True):
            total = plan.total(ckpt)
            mark = " (preset)" if ckpt == plan.preset_ckpt else ""
            cells = [f"{plan.task}:{plan.name}", str(plan.per_gpu_batch), f"{plan.params / 1e6:.1f}M"]
            cells.append(gib(plan.static()))
            cells += ["on" if ckpt else "off", gib(plan.act.total(ckpt)), gib(total) + mark]
            cells += [fits(total, cap) for _, cap in GPUS]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def figures(plans: list[Plan]) -> dict[str, str]:
    """name=value figures for the preset's own checkpointing setting (and the other one, suffixed)."""
    out: dict[str, str] = {}
    for plan in plans:
        key = plan.key
        out[f"{key}_params"] = str(plan.params)
        out[f"{key}_per_gpu_batch"] = str(plan.per_gpu_batch)
        out[f"{key}_act_gib"] = gib(plan.act.saved)
        out[f"{key}_act_ckpt_gib"] = gib(plan.act.ckpt)
        out[f"{key}_total_gib"] = gib(plan.total(False))
        out[f"{key}_total_ckpt_gib"] = gib(plan.total(True))
        for name, cap in GPUS:
            out[f"{key}_preset_fits_{name.lower()}"] = fits(plan.total(plan.preset_ckpt), cap)
    return out


# ---------------------------------------------------------------------------------------------
# On a GPU: the measured peak of two real steps (one process), beside the plan for one process
# ---------------------------------------------------------------------------------------------


def _cuda_step_peak(
    model: torch.nn.Module, optimizer, forward_loss: Callable[[], torch.Tensor], dtype, device: str
) -> int:
    """Peak bytes allocated in the second of two training steps (AdamW states exist by then)."""
    for step in range(2):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = forward_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def measure_cuda(plan: Plan, ckpt: bool, dev: str = "cuda") -> int:
    """Two real steps of ``plan``'s model on the GPU at its per-GPU batch, as its trainer runs them
    (clip: fused AdamW; t2i: default AdamW and an fp32 EMA copy); frozen parts are not loaded."""
    from experiments.tasks import get_task

    torch.manual_seed(0)
    b = plan.per_gpu_batch
    if plan.task == "clip":
        from clip_train.model import create_model

        cfg = get_task("clip").load_config(plan.name, {"train_shards": PLACEHOLDER_SHARDS})
        model = create_model(cfg.model, device=dev)[0].train()
        model.set_grad_checkpointing(ckpt)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        size = model.visual.image_size
        size = size if isinstance(size, tuple | list) else (size, size)

        def forward_loss() -> torch.Tensor:
            images = torch.randn(b, 3, *size, device=dev)
            texts = torch.randint(1, 100, (b, model.context_length), device=dev)
            return contrastive_loss(*clip_outputs(model(images, texts)), 1, cfg.local_loss)

    else:
        from t2i.model import build_transformer

        cfg = get_task("t2i").load_config(plan.name, {})
        model = build_transformer(cfg, plan.text_width).to(dev).train()
        if ckpt:
            model.enable_gradient_checkpointing()
        ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}  # noqa: F841  (held)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        c, s, n = cfg.latent_channels, cfg.latent_size, cfg.max_sequence_length

        def forward_loss() -> torch.Tensor:
            noisy, noise = torch.randn(b, c, s, s, device=dev), torch.randn(b, c, s, s, device=dev)
            hidden = torch.randn(b, n, plan.text_width, device=dev)
            mask = torch.ones(b, n, dtype=torch.long, device=dev)
            t = torch.randint(0, cfg.num_train_timesteps, (b,), device=dev)
            out = model(noisy, encoder_hidden_states=hidden, timestep=t, encoder_attention_mask=mask).sample.float()
            return F.mse_loss(out[:, :c], noise)

    return _cuda_step_peak(model, optimizer, forward_loss, AUTOCAST[plan.precision], dev)


def one_process_plan(plan: Plan) -> Plan:
    """The same preset planned for one process (no DDP buckets, no other ranks' features in the loss)."""
    if plan.task == "clip":
        return clip_plan(plan.name, world=1, batch=plan.per_gpu_batch)
    return dit_plan(plan.name, world=1, batch=plan.per_gpu_batch)


def cuda_figures(plans: list[Plan]) -> dict[str, str]:
    """Measured peak vs the one-process plan (without frozen parts) for each preset's own checkpointing."""
    out: dict[str, str] = {}
    for plan in plans:
        key, ckpt = plan.key, plan.preset_ckpt
        expected = one_process_plan(plan)
        want = expected.total(ckpt) - 4 * expected.frozen_params
        try:
            peak = measure_cuda(plan, ckpt)
        except torch.cuda.OutOfMemoryError:
            peak = None
        torch.cuda.empty_cache()  # the model and optimizer of measure_cuda are gone
        if peak is None:
            out[f"{key}_cuda_peak_gib"] = "oom"
            continue
        out[f"{key}_cuda_peak_gib"] = gib(peak)
        out[f"{key}_plan_1gpu_gib"] = gib(want)
        out[f"{key}_cuda_peak_over_plan"] = f"{peak / want:.3f}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--presets",
        default="clip:vit-b-32,clip:vit-h-14,t2i:dit-xl-2",
        help="comma list of clip:PRESET / t2i:PRESET (default: the paper-scale three)",
    )
    parser.add_argument("--measure-cuda", action="store_true", help="also measure two real steps per preset on a GPU")
    args = parser.parse_args(argv)
    if args.measure_cuda and not torch.cuda.is_available():
        parser.error("--measure-cuda needs a visible CUDA GPU (torch.cuda.is_available() is False)")
    plans = all_plans([s.strip() for s in args.presets.split(",") if s.strip()])
    for plan in plans:
        print(format_plan(plan) + "\n")
    print(summary_table(plans) + "\n")
    values = figures(plans)
    if args.measure_cuda:
        values.update(cuda_figures(plans))
    for name, value in values.items():
        print(f"{name}={value}")
    bad = [f"{p.task}:{p.name}" for p in plans if fits(p.total(p.preset_ckpt), GPUS[0][1]) != "yes"]
    if bad:
        print(f"over {FIT_SHARE:.0%} of an {GPUS[0][0]} GPU with the preset's own settings: {', '.join(bad)}")
    print(f"memory_plan_ok={int(not bad)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
