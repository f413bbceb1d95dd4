"""What one job asks for (:class:`Resources`) and its one rendering into sbatch options.

A preset's YAML carries its job shape (``job:`` block, read by ``caption_mixing.presets.read_job_shape``);
flags override it. ``sbatch_options`` is the only place Resources become sbatch terms: the submitit
executor's parameters (``executor_params``), ``sbatch --test-only``'s arguments and the ``--dry-run``
description (``sbatch_args``) are all read off it, so what is checked and shown is what is submitted.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from caption_mixing.presets import read_job_shape

DEFAULT_SEC_PER_STEP = 1.0
FLAG_SOURCE = "--sec-per-step"
# Keys a preset's ``job:`` block may set (cluster names such as partition/account stay on the command line).
JOB_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "time_min", "sec_per_step")


@dataclass
class Resources:
    """What one job asks for; defaults come from the preset's ``job:`` block, flags override them."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    mem_gb: float = 8.0
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {"exclusive": True}
    signal_delay_s: int = 90  # submitit sends its checkpoint signal this long before the time limit
    max_parallel: int | None = None  # array throttle (slurm) / concurrent jobs (local)
    sec_per_step: float | None = None  # for the time-limit check only
    sec_per_step_source: str = "the default estimate"  # who said so: a preset, or FLAG_SOURCE

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def _job_value(key: str, value: Any, source: str) -> Any:
    """One ``job:`` value checked and typed; errors name the preset file and the key."""
    try:
        if key == "time_min":
            return parse_time_min(str(value), f"{source}: job.time_min")
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if key in ("mem_gb", "sec_per_step"):
            if number <= 0:
                raise ValueError
            return number
        if not number.is_integer() or number < (0 if key == "gpus_per_node" else 1):
            raise ValueError
        return int(number)
    except (TypeError, ValueError) as e:
        if str(e).startswith(source):
            raise
        kind = "a positive number" if key in ("mem_gb", "sec_per_step") else "a whole count"
        raise ValueError(f"{source}: job.{key}={value!r} is not {kind}") from None


def job_resources(preset_dir: Path, preset: str) -> Resources:
    """Resources from the preset's ``job:`` block; a preset without one gets the defaults (one CPU task)."""
    shape = read_job_shape(preset_dir, preset)
    source = f"preset {preset!r}"
    res = Resources()
    for key, value in shape.items():
        if key not in JOB_KEYS:
            close = difflib.get_close_matches(key, JOB_KEYS, n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(JOB_KEYS)})"
            raise ValueError(f"{source}: unknown job key {key!r}{hint}")
        setattr(res, key, _job_value(key, value, source))
    if "sec_per_step" in shape:
        res.sec_per_step_source = f"the {Path(preset).stem!r} preset's estimate"
    return res


_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time_min(text: str, flag: str = "--time") -> int:
    """Slurm time formats (``90``, ``1:30:00``, ``2-00:00:00``, ``2-12``) -> whole minutes (rounded up)."""
    m = _TIME_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"{flag}: {text!r} is not a Slurm time (minutes, HH:MM:SS, D-HH[:MM[:SS]])")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b) if b else None, int(c) if c else None
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"{flag}: {text!r} must be a positive time")
    return math.ceil(seconds / 60)


