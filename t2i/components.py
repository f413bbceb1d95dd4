"""Frozen parts of text-to-image training, loaded from local paths only (nothing from a hub).

* VAE: a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
  e.g. the SD VAE layout.
* Text encoder: a Hugging Face folder holding ``text_encoder/`` (``CLIPTextModel`` or ``T5EncoderModel``)
  and ``tokenizer/``, i.e. the layout of a diffusers pipeline folder; or an open_clip checkpoint file,
  whose text tower is converted to a ``CLIPTextModel`` + ``CLIPTokenizer`` (``export_open_clip_text``)
  so that ``PixArtAlphaPipeline`` can load it with ``from_pretrained``.

Prompts are encoded exactly as ``PixArtAlphaPipeline.encode_prompt`` does (pad to max length,
truncate, attention mask, last hidden state), so training sees what sampling will feed the model.

Weights are loaded from safetensors only: a pickle file (``.bin``, ``.ckpt``) can run code when
loaded, so a folder that has nothing else is refused unless the config opts in with
``allow_pickle_weights: true``. open_clip checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

VAE_LAYOUT = (
    "a diffusers AutoencoderKL folder: config.json (_class_name AutoencoderKL) + diffusion_pytorch_model.safetensors"
)
TEXT_LAYOUT = (
    "a folder with text_encoder/ (config.json + model.safetensors of CLIPTextModel or T5EncoderModel) and "
    "tokenizer/ (CLIPTokenizer or T5Tokenizer files), or an open_clip checkpoint file with text_encoder_model set"
)


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class ComponentError(ValueError):
    """A frozen component whose path or layout is wrong; the message names the path and the expected layout."""


def use_safetensors(folder: Path, what: str, allow_pickle: bool) -> bool:
    """True when ``folder`` has safetensors weights (or none: loading then names what is missing).

    A folder with only pickle weights is refused naming the folder and its files, unless
    ``allow_pickle`` (config ``allow_pickle_weights``) says the user trusts it; then it loads them.
    """
    files = [p.name for p in Path(folder).iterdir() if p.is_file()] if Path(folder).is_dir() else []
    if any(name.endswith(".safetensors") for name in files):
        return True
    pickled = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    if pickled and not allow_pickle:
        raise ComponentError(
            f"{what}: {folder} holds only pickle weights ({', '.join(pickled)}), which can run code when loaded; "
            "convert them to safetensors (save_pretrained writes them), or set allow_pickle_weights: true "
            "if you trust this folder"
        )
    return not pickled


def load_vae(path: str | Path, device: str = "cpu", allow_pickle: bool = False) -> AutoencoderKL:
    """Frozen AutoencoderKL from a local folder (also accepts a pipeline folder with ``vae/``)."""
    path = Path(path)
    if (path / "vae" / "config.json").exists():
        path = path / "vae"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ComponentError(f"vae={str(path)!r}: no config.json; expected {VAE_LAYOUT}")
    try:
        cls_name = json.loads(cfg_file.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ComponentError(f"{cfg_file}: not valid JSON ({e}); expected {VAE_LAYOUT}") from e
    if cls_name != "AutoencoderKL":
        raise ComponentError(f"vae={str(path)!r}: config.json describes {cls_name!r}; expected {VAE_LAYOUT}")
    safe = use_safetensors(path, "vae", allow_pickle)
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=safe)
    except OSError as e:
        raise ComponentError(f"vae={str(path)!r}: could not load weights ({e}); expected {VAE_LAYOUT}") from e
    return vae.to(device).eval().requires_grad_(False)


@dataclass
class TextEncoder:
    """A frozen tokenizer + encoder pair with PixArt's prompt encoding; counts truncated prompts."""

    tokenizer: object
    model: torch.nn.Module
    max_length: int
    truncated: int = 0
    encoded: int = 0
    _empty: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "hidden_size", None) or cfg.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states [B, L, D], attention mask [B, L]) as PixArtAlphaPipeline.encode_prompt makes them."""
        inputs = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        full = self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        # A prompt is truncated when its untruncated token count exceeds the context.
        lengths = (full != self.tokenizer.pad_token_id).sum(1) if full.shape[1] > self.max_length else None
        if lengths is not None:
            n = int((lengths > self.max_length).sum())
            if n and self.truncated == 0:
                log.warning("prompts longer than %d tokens are truncated (counted in metrics)", self.max_length)
            self.truncated += n
        self.encoded += len(prompts)
        ids = inputs.input_ids.to(device)
        mask = inputs.attention_mask.to(device)
        hidden = self.model(ids, attention_mask=mask)[0]
        return hidden, mask


def token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens a Hugging Face tokenizer makes of a text before truncation, special tokens included
    (what ``max_sequence_length`` is compared with; used by the ``long_captions`` policies)."""
    return lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])


