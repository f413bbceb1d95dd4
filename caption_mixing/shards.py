"""Shard lists: brace patterns like ``data/{00000..01242}.tar``, several joined with ``::``."""

from __future__ import annotations

import os

import braceexpand


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def expand_shards(pattern: str | list[str], check_exists: bool = True) -> list[str]:
    """Expand brace patterns into a shard list; an error names a pattern that matches no file."""
    patterns = pattern if isinstance(pattern, list) else str(pattern).split("::")
    urls: list[str] = []
    for pat in patterns:
        pat = pat.strip()
        if not pat:
            continue
        expanded = list(braceexpand.braceexpand(pat))
        if check_exists and not _is_remote(pat):
            present = [u for u in expanded if os.path.exists(u.removeprefix("file://"))]
            if not present:
                raise FileNotFoundError(f"shard pattern {pat!r} matches no file")
            missing = len(expanded) - len(present)
            if missing:
                raise FileNotFoundError(
                    f"shard pattern {pat!r}: {missing} of {len(expanded)} shards do not exist "
                    f"(first missing: {next(u for u in expanded if u not in present)})"
                )
        urls.extend(expanded)
    if not urls:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file")
    return urls
