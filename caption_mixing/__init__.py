"""caption_mixing: choose between alt-text and synthetic captions at ratio p, deterministically.

A small library with no training code: caption sources and sidecars, the mixing rule, the
WebDataset pipeline builder that training applications compose. The synthetic testbed lives in
its own package, :mod:`testbed`. The pipeline names are imported lazily so data tools (sidecars,
attach, stats) do not pull in torch.
"""

from caption_mixing.mixing import ALT, Choice, MixStats, Mixture, choose_caption, parse_p, parse_p_list, unit_hash
from caption_mixing.shards import expand_shards

_PIPELINE_NAMES = ("SharedEpoch", "build_caption_pipeline", "make_loader")


def __getattr__(name: str):
    if name in _PIPELINE_NAMES:
        from caption_mixing import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'caption_mixing' has no attribute {name!r}")


__all__ = [
    "ALT",
    "Choice",
    "Mixture",
    "MixStats",
    "choose_caption",
    "expand_shards",
    "parse_p",
    "parse_p_list",
    "unit_hash",
    *_PIPELINE_NAMES,
]
