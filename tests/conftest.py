"""Shared fixtures: tiny img2dataset-style shards with caption sidecars, written per test."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from caption_mixing.sidecar import sidecar_path, write_sidecar


def signal_self_after_first_checkpoint(ckpt_dir: Path, sig: int = signal.SIGUSR1) -> None:
    """Send ``sig`` to this process (a trainer on its main thread) once ``ckpt_dir`` holds a checkpoint."""
    from clip_train.checkpoint import list_checkpoints

    def wait_then_signal() -> None:
        while not list_checkpoints(ckpt_dir):
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    threading.Thread(target=wait_then_signal, daemon=True).start()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def make_shards(
    root: Path,
    n_shards: int = 4,
    per_shard: int = 50,
    source: str = "altogether",
    missing: frozenset[str] = frozenset(),
    blank: frozenset[str] = frozenset(),
) -> tuple[str, list[str]]:
    """Write shards ``root/0000i.tar`` and their ``source`` sidecars; return (brace pattern, keys)."""
    root.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    img = jpeg_bytes((200, 30, 30))
    for s in range(n_shards):
        shard = root / f"{s:05d}.tar"
        captions = {}
        with tarfile.open(shard, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                keys.append(key)
                _add(tar, f"{key}.jpg", img)
                _add(tar, f"{key}.txt", f"alt text {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
                if key in missing:
                    continue
                captions[key] = "" if key in blank else f"a dense synthetic caption of sample {key}"
        write_sidecar(sidecar_path(shard, source), shard, source, captions)
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar"), keys


@pytest.fixture
def shards(tmp_path: Path) -> tuple[str, list[str]]:
    return make_shards(tmp_path / "shards")
