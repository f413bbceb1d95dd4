"""Which of a testbed scene's skills does the embedded DiT recipe learn: one object, its colour, its shape?

The embedded T2I stays at the GenEval-style floor on the testbed (README, issue 17), while on the one-square
probe (``t2i_one_square.py``) the same recipe learns to draw one object of the prompted colour. This probe sits
between the two: the testbed's own scenes (its renderer: sprite shapes with markings, textured backgrounds,
1-4 objects, rendered at 64 px and resized to 32 px as the T2I data path does), in pixel space (no VAE) and
conditioned on idealised tokens (three fixed random vectors: the scene's category, colour and count; no text
tower). The DiT, recipe (the embedded preset; ``--set`` overrides it), learner, loss, noise schedules and
sampler are the suite's. Samples for every category x colour with count one (two each, 128 images) are read by
the sweep's GenEval judge (``t2i.geneval.ensure_embedded_judge``, cached beside the testbed), head by head:

* ``one_object``: the judge counts one object;
* ``color``: the prompted colour;
* ``category``: the prompted category (the object's shape: GenEval's single-object verdict);
* ``category_and_color``: both (GenEval's colours verdict).

The judge's reading of real renderings of the same prompts (ceiling) and of uniform noise (floor) is printed
first and stored with the rows. ``--conditioning text`` swaps the idealised tokens for the suite's: the
embedded text tower (the sweep's, cached) on each scene's dense ``altogether`` caption (what p = 1 trains
on), or with ``--captions short`` on the scene in GenEval's words; the probe prompts are then GenEval's colour
prompts ("a photo of a red bird"). So one run tells whether the recipe, the scenes or the text path is what
keeps the embedded T2I at the floor.

    python benchmarks/t2i_scene_probe.py --steps 1600,4800 --set timestep_power=2 --out runs/scene_probe
    python benchmarks/t2i_scene_probe.py --steps 4800 --background flat --set timestep_power=2
    python benchmarks/t2i_scene_probe.py --steps 1600,4800 --set timestep_power=2 --conditioning text
    python benchmarks/t2i_scene_probe.py --steps 2000,8000,32000 --device cuda --set timestep_power=2

Writes ``results.json``, ``results.md`` and a sample grid per step count (``samples_<steps>.png``; row r holds
categories 2r and 2r+1 mod 8, eight colours each) in ``--out`` beside ``config.json`` and ``provenance.json``; the
last line printed is ``category_and_color_pct_at_<largest step count>``.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.t2i_one_square import guided_sample, pixel_config, refuses_pixel_keys, save_grid  # noqa: E402
from benchmarks.t2i_steps_to_objects import parse_args, print_step_figures, train_steps  # noqa: E402
from caption_mixing.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from caption_mixing.provenance import write_run_metadata  # noqa: E402
from eval.judge import image_transform, load_judge  # noqa: E402
from t2i.components import load_text_encoder  # noqa: E402
from t2i.embedded import embedded_split  # noqa: E402
from t2i.experiment import resolve  # noqa: E402
from t2i.geneval import ensure_embedded_judge  # noqa: E402
from testbed import ensure_testbed  # noqa: E402
from testbed.captions import train_captions  # noqa: E402
from testbed.geneval import colors_record  # noqa: E402
from testbed.render import BACKGROUND_BASE, make_textures, render  # noqa: E402
from testbed.world import (  # noqa: E402
    BACKGROUNDS,
    CATEGORIES,
    CATEGORY_PLURALS,
    COLORS,
    CONCEPTS,
    COUNT_WORDS,
    POSITIONS,
    TestbedConfig,
)
from training.device import resolve_device  # noqa: E402

SIZE = 32
TOKEN_WIDTH = 64
TRAIN_SCENES = 12_000  # rendered once; ~2.5 epochs at 1600 steps of batch 32 (the testbed has 19k)
COLOR_NAMES = tuple(COLORS)
# every category x colour, one object, twice: 128 samples per step count
PROBE = torch.tensor([(cat, col, 1) for cat in range(len(CATEGORIES)) for col in range(len(COLORS))] * 2)
HEADS = ("one_object", "color", "category", "category_and_color")


def scene_textures(background: str, seed: int, size: int) -> dict[str, np.ndarray]:
    """The testbed's tileable background textures, or flat fields of each background's base colour."""
    if background == "flat":
        return {k: np.full((2 * size, 2 * size, 3), BACKGROUND_BASE[k], np.float32) for k in BACKGROUNDS}
    return make_textures(np.random.default_rng([seed, 0]), size)


def short_caption(category: int, color: int, count: int) -> str:
    """The scene in GenEval's words: "a photo of one red bird", "a photo of three blue fish"."""
    noun = CATEGORIES[category] if count == 1 else CATEGORY_PLURALS[CATEGORIES[category]]
    return f"a photo of {COUNT_WORDS[count - 1]} {COLOR_NAMES[color]} {noun}"


