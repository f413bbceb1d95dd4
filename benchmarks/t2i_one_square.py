"""Can the embedded text-to-image recipe draw ONE object? A probe with exact ground truth.

The testbed's GenEval-style prompts need the DiT to draw a few compact, single-coloured objects, and the
embedded T2I stays at the judge's floor there (issue 17, README). This probe keeps only that skill: 32 px
images of one flat square (9-14 px, one of 6 colours, anywhere) on a flat background (one of 3 colours),
in pixel space (no VAE) and conditioned on one token per colour (fixed random vectors: no text tower). The
DiT, its recipe (the embedded preset; ``--set`` overrides it), the learner, the loss and the noise schedules
are the suite's (``t2i_steps_to_objects.train_steps``, ``t2i.train.diffusion_loss``, ``t2i.model``). Samples
come from the preset's sampler (DPM-Solver++, ``sample_steps``, classifier-free guidance at
``guidance_scale``), run here on the DiT alone because the pipeline needs a VAE and a tokenizer.

A rule-based judge reads connected components of the pixels away from the background colour and gives two
verdicts (``verdict``): "one object" (one blob of the prompted colour, any shape) and "one square" (that blob
is also a compact square, with nothing else in the image). It accepts every rendered training image and no
uniform noise; both are measured at the start and printed.

    python benchmarks/t2i_one_square.py --steps 1600,4800 --out runs/one_square
    python benchmarks/t2i_one_square.py --steps 1600 --set prediction_type=sample --set patch_size=8
    python benchmarks/t2i_one_square.py --steps 2000,8000,32000 --device cuda    # a GPU session

Writes ``results.json``, ``results.md`` and a sample grid per step count (``samples_<steps>.png``: a row per
colour) in ``--out``, beside ``config.json`` and ``provenance.json``; the last line printed is
``one_square_pct_at_<largest step count>`` (after ``one_object_pct_at_...``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.t2i_steps_to_objects import parse_args, print_step_figures, train_steps  # noqa: E402
from caption_mixing.atomic import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from caption_mixing.provenance import write_run_metadata  # noqa: E402
from t2i.model import sample_scheduler  # noqa: E402
from training.device import resolve_device  # noqa: E402

SIZE = 32
SQUARE_SIDES = (9, 14)  # inclusive
COLORS = torch.tensor([[230, 40, 40], [40, 80, 230], [240, 220, 40], [40, 180, 60], [160, 60, 200], [250, 140, 30]])
BACKGROUNDS = torch.tensor([[200, 180, 130], [120, 170, 230], [60, 120, 60]])
COLORS, BACKGROUNDS = COLORS.float() / 127.5 - 1, BACKGROUNDS.float() / 127.5 - 1
TOKEN_WIDTH = 64
PER_COLOR = 16  # samples per colour and step count
JUDGED = ("one_object", "one_square")


def render(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in [-1, 1] (on the CPU) and their square's colour index, drawn from ``gen`` on its device."""
    dev = gen.device
    color = torch.randint(0, len(COLORS), (n,), generator=gen, device=dev).cpu()
    background = torch.randint(0, len(BACKGROUNDS), (n,), generator=gen, device=dev).cpu()
    x = BACKGROUNDS[background][:, :, None, None].repeat(1, 1, SIZE, SIZE)
    sides = torch.randint(SQUARE_SIDES[0], SQUARE_SIDES[1] + 1, (n,), generator=gen, device=dev).cpu()
    corners = torch.rand(n, 2, generator=gen, device=dev).cpu()
    for i in range(n):
        s = int(sides[i])
        y0, x0 = (corners[i] * (SIZE - s + 1)).long().tolist()
        x[i, :, y0 : y0 + s, x0 : x0 + s] = COLORS[color[i]][:, None, None]
    return x, color


def verdict(image: torch.Tensor, color: int) -> dict[str, bool]:
    """Connected components of the pixels away from the background colour.

    ``one_object``: the largest component is of colour ``color``, holds at least 85% of the foreground and
    50-400 px (the squares have 81-196), so one object, of any shape; ``one_square``: it is also compact (its box
    filled > 70%, at most 256 px) with at most 12 stray pixels besides.
    """
    pixels = image.clamp(-1, 1).permute(1, 2, 0).reshape(-1, 3)
    background = BACKGROUNDS[torch.cdist(pixels.median(0).values[None], BACKGROUNDS).argmin()]
    foreground = ((image - background[:, None, None]).norm(dim=0) > 0.35).numpy()
    labels, n = ndimage.label(foreground)
    if n == 0:
        return {"one_object": False, "one_square": False}
    sizes = np.asarray(ndimage.sum(foreground, labels, range(1, n + 1)))
    largest = int(sizes.argmax())
    part = labels == largest + 1
    area, stray = sizes[largest], sizes.sum() - sizes[largest]
    mean = image[:, torch.from_numpy(part)].mean(1)
    one_object = bool(
        50 <= area <= 400 and area >= 0.85 * sizes.sum() and torch.cdist(mean[None], COLORS).argmin() == color
    )
    ys, xs = np.nonzero(part)
    fill = area / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return {"one_object": one_object, "one_square": bool(one_object and fill > 0.7 and area <= 256 and stray <= 12)}


def accuracy(images: torch.Tensor, colors: torch.Tensor) -> dict[str, float]:
    """Share (%) of images per verdict."""
    verdicts = [verdict(im, int(c)) for im, c in zip(images, colors, strict=True)]
    return {key: round(100 * float(np.mean([v[key] for v in verdicts])), 1) for key in JUDGED}