def _is_hf_text_folder(path: Path) -> bool:
    return (path / "text_encoder" / "config.json").is_file() and (path / "tokenizer").is_dir()


def load_text_encoder(
    path: str | Path,
    max_length: int,
    device: str = "cpu",
    open_clip_model: str | None = None,
    allow_pickle: bool = False,
) -> TextEncoder:
    """Frozen text encoder from a local HF folder, or from an open_clip checkpoint (converted on the fly)."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    path = Path(path)
    if path.is_file():
        if not open_clip_model:
            raise ComponentError(f"text_encoder={str(path)!r} is a file: set text_encoder_model (open_clip name)")
        tmp = Path(tempfile.mkdtemp(prefix="t2i-text-"))
        try:
            export_open_clip_text(path, open_clip_model, tmp)
            return load_text_encoder(tmp, max_length, device)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not _is_hf_text_folder(path):
        raise ComponentError(f"text_encoder={str(path)!r}: expected {TEXT_LAYOUT}")
    arch = json.loads((path / "text_encoder" / "config.json").read_text()).get("architectures") or ["?"]
    classes = {"CLIPTextModel": CLIPTextModel, "T5EncoderModel": T5EncoderModel}
    if arch[0] not in classes:
        raise ComponentError(
            f"{path / 'text_encoder'}: architecture {arch[0]!r} is not supported; expected {TEXT_LAYOUT}"
        )
    safe = use_safetensors(path / "text_encoder", "text_encoder", allow_pickle)
    try:
        model = classes[arch[0]].from_pretrained(path / "text_encoder", local_files_only=True, use_safetensors=safe)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except (OSError, ValueError) as e:
        raise ComponentError(f"text_encoder={str(path)!r}: could not load ({e}); expected {TEXT_LAYOUT}") from e
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and max_length > ctx:
        raise ComponentError(
            f"max_sequence_length={max_length} exceeds the context of {path / 'text_encoder'} ({ctx} positions)"
        )
    return TextEncoder(tokenizer, model.to(device).eval().requires_grad_(False), max_length)


# ------------------------------------------------------------------------------------------------
# open_clip text tower -> transformers CLIPTextModel + CLIPTokenizer
# ------------------------------------------------------------------------------------------------


def check_open_clip_name(model_name: str) -> None:
    """An unknown open_clip model name is a ``ComponentError`` naming the close ones (EmbeddedCLIP-Tiny is known)."""
    from testbed.models import check_model_name

    try:
        check_model_name(model_name, "open_clip model")
    except ValueError as exn:
        raise ComponentError(str(exn)) from None


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_open_clip(model_name: str, device: str = "cpu") -> torch.nn.Module:
    """An open_clip model by name, randomly initialized; the caller loads its weights next (so open_clip's
    "initialized randomly" warning, which would mislead, is filtered out)."""
    import open_clip

    check_open_clip_name(model_name)
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(model_name, device=device)
    finally:
        logging.getLogger().removeFilter(quiet)


def _bytes_to_unicode() -> dict[int, str]:
    from open_clip.tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def write_clip_tokenizer(out: Path, context_length: int) -> None:
    """CLIPTokenizer files from open_clip's own BPE file (same ids as open_clip's SimpleTokenizer)."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # open_clip pads with id 0 ("!"); the pipeline masks padding, so the pad id only has to be stable.
    tok = CLIPTokenizer(
        str(out / "vocab.json"), str(out / "merges.txt"), pad_token="!", model_max_length=context_length
    )
    tok.save_pretrained(out)


