"""benchmarks/t2i_one_square.py: the probe's judge is exact on its own renderings and strict on what is not one
square; the script trains through the suite's learner and writes its figures."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks import t2i_one_square as probe


def _canvas(background: int = 0) -> torch.Tensor:
    return probe.BACKGROUNDS[background][:, None, None].repeat(1, probe.SIZE, probe.SIZE)


def test_judge_accepts_renderings_and_rejects_noise_pieces_and_wrong_colours() -> None:
    images, colors = probe.render(256, torch.Generator().manual_seed(0))
    assert probe.accuracy(images, colors) == {"one_object": 100.0, "one_square": 100.0}
    noise = torch.rand(96, 3, probe.SIZE, probe.SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert probe.accuracy(noise, torch.arange(6).repeat_interleave(16)) == {"one_object": 0.0, "one_square": 0.0}

    red, blue = probe.COLORS[0][:, None, None], probe.COLORS[1][:, None, None]
    square = _canvas()
    square[:, 4:16, 4:16] = red
    assert probe.verdict(square, 0) == {"one_object": True, "one_square": True}
    assert probe.verdict(square, 1) == {"one_object": False, "one_square": False}  # not the prompted colour
    two = square.clone()
    two[:, 20:31, 18:29] = red
    assert probe.verdict(two, 0)["one_object"] is False  # two objects
    ragged = _canvas(2)  # one object, not a square: a cross
    ragged[:, 4:24, 12:16] = blue
    ragged[:, 12:16, 2:26] = blue
    assert probe.verdict(ragged, 1) == {"one_object": True, "one_square": False}
    pieces = square.clone()
    pieces[:, 28:30, 28:30] = red  # a few stray pixels beside the square
    pieces[:, 24:26, 2:4] = red
    pieces[:, 2:4, 28:30] = red
    pieces[:, 28:30, 10:12] = red
    assert probe.verdict(pieces, 0) == {"one_object": True, "one_square": False}


def test_probe_trains_samples_and_writes_its_figures(tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe"
    assert probe.main(["--steps", "1,2", "--out", str(out), "--set", "sample_steps=2"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["steps"] for r in doc["rows"]] == [1, 2]
    assert doc["judge"] == {
        "real": {"one_object": 100.0, "one_square": 100.0},
        "noise": {"one_object": 0.0, "one_square": 0.0},
    }
    assert doc["config"]["latent_channels"] == 3 and doc["config"]["sample_steps"] == 2
    assert (out / "samples_2.png").is_file() and (out / "provenance.json").is_file()
    assert "| 2 |" in (out / "results.md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"one_square_pct_at_2={doc['rows'][-1]['one_square']}"
