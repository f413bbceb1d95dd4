"""Model FLOPs utilisation for the training benchmarks: FLOPs of one training step, and the device's peak.

MFU = (samples/s x model FLOPs per sample of forward + backward) / peak dense FLOP/s. The FLOPs are
counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and one backward
of the model built on the meta device (no weights allocated, math attention), so they are model FLOPs:
the recomputation gradient checkpointing adds is not counted (the usual MFU convention, PaLM app. B).

The peak is ``--peak-tflops`` when given, else looked up from the device name ``nvidia-smi`` and
``torch.cuda.get_device_name`` print. Only the dense bf16 tensor-core peaks of NVIDIA's data sheets are
listed; an unlisted device gives no MFU rather than a guessed one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets. Matched in order on the
# device name, so the PCIe/NVL variants come before the SXM default.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    (("H200",), 989.0),  # H200 SXM and GH200: the same tensor cores as H100 SXM
    (("A100",), 312.0),
)


def peak_tflops(device_name: str | None, given: float | None = None) -> float | None:
    """``given`` when set; else the listed dense bf16 peak for ``device_name``; else None (no MFU)."""
    if given:
        return float(given)
    if not device_name:
        return None
    name = device_name.upper()
    for words, tflops in PEAK_BF16_TFLOPS:
        if all(w in name for w in words):
            return tflops
    return None


def gpu_name() -> str | None:
    """The first GPU's name from ``nvidia-smi`` (no CUDA context in this process), else from torch, else None."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.strip().splitlines()[0].strip()
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def train_flops(forward_loss: Callable[[], torch.Tensor], backward: bool = True) -> float:
    """FLOPs of ``forward_loss()`` and (``backward``) of the backward of the loss it returns (math attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        with torch.set_grad_enabled(backward):
            loss = forward_loss()
        if backward:
            loss.backward()
    return float(counter.get_total_flops())


def clip_flops_per_sample(model_name: str, batch: int = 2) -> float:
    """Training FLOPs per image-text pair of an open_clip model (both towers, forward + backward).

    The contrastive loss's logits (B x global batch x embed dim) are left out: under 1% for B/32 at 512.
    """
    import open_clip

    import testbed.models  # noqa: F401  (registers EmbeddedCLIP-Tiny with open_clip)

    with torch.device("meta"):
        model = open_clip.create_model(model_name, device="meta")
        size = model.visual.image_size
        size = size if isinstance(size, tuple | list) else (size, size)
        images = torch.randn(batch, 3, *size)
        texts = torch.zeros(batch, model.context_length, dtype=torch.long)

    def forward_loss() -> torch.Tensor:
        out = model(images, texts)
        img, txt = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        return (img * txt).sum()

    return train_flops(forward_loss) / batch


def mfu_pct(samples_per_s: float, flops_per_sample: float, peak: float | None) -> float | None:
    """Achieved / peak in percent, or None without a peak."""
    if not peak:
        return None
    return 100.0 * samples_per_s * flops_per_sample / (peak * 1e12)