def render_scenes(labels: torch.Tensor, textures: dict[str, np.ndarray], seed: int) -> tuple[torch.Tensor, list[str]]:
    """uint8 [N, 3, 32, 32] and captions: one testbed scene per (category, colour, count) row of ``labels``, drawn
    by the testbed's renderer at its size and resized as the T2I data path resizes (the judge's transform),
    with the testbed's dense ``altogether`` caption of it (what a p = 1 run trains on)."""
    rng, words = np.random.default_rng([seed, 5]), random.Random(seed)
    size, to_tensor = TestbedConfig().image_size, image_transform(SIZE)
    images, captions = [], []
    for cat, col, count in labels.tolist():
        concept = CONCEPTS[cat * 8 + int(rng.integers(8))]
        position = POSITIONS[int(rng.integers(len(POSITIONS)))] if count == 1 else None
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        jpg = render(rng, textures, size, concept, COLOR_NAMES[col], count, position, background)
        with Image.open(io.BytesIO(jpg)) as im:
            images.append(to_tensor(im.convert("RGB")))
        captions.append(train_captions(words, concept, COLOR_NAMES[col], count, position, background).altogether)
    return torch.stack(images), captions


def random_labels(n: int, seed: int) -> torch.Tensor:
    """(category, colour, count) rows, uniform over the testbed's 8 x 8 x 4."""
    g = torch.Generator().manual_seed(seed)
    cat = torch.randint(0, len(CATEGORIES), (n,), generator=g)
    col = torch.randint(0, len(COLORS), (n,), generator=g)
    return torch.stack([cat, col, torch.randint(1, 5, (n,), generator=g)], 1)


