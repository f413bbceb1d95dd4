"""Image shards -> latent shards (``python -m t2i precompute``), so training skips the VAE encoder.

Each latent shard keeps the image shard's stem and file name, the sample keys, the alt-text
(``{key}.txt``) and metadata (``{key}.json``); ``{key}.latent.npy`` holds the VAE posterior
(mean and log-variance stacked on channels, float16), so training still samples latents.
Synthetic captions stay in the image shards' sidecars: ``latents.json`` records that folder as
``sidecar_dir``, and caption mixing happens at train time exactly as with images.
Shards already written are skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from caption_mixing.atomic import atomic_write, atomic_write_json
from caption_mixing.paths import check_output_dir
from caption_mixing.pipeline import DataErrors, decode_images, decode_text, read_shards
from caption_mixing.shards import expand_shards
from t2i.components import load_vae
from t2i.data import LATENT_MEMBER, LATENTS_MANIFEST
from t2i.embedded import image_tensor_transform
from training.device import resolve_device


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def precompute_shard(
    url: str, out_path: Path, vae, resolution: int, batch_size: int, device: str, errors: DataErrors | None = None
) -> int:
    """Encode one shard; returns the number of samples written. Damaged tars, corrupt images and
    non-UTF-8 alt-text are logged and counted in ``errors`` (the rest of the shard is encoded)."""
    errors = DataErrors() if errors is None else errors
    tf = image_tensor_transform(resolution)
    samples = wds.DataPipeline(wds.SimpleShardList([url]), read_shards(errors), decode_images(errors))
    members: list[tuple[str, bytes, bytes]] = []
    buf: list[tuple[str, torch.Tensor, bytes, bytes]] = []

    def flush() -> None:
        x = torch.stack([b[1] for b in buf]).to(device, vae.dtype)
        params = vae.encode(x).latent_dist.parameters.float().cpu().numpy().astype(np.float16)
        for (key, _, txt, meta), p in zip(buf, params, strict=True):
            members.append((key, _npy(p), txt, meta))
        buf.clear()

    for s in samples:
        txt = decode_text(s.get("txt"), url, s["__key__"], errors).encode("utf-8")
        buf.append((s["__key__"], tf(s["image"]), txt, s.get("json") or b"{}"))
        if len(buf) == batch_size:
            flush()
    if buf:
        flush()

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w") as tar:
            for key, lat, txt, meta in members:
                _add(tar, f"{key}.{LATENT_MEMBER}", lat)
                _add(tar, f"{key}.txt", txt)
                _add(tar, f"{key}.json", meta)

    atomic_write(out_path, write)
    return len(members)


def precompute(
    shards: str,
    out: Path,
    vae_path: str,
    resolution: int,
    batch_size: int = 64,
    sidecar_dir: str | None = None,
    device: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Encode every shard of ``shards`` into ``out``; write ``out/latents.json``; return it."""
    device = resolve_device(device)
    urls = expand_shards(shards)
    folders = {str(Path(u).parent) for u in urls}
    if sidecar_dir is None and len(folders) > 1:
        raise ValueError(f"--shards spans several folders {sorted(folders)}: pass --sidecar-dir")
    out = check_output_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    vae = load_vae(vae_path, device, allow_pickle)
    total, shape, errors = 0, None, DataErrors()
    for url in tqdm(urls, desc="precompute", unit="shard", dynamic_ncols=True):
        dest = out / Path(url).name
        if dest.exists():
            continue
        total += precompute_shard(url, dest, vae, resolution, batch_size, device, errors)
    with tarfile.open(out / Path(urls[0]).name) as tar:
        first = next(m for m in tar.getmembers() if m.name.endswith(LATENT_MEMBER))
        shape = list(np.load(io.BytesIO(tar.extractfile(first).read()), allow_pickle=False).shape)
    manifest = {
        "format": "t2i.latents/1",
        "source_shards": shards,
        "sidecar_dir": str(Path(sidecar_dir).resolve()) if sidecar_dir else str(Path(next(iter(folders))).resolve()),
        "vae": str(Path(vae_path).resolve()),
        "scaling_factor": vae.config.scaling_factor,
        "resolution": resolution,
        "moments_shape": shape,
        "num_shards": len(urls),
        "samples_written_this_run": total,
        "data_errors_this_run": dict(errors),
    }
    return atomic_write_json(out / LATENTS_MANIFEST, manifest)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / LATENTS_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no latents manifest (made by `python -m t2i precompute`)")
    return json.loads(path.read_text())
