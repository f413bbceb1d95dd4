"""CLIP training config: a flat dataclass filled from a preset file, then from overrides.

Presets are plain YAML in ``clip_train/presets`` so two setups can be diffed line by line.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class ClipTrainConfig:
    model: str = "EmbeddedCLIP-Tiny"
    train_shards: str | None = "embedded"  # brace pattern(s) joined by "::", or "embedded"
    sidecar_dir: str | None = None  # where synthetic-caption sidecars live; default: beside the shards
    eval_tasks: str | None = "embedded"  # "embedded" or a comma list of name=path
    synthetic_source: str = "altogether"
    p: float = 0.15
    seed: int = 0
    batch_size: int = 128
    samples_seen: int = 51200
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    precision: str = "fp32"  # fp32 | amp_bf16
    workers: int = 1
    shuffle_buffer: int = 2000
    checkpoint_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    device: str | None = None  # default: cuda if available, else cpu
    preset: str | None = None

    @property
    def steps(self) -> int:
        """Optimizer steps: seen pairs / global batch."""
        return max(1, self.samples_seen // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "steps": self.steps}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(ClipTrainConfig)}


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = _field_types()[key]
    if value is None:
        if "None" in str(kind):
            return None
        raise ValueError(f"{source}: {key} cannot be empty")
    try:
        if kind in ("int", int) or str(kind) == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in str(kind):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key}={value!r} is not a valid {kind}") from None


def _check_keys(keys: list[str], source: str) -> None:
    known = _field_types()
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{source}: unknown config key {key!r}{hint}")


def load_config(preset: str = "embedded", overrides: dict[str, Any] | None = None) -> ClipTrainConfig:
    """Resolve a preset (name in clip_train/presets or a YAML path) plus overrides."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ValueError(f"--preset: {preset!r} is neither a preset ({', '.join(list_presets())}) nor a YAML file")
    raw = yaml.safe_load(path.read_text()) or {}
    _check_keys(list(raw), str(path))
    values = {k: _coerce(k, v, str(path)) for k, v in raw.items()}
    overrides = overrides or {}
    _check_keys(list(overrides), "--set")
    values.update({k: _coerce(k, v, "--set") for k, v in overrides.items()})
    values["preset"] = preset
    cfg = ClipTrainConfig(**values)
    validate(cfg)
    return cfg


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-4", "workers=4"]`` -> dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set: {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def validate(cfg: ClipTrainConfig) -> None:
    if not 0.0 <= cfg.p <= 1.0:
        raise ValueError(f"p={cfg.p} is outside [0, 1]")
    if cfg.batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
    if cfg.precision not in ("fp32", "amp_bf16"):
        raise ValueError(f"precision must be fp32 or amp_bf16, got {cfg.precision!r}")
    if cfg.train_shards is None:
        raise ValueError("train_shards is not set: pass --set train_shards='/data/cc12m/{00000..01242}.tar'")
