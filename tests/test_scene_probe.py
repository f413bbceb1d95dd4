"""benchmarks/t2i_scene_probe.py: idealised tokens, testbed renderings in pixel space, verdicts per judge head,
and the script end to end through the suite's learner."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks import t2i_scene_probe as probe
from eval.judge import train_judge
from testbed.world import CATEGORIES, COLORS


def test_tokens_name_the_scene_and_dropped_prompts_get_the_null_tokens() -> None:
    tokens = probe.Tokens(0)
    labels = torch.tensor([[0, 1, 1], [0, 1, 1], [3, 1, 4], [0, 5, 1]])
    hidden = tokens(labels)
    assert hidden.shape == (4, 3, probe.TOKEN_WIDTH)
    assert torch.equal(hidden[0], hidden[1])
    assert torch.equal(hidden[2, 1], hidden[0, 1]) and not torch.equal(hidden[2, 0], hidden[0, 0])  # category
    assert not torch.equal(hidden[2, 2], hidden[0, 2]) and not torch.equal(hidden[3, 1], hidden[0, 1])
    dropped = tokens(labels, torch.tensor([False, True, True, False]))
    assert torch.equal(dropped[1], dropped[2]) and torch.equal(dropped[0], hidden[0])
    assert all(not torch.equal(dropped[1, k], hidden[1, k]) for k in range(3))


def test_renderings_are_deterministic_and_flat_backgrounds_are_flat() -> None:
    labels = probe.random_labels(24, 0)
    assert labels[:, 2].min() >= 1 and labels[:, 2].max() <= 4
    textured = probe.scene_textures("textured", 0, 64)
    images, captions = probe.render_scenes(labels, textured, 0)
    assert images.shape == (24, 3, probe.SIZE, probe.SIZE) and images.dtype == torch.uint8
    assert torch.equal(images, probe.render_scenes(labels, textured, 0)[0]) and len(captions) == 24
    assert all(probe.COLOR_NAMES[col] in c for (_, col, _), c in zip(labels.tolist(), captions, strict=True))
    one_object = torch.tensor([[c, k, 1] for c in range(4) for k in range(2)] * 3)  # centred or at a side
    corners = {
        kind: probe.render_scenes(one_object, probe.scene_textures(kind, 0, 64), 1)[0][:, :, :4, :4].float()
        for kind in ("textured", "flat")
    }
    spread = {kind: c.flatten(2).std(2).mean().item() for kind, c in corners.items()}
    assert spread["flat"] < 0.5 * spread["textured"], spread


class Table:
    """A judge that reads every image as the same (category, colour, count)."""

    def __init__(self, category: str, color: str, count: int) -> None:
        self.pred = {"category": category, "color": color, "count": count}

    def predict(self, images: list) -> list[dict]:
        return [dict(self.pred) for _ in images]


def test_each_verdict_reads_its_own_head() -> None:
    images = torch.zeros(4, 3, probe.SIZE, probe.SIZE, dtype=torch.uint8)
    labels = torch.tensor([[2, 3, 1], [2, 4, 1], [5, 3, 1], [5, 4, 2]])
    judge = Table(CATEGORIES[2], tuple(COLORS)[3], 1)
    assert probe.judged(judge, images, labels) == {
        "one_object": 75.0,
        "color": 50.0,
        "category": 50.0,
        "category_and_color": 25.0,
    }


def test_probe_trains_samples_and_writes_its_figures(tmp_path: Path, capsys) -> None:
    judge = tmp_path / "judge"
    train_judge(judge, resolution=32, seed=0, progress=False, steps=20, train_images=256, eval_images=64)
    out = tmp_path / "probe"
    argv = ["--steps", "1,2", "--out", str(out), "--judge", str(judge), "--train-scenes", "64"]
    assert probe.main([*argv, "--background", "flat", "--set", "sample_steps=2"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["steps"] for r in doc["rows"]] == [1, 2] and doc["background"] == "flat"
    assert set(doc["judge"]) == {"real", "noise"} and set(doc["rows"][0]) >= set(probe.HEADS)
    assert doc["config"]["latent_channels"] == 3 and doc["config"]["sample_steps"] == 2
    assert (out / "samples_2.png").is_file() and (out / "provenance.json").is_file()
    assert "judge on real renderings" in (out / "results.md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"category_and_color_pct_at_2={doc['rows'][-1]['category_and_color']}"
    assert probe.main([*argv, "--set", "resolution=64"]) == 2
    assert probe.main([*argv, "--train-scenes", "0"]) == 2
    assert probe.main([*argv, "--captions", "short"]) == 2  # captions only mean something for the text tower
    assert probe.main([*argv, "--judge", str(tmp_path / "nope")]) == 2  # the last --judge wins
    assert (
        probe.short_caption(1, 2, 3) == f"a photo of three {tuple(COLORS)[2]} {probe.CATEGORY_PLURALS[CATEGORIES[1]]}"
    )


class FakeText:
    """A text tower whose state at each position is the prompt's length and word count, so tests can tell
    prompts apart; the mask covers the words."""

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.zeros(len(prompts), 6, 4)
        mask = torch.zeros(len(prompts), 6, dtype=torch.long)
        for i, p in enumerate(prompts):
            hidden[i, :, 0], hidden[i, :, 1] = len(p), len(p.split())
            mask[i, : min(6, len(p.split()) + 1)] = 1
        return hidden, mask


def test_text_states_train_on_captions_drop_to_the_empty_prompt_and_probe_geneval_prompts() -> None:
    captions = ["one red bird on sand", "two blue fish", "a green shell"]
    states = probe.TextStates(FakeText(), captions, batch=2)
    assert states.width == 4 and states.hidden.shape == (3, 6, 4)
    hidden, mask = states.train(torch.tensor([2, 0]), torch.tensor([False, True]))
    assert hidden[0, 0, 0] == len("a green shell") and mask[0].sum() == 4
    assert hidden[1, 0, 0] == 0 and mask[1].sum() == 1  # the empty prompt
    prompts, prompt_mask, null, null_mask = states.probe()
    assert len(prompts) == len(null) == len(probe.PROBE) and (null[:, 0, 0] == 0).all()
    first = f"a photo of {'an' if tuple(COLORS)[0][0] in 'aeiou' else 'a'} {tuple(COLORS)[0]} {CATEGORIES[0]}"
    assert prompts[0, 0, 0] == len(first) and prompt_mask[0].sum() == min(6, len(first.split()) + 1)
