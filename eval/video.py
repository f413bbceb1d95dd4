"""The middle frame of a video as JPEG bytes (UCF101 / Kinetics700 are evaluated on frames).

Decoded with PyAV (``av`` on PyPI, FFmpeg bindings), a maintained library that reads .avi and .mp4.
"""

from __future__ import annotations

import io
from pathlib import Path

import av


def middle_frame_jpeg(path: str | Path, quality: int = 95) -> bytes:
    """JPEG of frame ``n // 2`` of the first video stream, counting frames by decoding when needed."""
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            n = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
        if n == 0:
            raise ValueError(f"{path}: video has no frames")
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i == n // 2:
                    buf = io.BytesIO()
                    frame.to_image().convert("RGB").save(buf, format="JPEG", quality=quality)
                    return buf.getvalue()
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot decode video ({e})") from e
    raise ValueError(f"{path}: decoded fewer frames than the container reported ({n})")
