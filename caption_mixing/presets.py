"""Presets as plain YAML files plus ``--set key=value`` overrides, resolved onto a flat dataclass.

clip_train and t2i keep their configs as flat dataclasses and their presets as YAML files a reader
can diff; this module is the one place that reads them, coerces values to the fields' types and
names the file or flag and the key at fault.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from caption_mixing.mixconfig import MixingFields, p_from_captions

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def list_presets(preset_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(preset_dir).glob("*.yaml"))


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-4", "workers=4"]`` -> dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set: {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _field_types(cls: type) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def coerce(kind: str, key: str, value: Any, source: str) -> Any:
    """Parse one value to a field type written like ``int``, ``float | None``; errors name source and key."""
    if value is None:
        if "None" in kind:
            return None
        raise ValueError(f"{source}: {key} cannot be empty")
    base = kind.split("|")[0].strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in _BOOL_WORDS:
                return _BOOL_WORDS[str(value).lower()]
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key}={value!r} is not a valid {kind}") from None


def check_keys(cls: type, keys: list[str], source: str) -> None:
    """Unknown keys are an error naming the source and suggesting close field names."""
    known = _field_types(cls)
    derived = getattr(cls, "DERIVED_KEYS", {})
    for key in keys:
        if key in derived:
            raise ValueError(f"{source}: {key!r} is derived from the config, not set; set {derived[key]} instead")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{source}: unknown config key {key!r}{hint}")


JOB_KEY = "job"  # a preset's job shape for the sweep launcher (experiments.resources), not a config field


def read_preset_file(preset_dir: Path, preset: str) -> tuple[Path, dict[str, Any]]:
    """(path, mapping) of a preset: a name in ``preset_dir`` or a YAML path; errors name the preset or file."""
    path = Path(preset)
    if not path.suffix:
        path = Path(preset_dir) / f"{preset}.yaml"
    if not path.exists():
        names = ", ".join(list_presets(preset_dir))
        raise ValueError(f"--preset: {preset!r} is neither a preset ({names}) nor a YAML file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a preset is a mapping of config keys, got {type(raw).__name__}")
    return path, raw


def read_job_shape(preset_dir: Path, preset: str) -> dict[str, Any]:
    """The preset's ``job:`` mapping (nodes, gpus_per_node, ... as written), or {} when it has none.

    Job shapes live beside the config they run so a reader sees both in one file; the sweep
    launcher checks the keys and values (the config loader ignores the block).
    """
    path, raw = read_preset_file(preset_dir, preset)
    job = raw.get(JOB_KEY)
    if job is None:
        return {}
    if not isinstance(job, dict):
        raise ValueError(f"{path}: {JOB_KEY} must be a mapping of job resources, got {type(job).__name__}")
    return dict(job)


def resolve_preset(cls: type, preset_dir: Path, preset: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Field values for ``cls`` from a preset (a name in ``preset_dir`` or a YAML path) plus overrides.

    The result also carries ``preset``; the caller builds and validates the dataclass. The preset's
    ``job`` block (its Slurm job shape, see ``read_job_shape``) is not a config key and is skipped.
    """
    path, raw = read_preset_file(preset_dir, preset)
    raw.pop(JOB_KEY, None)
    types = _field_types(cls)
    check_keys(cls, list(raw), str(path))
    values = {k: coerce(types[k], k, v, str(path)) for k, v in raw.items()}
    overrides = overrides or {}
    check_keys(cls, list(overrides), "--set")
    values.update({k: coerce(types[k], k, v, "--set") for k, v in overrides.items()})
    values["preset"] = preset
    if issubclass(cls, MixingFields):
        values = p_from_captions(values, overrides)
    return values