def parse_sbatch_extra(items: list[str] | None, flag: str = "--sbatch") -> dict[str, Any]:
    """``["exclusive", "mail-type=END"]`` -> {"exclusive": True, "mail_type": "END"} (submitit's spelling)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ValueError(f"{flag}: {item!r} is not OPTION or OPTION=VALUE (an sbatch long option without --)")
        out[key.replace("-", "_")] = value if sep else True
    return out


# ---------------------------------------------------------------------------------------------
# The one rendering into sbatch terms
# ---------------------------------------------------------------------------------------------


def array_spec(n: int, res: Resources) -> str:
    """``--array`` of n jobs throttled to ``max_parallel`` (submitit's default throttle is 256)."""
    return f"0-{n - 1}%{min(n, res.max_parallel or 256)}"


def sbatch_options(res: Resources, array_size: int = 1) -> dict[str, Any]:
    """The job as sbatch long options (keys with underscores, as submitit writes them; True = a bare flag).

    ``--signal`` asks for submitit's pre-timeout signal ``signal_delay_s`` before the limit and
    ``--requeue`` lets the job requeue itself after it; ``extra`` (``--sbatch``) comes last and wins.
    """
    opts: dict[str, Any] = {
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "mem": f"{int(math.ceil(res.mem_gb * 1024))}M",
        "time": res.time_min,
    }
    if res.gpus_per_node:
        opts["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            opts[key] = getattr(res, key)
    opts["signal"] = f"{submitit.JobEnvironment.USR_SIG}@{res.signal_delay_s}"
    opts["requeue"] = True
    if array_size > 1:
        opts["array"] = array_spec(array_size, res)
    opts.update(res.extra)
    return opts


def sbatch_args(res: Resources, array_size: int = 1) -> list[str]:
    """``sbatch_options`` as command-line arguments, for ``sbatch --test-only`` and ``--dry-run``."""
    args = []
    for key, value in sbatch_options(res, array_size).items():
        flag = "--" + key.replace("_", "-")
        args.append(flag if value is True else f"{flag}={value}")
    return args


# submitit parameters that are not sbatch options: a --sbatch option of that name stays an sbatch option.
SUBMITIT_ONLY = frozenset(
    {"setup", "teardown", "srun_args", "use_srun", "stderr_to_stdout", "signal_delay_s", "array_parallelism"}
    | {"additional_parameters", "num_gpus"}
)


def executor_params(res: Resources, name: str) -> dict[str, Any]:
    """``sbatch_options`` as ``submitit.SlurmExecutor.update_parameters`` keywords.

    Options submitit names go in as themselves, the rest through ``additional_parameters``, which
    submitit writes last; the array line is left to submitit (it knows how many jobs a batch has)
    and throttled by ``array_parallelism`` as ``array_spec`` says.
    """
    native = submitit.SlurmExecutor._valid_parameters() - SUBMITIT_ONLY
    params: dict[str, Any] = {
        "job_name": name,
        "signal_delay_s": res.signal_delay_s,
        "array_parallelism": res.max_parallel or 256,
    }
    additional: dict[str, Any] = {}
    for key, value in sbatch_options(res).items():
        (params if key in native else additional)[key] = value
    params["additional_parameters"] = additional
    return params


# ---------------------------------------------------------------------------------------------
# Time-limit check
# ---------------------------------------------------------------------------------------------


def sec_per_step_estimate(cfg: Any, run_dirs: list[Path], res: Resources) -> tuple[float, str]:
    """Seconds per optimizer step and where that number comes from.

    ``--sec-per-step`` wins; then the last measured samples/s in a train_log.jsonl of these runs;
    then the preset's rough estimate; then a default.
    """
    if res.sec_per_step is not None and res.sec_per_step_source == FLAG_SOURCE:
        return res.sec_per_step, FLAG_SOURCE
    for run_dir in run_dirs:
        log = Path(run_dir) / "train_log.jsonl"
        if not log.exists():
            continue
        for line in reversed(log.read_text().splitlines()):
            try:
                sps = float(json.loads(line).get("samples_per_s") or 0)
            except (ValueError, AttributeError):
                continue
            if sps > 0:
                return cfg.batch_size / sps, f"measured in {log}"
    if res.sec_per_step is not None:
        return res.sec_per_step, res.sec_per_step_source
    return DEFAULT_SEC_PER_STEP, "the default estimate"


def time_limit_warning(cfg: Any, res: Resources, run_dirs: list[Path]) -> str | None:
    """A warning when the job time limit cannot fit one checkpoint interval.

    The trainers write a checkpoint when the signal arrives, so progress is kept as long as that
    save fits in the signal delay; the warning says that every allocation then depends on it.
    """
    every = getattr(cfg, "checkpoint_every", None)
    if not every:
        return None
    sps, source = sec_per_step_estimate(cfg, run_dirs, res)
    interval = every * sps
    usable = res.time_min * 60 - res.signal_delay_s
    if usable >= interval:
        return None
    return (
        f"warning: --time {res.time_min} min leaves {max(usable, 0):.0f} s before the checkpoint signal, "
        f"shorter than one checkpoint interval (checkpoint_every={every} steps x {sps:.3g} s/step from "
        f"{source} = {interval:.0f} s); "
        "every allocation then relies on the checkpoint written at the signal, and loses its steps "
        f"if that save does not finish within --signal-delay-s {res.signal_delay_s}. "
        "Raise --time or lower --set checkpoint_every."
    )
