"""How a caption record finds its sample: the join keys ``attach`` understands.

- ``key``: the sample key (the tar member name without extension).
- ``url``: the ``url`` in the sample's ``{key}.json`` (img2dataset writes the *input* URL, not the
  one after redirects). The raw form is tried first; a miss is retried with both sides
  normalized (``normalize_url``), because releases and downloaders spell the same URL differently.
- ``sha256``: the SHA-256 of the image bytes, from ``{key}.json`` (img2dataset's ``sha256`` of
  the downloaded bytes) or computed from the image member when the json has none (which matches
  only when the shard keeps the bytes as downloaded, i.e. no re-encoding).
- ``uid``: DataComp's ``uid`` in ``{key}.json``.
- ``row``: the row index of the downloader's input file (LaCLIP's rewrites are line-aligned with
  CC-12M's TSV). img2dataset's key is ``shard_id * 10**digits + index_in_shard``; with
  ``number_sample_per_shard`` rows per shard that is row ``shard_id * rows_per_shard + index``,
  equal to the key itself for the default 10,000. Keys do not survive a re-ordered input file,
  so a row join is checked against the original caption (``attach --original``).
- ``member``: the caption is inside the shard (``{key}.{ext}`` or a field of ``{key}.json``).
"""

from __future__ import annotations

import math
import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

JOINS = ("key", "url", "sha256", "uid", "row", "member")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_QUERY_SAFE = "/?:@!$&'()*+,;=-._~"
_MAYBE_ODD = re.compile(r"[A-Z%]|:\d|/$|[^\x21-\x7e]")


def normalize_url(url: str) -> str:
    """A canonical spelling of ``url``: lower-case scheme and host, no default port, no trailing
    slash on the path, and one percent-encoding (unreserved characters decoded, the rest encoded
    with upper-case hex). Two spellings of one resource map to the same string."""
    if not _MAYBE_ODD.search(url):
        return url  # already canonical: the common case, skipped fast
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if parts.username is not None:
        cred = parts.username + (f":{parts.password}" if parts.password is not None else "")
        host = f"{cred}@{host}"
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    path = quote(unquote(parts.path), safe=_PATH_SAFE).rstrip("/")
    query = quote(unquote(parts.query), safe=_QUERY_SAFE)
    return urlunsplit((scheme, host, path, query, parts.fragment))


def row_of_key(key: str, rows_per_shard: int = 10000) -> int | None:
    """The input-file row of an img2dataset sample key (None for a key that is not a number)."""
    if not key.isdigit():
        return None
    digits = max(1, math.ceil(math.log10(rows_per_shard)))
    shard_id, index = divmod(int(key), 10**digits)
    if index >= rows_per_shard:
        return None
    return shard_id * rows_per_shard + index


def same_text(a: str | None, b: str | None) -> bool:
    """Captions equal up to surrounding and repeated whitespace (TSV and tar round trips differ there)."""
    if a is None or b is None:
        return False
    return " ".join(a.split()) == " ".join(b.split())


def join_value(join: str, key: str, meta: dict, image_sha256: str | None, shard_field: str | None) -> str | None:
    """The value a sample is joined on (None when the sample has none, e.g. no url in its json)."""
    if join in ("key", "member"):
        return key
    if join == "sha256":
        value = meta.get(shard_field or "sha256")
        if isinstance(value, str) and value:
            return value.lower()
        return image_sha256
    value = meta.get(shard_field or join)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else str(value)
    return value if isinstance(value, str) and value else None