def refuses_pixel_keys(sets: list[str], script: str) -> bool:
    """True (after saying so on stderr) when ``--set`` names a key a pixel-space probe fixes, rather than
    ignoring the flag."""
    fixed = sorted({kv.split("=", 1)[0] for kv in sets} & {"latent_channels", "latent_size", "resolution"})
    if fixed:
        print(f"{script}: error: --set {fixed[0]}: fixed by the probe (3-channel pixels, {SIZE} px)", file=sys.stderr)
    return bool(fixed)


def pixel_config(cfg):
    """Pixels stand in for latents: 3 channels at the image size."""
    return dataclasses.replace(cfg, latent_channels=3, latent_size=SIZE, resolution=SIZE)


def color_tokens(seed: int) -> torch.Tensor:
    """One conditioning token per colour, and the last one for the dropped (empty) prompt."""
    return torch.randn(len(COLORS) + 1, 1, TOKEN_WIDTH, generator=torch.Generator().manual_seed(seed + 1))


@torch.no_grad()
def guided_sample(cfg, model, states: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """The pipeline's guided DPM-Solver++ loop on the DiT alone (pixel space): ``states``/``mask`` hold the
    prompts' text states, then as many of the null prompt's; images in [-1, 1] on the CPU."""
    device = next(model.parameters()).device
    n = len(states) // 2
    x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(device)
    states, mask = states.to(device), mask.to(device)
    sched = sample_scheduler(cfg)
    sched.set_timesteps(cfg.sample_steps)
    for t in sched.timesteps:
        out = model(
            torch.cat([x, x]),
            encoder_hidden_states=states,
            timestep=t.expand(2 * n).to(device),
            encoder_attention_mask=mask,
        )
        cond, uncond = out.sample[:, :3].chunk(2)
        x = sched.step(uncond + cfg.guidance_scale * (cond - uncond), t, x).prev_sample
    return x.cpu()


def sample(cfg, model, tokens: torch.Tensor, colors: torch.Tensor, seed: int) -> torch.Tensor:
    """Samples for ``colors``, guided against the empty prompt's token."""
    n = len(colors)
    hidden = torch.cat([tokens[colors], tokens[[-1] * n]])
    return guided_sample(cfg, model, hidden, torch.ones(2 * n, 1, dtype=torch.long), seed)


def save_grid(images: torch.Tensor, path: Path, n_rows: int = len(COLORS)) -> None:
    """Images in [-1, 1] in ``n_rows`` rows (here one per colour), 2x nearest-neighbour so that a person sees
    the pixels."""
    rows = images.clamp(-1, 1).view(n_rows, -1, 3, SIZE, SIZE)
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    pixels = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    grid = Image.fromarray(pixels).resize((pixels.shape[1] * 2, pixels.shape[0] * 2), Image.NEAREST)
    atomic_write(path, lambda f: grid.save(f, format="PNG"))


def markdown(rows: list[dict], cfg, reference: dict) -> str:
    judge = ", ".join(f"{k.replace('_', ' ')} {reference['real'][k]:.1f} / {reference['noise'][k]:.1f}" for k in JUDGED)
    head = (
        f"One-square probe: share (%) of {PER_COLOR * len(COLORS)} samples judged to hold one object / one square "
        f"of the prompted colour (judge on rendered images / on noise: {judge}); patch {cfg.patch_size}, "
        f"{cfg.prediction_type}, lr {cfg.lr:g}, seed {cfg.seed}, guidance {cfg.guidance_scale:g}, "
        f"{cfg.sample_steps} sampler steps\n\n"
    )
    lines = ["| DiT steps | train s | loss | one object | one square |", "|---|---|---|---|---|"]
    for r in rows:
        judged = " | ".join(f"{r[key]:.1f}" for key in JUDGED)
        lines.append(f"| {r['steps']} | {r['train_seconds']:.0f} | {r['loss']:.4f} | {judged} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, eval_steps, cfg = parse_args(argv, __doc__, "1600,4800", "runs/one_square")
    if refuses_pixel_keys(args.set, "t2i_one_square.py"):
        return 2
    cfg = pixel_config(cfg)
    device = resolve_device(cfg.device)
    tokens = color_tokens(cfg.seed)
    probe_colors = torch.arange(len(COLORS)).repeat_interleave(PER_COLOR)
    real, real_colors = render(512, torch.Generator().manual_seed(cfg.seed + 2))
    noise = torch.rand(len(probe_colors), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(cfg.seed)) * 2 - 1
    reference = {"real": accuracy(real, real_colors), "noise": accuracy(noise, probe_colors)}
    print(f"judge on rendered images: {reference['real']}, on noise: {reference['noise']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_run_metadata(args.out, cfg.to_dict(), cfg.seed)

    def next_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, colors = render(cfg.batch_size, gen)
        dropped = torch.rand(cfg.batch_size, generator=gen, device=gen.device).cpu() < cfg.caption_dropout
        hidden = tokens[torch.where(dropped, len(COLORS), colors)]
        return images.to(device), hidden.to(device), torch.ones(cfg.batch_size, 1, dtype=torch.long, device=device)

    def evaluate(step: int, model: torch.nn.Module) -> dict:
        images = sample(cfg, model, tokens, probe_colors, cfg.seed + 3)
        save_grid(images, args.out / f"samples_{step}.png")
        return accuracy(images, probe_colors)

    def save(rows: list[dict]) -> None:
        doc = {"config": cfg.to_dict(), "device": device, "judge": reference, "rows": rows}
        atomic_write_json(args.out / "results.json", doc)
        atomic_write_text(args.out / "results.md", markdown(rows, cfg, reference))

    rows = train_steps(cfg, TOKEN_WIDTH, eval_steps, next_batch, evaluate, save)
    print_step_figures(rows, JUDGED)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