class Tokens:
    """Idealised conditioning: one fixed random vector per category, colour and count, and a null one of each
    (the dropped prompt, for guidance)."""

    width = TOKEN_WIDTH

    def __init__(self, seed: int, labels: torch.Tensor | None = None) -> None:
        self.labels = labels  # the training scenes' (category, colour, count), for ``train``
        g = torch.Generator().manual_seed(seed + 1)
        sizes = (len(CATEGORIES), len(COLORS), 4)
        self.tables = [torch.randn(k + 1, TOKEN_WIDTH, generator=g) for k in sizes]
        self.null = list(sizes)

    def __call__(self, labels: torch.Tensor, dropped: torch.Tensor | None = None) -> torch.Tensor:
        idx = [labels[:, 0], labels[:, 1], labels[:, 2] - 1]
        if dropped is not None:
            idx = [torch.where(dropped, null, i) for i, null in zip(idx, self.null, strict=True)]
        return torch.stack([table[i] for table, i in zip(self.tables, idx, strict=True)], 1)

    def train(self, idx: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(self.labels[idx], dropped), torch.ones(len(idx), 3, dtype=torch.long)

    def probe(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden, mask) of the probe's prompts, then of the null prompt, one per probe row."""
        mask = torch.ones(len(PROBE), 3, dtype=torch.long)
        return self(PROBE), mask, self(PROBE, torch.ones(len(PROBE), dtype=torch.bool)), mask


class TextStates:
    """The suite's conditioning: the embedded text tower's states of each scene's dense caption (the empty
    prompt when dropped); the probe prompts are GenEval's colour prompts ("a photo of a red bird")."""

    def __init__(self, text, captions: list[str], batch: int = 256) -> None:
        with torch.no_grad():
            parts = [text.encode(captions[i : i + batch]) for i in range(0, len(captions), batch)]
            self.hidden = torch.cat([h.half() for h, _ in parts])
            self.mask = torch.cat([m for _, m in parts])
            self.empty = text.encode([""])
            records = [colors_record(CATEGORIES[cat], COLOR_NAMES[col]) for cat, col, _ in PROBE.tolist()]
            self.prompts = text.encode([r["prompt"] for r in records])
        self.width = self.hidden.shape[-1]

    def train(self, idx: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = self.hidden[idx].float(), self.mask[idx].clone()
        hidden[dropped], mask[dropped] = self.empty[0][0], self.empty[1][0]
        return hidden, mask

    def probe(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(PROBE)
        return *self.prompts, self.empty[0].expand(n, -1, -1), self.empty[1].expand(n, -1)


def judged(judge, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Share (%) of ``images`` whose judge reading matches ``labels`` per verdict (see the module docstring)."""
    preds = judge.predict([Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images])
    hits = {key: 0 for key in HEADS}
    for p, (cat, col, count) in zip(preds, labels.tolist(), strict=True):
        right_cat, right_col = p["category"] == CATEGORIES[cat], p["color"] == COLOR_NAMES[col]
        hits["one_object"] += p["count"] == count
        hits["color"] += right_col
        hits["category"] += right_cat
        hits["category_and_color"] += right_cat and right_col
    return {key: round(100 * v / len(preds), 1) for key, v in hits.items()}


def sample(cfg, model, conditioning, seed: int) -> torch.Tensor:
    """The probe's prompts through the pipeline's guided sampler (pixel space); uint8 images on the CPU."""
    hidden, mask, null, null_mask = conditioning.probe()
    x = guided_sample(cfg, model, torch.cat([hidden, null]), torch.cat([mask, null_mask]), seed)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte()


def markdown(rows: list[dict], cfg, args, reference: dict) -> str:
    conditioning = "idealised tokens"
    if args.conditioning == "text":
        conditioning = f"the embedded text tower on {args.captions} captions"
    head = (
        f"Scene probe: share (%) of {len(PROBE)} samples (every category x colour, one object) the GenEval judge "
        f"reads as prompted; testbed scenes ({args.background} backgrounds), pixel space, {conditioning}; "
        f"{cfg.prediction_type}, timestep_power {cfg.timestep_power:g}, patch {cfg.patch_size}, lr {cfg.lr:g}, "
        f"seed {cfg.seed}, guidance {cfg.guidance_scale:g}, {cfg.sample_steps} sampler steps\n\n"
    )
    lines = ["| DiT steps | train s | loss | " + " | ".join(HEADS) + " |", "|---" * (len(HEADS) + 3) + "|"]
    for r in rows:
        lines.append(
            f"| {r['steps']} | {r['train_seconds']:.0f} | {r['loss']:.4f} | "
            + " | ".join(f"{r[k]:.1f}" for k in HEADS)
            + " |"
        )
    for name, what in (("real", "real renderings"), ("noise", "uniform noise")):
        lines.append(f"| judge on {what} | | | " + " | ".join(f"{reference[name][k]:.1f}" for k in HEADS) + " |")
    return head + "\n".join(lines) + "\n"


def sweep_judge() -> Path:
    """The embedded sweep's judge folder, trained once and cached beside the testbed (the key ``t2i.experiment``
    gives it: the testbed's held-out shard); needs only the testbed, not the sweep's VAE and text tower."""
    testbed = ensure_testbed()
    holdout = embedded_split(testbed.train_shards)[1]
    return ensure_embedded_judge(Path(testbed.root).parent, SIZE, real_shards=list(holdout))


def add_flags(ap) -> None:
    ap.add_argument("--judge", type=Path, default=None, help="a judge folder (default: the sweep's, cached)")
    ap.add_argument("--train-scenes", type=int, default=TRAIN_SCENES, help="scenes rendered for training")
    ap.add_argument(
        "--conditioning",
        choices=("tokens", "text"),
        default="tokens",
        help="idealised tokens (default) or the embedded text tower on the scenes' dense captions",
    )
    ap.add_argument(
        "--captions",
        choices=("dense", "short"),
        default="dense",
        help="with --conditioning text: the testbed's dense captions (p = 1) or the scene in GenEval's words",
    )
    ap.add_argument(
        "--background",
        choices=("textured", "flat"),
        default="textured",
        help="the testbed's textures (default) or flat fields of their base colours",
    )


def main(argv: list[str] | None = None) -> int:
    args, eval_steps, cfg = parse_args(argv, __doc__, "1600,4800", "runs/scene_probe", add_flags)
    if refuses_pixel_keys(args.set, "t2i_scene_probe.py"):
        return 2
    if args.captions == "short" and args.conditioning != "text":
        print("t2i_scene_probe.py: error: --captions short needs --conditioning text", file=sys.stderr)
        return 2
    if args.train_scenes < 1:
        print(f"t2i_scene_probe.py: error: --train-scenes {args.train_scenes}: must be >= 1", file=sys.stderr)
        return 2
    # the sweep's text tower (built once per testbed and cached) for the preset as configured
    res = resolve(cfg) if args.conditioning == "text" else None
    cfg = pixel_config(cfg)
    device = resolve_device(cfg.device)
    try:
        judge = load_judge(args.judge or sweep_judge())
    except (FileNotFoundError, ValueError) as e:  # the message names the file at fault
        print(f"t2i_scene_probe.py: error: --judge: {e}", file=sys.stderr)
        return 2
    textures = scene_textures(args.background, cfg.seed, TestbedConfig().image_size)
    train_labels = random_labels(args.train_scenes, cfg.seed)
    train_images, captions = render_scenes(train_labels, textures, cfg.seed)
    if args.conditioning == "text":
        if args.captions == "short":
            captions = [short_caption(*row) for row in train_labels.tolist()]
        conditioning = TextStates(load_text_encoder(res.text_encoder, cfg.max_sequence_length), captions)
    else:
        conditioning = Tokens(cfg.seed, train_labels)
    real, _ = render_scenes(PROBE, textures, cfg.seed + 99)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(cfg.seed))
    reference = {"real": judged(judge, real, PROBE), "noise": judged(judge, noise, PROBE)}
    print(f"judge on real renderings: {reference['real']}, on noise: {reference['noise']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    probe_flags = {k: getattr(args, k) for k in ("background", "conditioning", "captions", "train_scenes")}
    write_run_metadata(args.out, {**cfg.to_dict(), **probe_flags}, cfg.seed)

    def next_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(train_images), (cfg.batch_size,), generator=gen, device=gen.device).cpu()
        dropped = torch.rand(cfg.batch_size, generator=gen, device=gen.device).cpu() < cfg.caption_dropout
        images = train_images[idx].float() / 127.5 - 1
        hidden, mask = conditioning.train(idx, dropped)
        return images.to(device), hidden.to(device), mask.to(device)

    def evaluate(step: int, model: torch.nn.Module) -> dict:
        images = sample(cfg, model, conditioning, cfg.seed + 3)
        save_grid(images.float() / 127.5 - 1, args.out / f"samples_{step}.png", n_rows=8)
        return judged(judge, images, PROBE)

    def save(rows: list[dict]) -> None:
        doc = {"config": cfg.to_dict(), **probe_flags, "device": device, "judge": reference, "rows": rows}
        atomic_write_json(args.out / "results.json", doc)
        atomic_write_text(args.out / "results.md", markdown(rows, cfg, args, reference))

    rows = train_steps(cfg, conditioning.width, eval_steps, next_batch, evaluate, save)
    print_step_figures(rows, HEADS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