def export_open_clip_text(checkpoint: str | Path, model_name: str, out: Path) -> Path:
    """Write ``out/text_encoder`` (CLIPTextModel) + ``out/tokenizer`` from an open_clip checkpoint's text tower."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from training.checkpoint import load_checkpoint

    clip = create_open_clip(model_name)
    state = load_checkpoint(Path(checkpoint))
    sd = state.get("state_dict", state)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    missing = [k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight") if k not in sd]
    if missing:
        raise ComponentError(f"{checkpoint}: not an open_clip checkpoint with a text tower (missing {missing})")
    clip.load_state_dict(sd)
    blocks = clip.transformer.resblocks
    width = clip.token_embedding.weight.shape[1]
    act = type(blocks[0].mlp.gelu).__name__
    config = CLIPTextConfig(
        vocab_size=clip.token_embedding.weight.shape[0],
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.weight.shape[0],
        projection_dim=clip.text_projection.shape[1] if clip.text_projection is not None else width,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=clip.positional_embedding.shape[0],
        hidden_act="quick_gelu" if act == "QuickGELU" else "gelu",
        layer_norm_eps=blocks[0].ln_1.eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    hf = CLIPTextModel(config).eval()
    new = {
        "text_model.embeddings.token_embedding.weight": clip.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": clip.positional_embedding,
        "text_model.final_layer_norm.weight": clip.ln_final.weight,
        "text_model.final_layer_norm.bias": clip.ln_final.bias,
    }
    for i, b in enumerate(blocks):
        p = f"text_model.encoder.layers.{i}."
        qw, kw, vw = b.attn.in_proj_weight.chunk(3)
        qb, kb, vb = b.attn.in_proj_bias.chunk(3)
        new.update(
            {
                p + "self_attn.q_proj.weight": qw,
                p + "self_attn.q_proj.bias": qb,
                p + "self_attn.k_proj.weight": kw,
                p + "self_attn.k_proj.bias": kb,
                p + "self_attn.v_proj.weight": vw,
                p + "self_attn.v_proj.bias": vb,
                p + "self_attn.out_proj.weight": b.attn.out_proj.weight,
                p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
                p + "layer_norm1.weight": b.ln_1.weight,
                p + "layer_norm1.bias": b.ln_1.bias,
                p + "layer_norm2.weight": b.ln_2.weight,
                p + "layer_norm2.bias": b.ln_2.bias,
                p + "mlp.fc1.weight": b.mlp.c_fc.weight,
                p + "mlp.fc1.bias": b.mlp.c_fc.bias,
                p + "mlp.fc2.weight": b.mlp.c_proj.weight,
                p + "mlp.fc2.bias": b.mlp.c_proj.bias,
            }
        )
    # transformers 4 nests the tower under ``text_model``; transformers 5 does not.
    target = getattr(hf, "text_model", hf)
    tensors = {k.removeprefix("text_model."): v.detach().clone() for k, v in new.items()}
    result = target.load_state_dict(tensors, strict=False)
    unexpected_missing = [k for k in result.missing_keys if "position_ids" not in k]
    if unexpected_missing or result.unexpected_keys:
        raise ComponentError(f"{checkpoint}: text tower conversion left {unexpected_missing or result.unexpected_keys}")
    out = Path(out)
    hf.save_pretrained(out / "text_encoder")
    write_clip_tokenizer(out / "tokenizer", config.max_position_embeddings)
    return out
