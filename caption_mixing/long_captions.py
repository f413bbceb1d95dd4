"""What to do with a caption longer than the text tower's context (77 tokens for CLIP).

Re-aligned captions run ~80 words, longer than 77 tokens, so the policy changes what the
text tower sees:
- ``head``: keep the first tokens (the tokenizer's truncation; what the paper's code does);
- ``sentences``: the longest run of whole leading sentences that fits;
- ``random_window``: a window of consecutive whole sentences that fits, starting at a sentence
  drawn from (seed, epoch, key), so it is reproducible and differs per visit.
A single sentence longer than the context falls back to head truncation.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from caption_mixing.mixing import unit_hash

POLICIES = ("head", "sentences", "random_window")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _fits_from(sentences: list[str], start: int, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    kept: list[str] = []
    for sentence in sentences[start:]:
        candidate = " ".join([*kept, sentence])
        if count_tokens(candidate) > max_tokens:
            break
        kept.append(sentence)
    return " ".join(kept)


def fit_caption(
    text: str,
    policy: str,
    count_tokens: Callable[[str], int],
    max_tokens: int,
    seed: int = 0,
    epoch: int = 0,
    key: str = "",
) -> str:
    """Return the caption the text tower should see under ``policy`` (``head`` returns it unchanged)."""
    if policy not in POLICIES:
        raise ValueError(f"long-caption policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "head" or count_tokens(text) <= max_tokens:
        return text
    sentences = split_sentences(text)
    start = 0
    if policy == "random_window" and len(sentences) > 1:
        start = int(unit_hash(seed, epoch, f"window/{key}") * len(sentences))
    fitted = _fits_from(sentences, start, count_tokens, max_tokens)
    return fitted or text  # one overlong sentence: leave it to head truncation


def token_counter(tokenizer) -> Callable[[str], int]:
    """Count tokens of an open_clip tokenizer (without truncation), including start/end tokens."""
    inner = getattr(tokenizer, "encode", None)
    if inner is None:  # HF-backed open_clip tokenizers
        hf = tokenizer.tokenizer
        return lambda text: len(hf(text, add_special_tokens=True)["input_ids"])
    return lambda text: len(inner(text)) + 2
