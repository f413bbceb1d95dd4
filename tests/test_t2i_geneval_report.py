"""Text-to-image sweep report (issue 17): GenEval-style columns with the judge's ceiling and floor, the
distribution metrics, the CSV, the accuracy-vs-p plot and the self-contained HTML page."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.geneval import sample_path

TAGS = ("single_object", "counting", "colors")
NA = {t: "needs two objects in one scene" for t in ("two_object", "position", "color_attr")}


def _geneval(acc: dict[str, float]) -> dict:
    per = {t: acc.get(t) for t in (*TAGS, *NA)}
    return {
        "overall": sum(acc.values()) / len(acc),
        "per_category": per,
        "n_images": {t: 32 for t in TAGS},
        "not_applicable": NA,
    }


def _run(tmp: Path, p: float, seed: int, acc: dict[str, float], fd: float) -> dict:
    """A metrics dict as ``t2i.experiment`` writes it, with a run folder holding samples and GenEval images."""
    run_dir = tmp / f"t2i-p{p:g}-s{seed}"
    samples = run_dir / "samples"
    rows, readings = [], []
    for i in range(3):
        key = f"k{i}"
        for col, shade in (("alt", 40), ("synthetic", 200)):
            (samples / col).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (shade, i * 50, 0)).save(samples / col / f"{key}.png")
        rows.append({"key": key, "alt": f"stock photo <{i}>", "synthetic": f"a red bird number {i}", "seed": i})
        pred = {"category": "bird", "color": "red", "count": 1}
        readings.append(
            {
                "key": key,
                "truth": pred,
                "alt": {**pred, "color": "blue", "match": {"category": True, "color": False, "count": True}},
                "synthetic": {**pred, "match": {"category": True, "color": True, "count": True}},
            }
        )
    (samples / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (samples / "judge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in readings))
    folder = run_dir / "geneval"
    verdicts = []
    for index, tag in enumerate(TAGS):
        for n in range(2):
            sample_path(folder, index, n).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (0, 0, 100 + 50 * n)).save(sample_path(folder, index, n))
            ok = n == 0
            verdicts.append(
                {"index": index, "sample": n, "tag": tag, "prompt": f"a photo of a {tag} thing", "correct": ok}
                | {"reason": "" if ok else "expected red, found blue"}
                | {"predicted": {"category": "bird", "color": "red" if ok else "blue", "count": 1}}
            )
    (folder / "geneval.json").write_text(json.dumps({"scores": {"verdicts": verdicts}}))
    geneval = _geneval(acc) | {"images_per_prompt": 4, "folder": str(folder)}
    geneval["judge"] = {"real": _geneval({t: 0.9 for t in TAGS}), "noise": _geneval({t: 0.1 for t in TAGS})}
    kinds = {"original": fd + 1, "synthetic": fd, "noise": 3.5}
    return {
        "p": p,
        "seed": seed,
        "steps": 600,
        "eval_prompts": 32,
        "clip_score": {"original": 30.0, "synthetic": 40.0 + p},
        "run_dir": str(run_dir),
        "geneval": geneval,
        "distribution": {
            "clip_fd": kinds,
            "n_real": 32,
            "n_generated": {"original": 32, "synthetic": 32, "noise": 32},
        },
    }


def _runs(tmp: Path) -> list[dict]:
    return [
        _run(tmp, 0.0, 0, {"single_object": 0.50, "counting": 0.25, "colors": 0.40}, 1.0),
        _run(tmp, 0.0, 1, {"single_object": 0.60, "counting": 0.25, "colors": 0.50}, 1.2),
        _run(tmp, 1.0, 0, {"single_object": 0.80, "counting": 0.30, "colors": 0.70}, 0.5),
        _run(tmp, 1.0, 1, {"single_object": 0.82, "counting": 0.20, "colors": 0.74}, 0.6),
    ]


def test_geneval_table_has_categories_ceiling_floor_and_seed_spread(tmp_path: Path) -> None:
    from t2i.report import distribution_table, geneval_table

    runs = _runs(tmp_path)
    table = geneval_table(runs)
    rows = table.splitlines()
    assert rows[0] == "| training data | seeds | overall | single_object | counting | colors | images per category |"
    # p=0: mean ± std over seeds 0,1; p=1: with the difference from p=0, starred only beyond the seed spread.
    assert rows[2].startswith("| alt-texts only (p=0) | 0,1 | 41.7 ± 4.7 | 55.0 ± 7.1 | 25.0 ± 0.0 | 45.0 ± 7.1 |")
    assert "| 81.0 ± 1.4 (+26.0 *) |" in rows[3] and "| 25.0 ± 7.1 (+0.0) |" in rows[3]
    assert "| 72.0 ± 2.8 (+27.0 *) |" in rows[3]
    assert rows[4] == "| judge on real testbed renderings (ceiling) | - | 90.0 | 90.0 | 90.0 | 90.0 | - |"
    assert rows[5] == "| judge on uniform noise (floor) | - | 10.0 | 10.0 | 10.0 | 10.0 | - |"
    assert "two_object" not in rows[0] and "- n/a `position`: needs two objects in one scene" in table
    dist = distribution_table(runs).splitlines()
    assert dist[0].startswith("| training data | seeds | CLIP-FD original | CLIP-FD synthetic |")
    assert "FID" not in dist[0]  # no Inception weights in these runs
    assert dist[2].startswith("| alt-texts only (p=0) | 0,1 | 2.100 ± 0.141 | 1.100 ± 0.141 |")
    assert dist[-1] == "| uniform-noise images (reference) | - | 3.500 | 3.500 | 32 / 32 |"
    assert geneval_table([{"p": 0.0, "clip_score": {}}]) == ""  # runs without GenEval: no section


def test_report_writes_geneval_columns_csv_plot_and_a_self_contained_html(tmp_path: Path) -> None:
    from t2i.report import write_t2i_report

    runs = _runs(tmp_path / "runs")
    paths = write_t2i_report(runs, tmp_path / "report", notice="testbed notice")
    md = paths["markdown"].read_text()
    assert "## GenEval-style accuracy (testbed judge)" in md and "(ceiling)" in md and "(floor)" in md
    assert "![GenEval-style accuracy against p](t2i_geneval.png)" in md and "CLIP-FD" in md
    with Image.open(paths["geneval_plot"]) as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    table = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["row"] for r in table] == ["run"] * 4 + ["judge_real", "judge_noise"]
    assert {"geneval_overall", "geneval_colors", "geneval_n_colors", "clip_fd_synthetic", "n_real"} <= set(table[0])
    assert float(table[2]["geneval_colors"]) == 0.70 and table[2]["p"] == "1.0" and table[2]["seed"] == "0"
    assert float(table[4]["geneval_single_object"]) == 0.9 and table[4]["p"] == ""

    page = paths["html"].read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing outside the page
    assert not re.search(r"(href|url)\(?=?[\"']?(https?:|file:|/)", page)
    # Per p (lowest seed): 3 held-out pairs x 2 images + 3 GenEval prompts x 2 images; plus the plot.
    assert len(srcs) == 2 * (3 * 2 + 3 * 2) + 1
    assert page.count("stock photo &lt;0&gt;") == 4 and "a red bird number 2" in page  # escaped; text + alt, 2 p
    assert "expected red, found blue" in page and "✓" in page and "✗" in page  # verdicts under the images
    assert "judge sees 1 × blue bird" in page  # and what the judge read
    assert "judge: 1 × blue bird (wrong color)" in page  # the judge's reading of a held-out image
    assert "<th>single_object</th>" in page and "judge on uniform noise (floor)" in page  # the tables
    first, second = (
        page.index(f"<h2>{label} (training seed 0)</h2>")
        for label in ("alt-texts only (p=0)", "altogether, p=1 (all captions drawn synthetic)")
    )
    assert first < second and "(training seed 1)" not in page  # one section per p, its lowest seed


# --- end to end on the tiny pipeline: python -m t2i geneval, and the embedded evaluation's GenEval block ---

TINY_JUDGE = {"steps": 2, "train_images": 64, "eval_images": 8}  # trains in seconds; its accuracy is not tested here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny world, an exported pipeline with a random DiT, and a tiny judge from the embedded cache."""
    from t2i.components import load_text_encoder, load_vae
    from t2i.config import load_config
    from t2i.geneval import ensure_embedded_judge
    from t2i.model import build_transformer
    from t2i.sample import export_pipeline
    from tests.conftest import tiny_t2i_world

    root = tmp_path_factory.mktemp("t2i-geneval")
    world = tiny_t2i_world(root)
    cfg = load_config("embedded", world["overrides"])
    text = load_text_encoder(cfg.text_encoder, cfg.max_sequence_length)
    torch.manual_seed(0)
    pipe = export_pipeline(root / "pipe", cfg, build_transformer(cfg, text.width), load_vae(cfg.vae), text)
    judge = ensure_embedded_judge(root / "cache", cfg.resolution, progress=False, **TINY_JUDGE)
    return {"world": world, "cfg": cfg, "pipeline": pipe, "judge": judge, "root": root}


def test_embedded_judge_is_trained_once_and_reused(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import eval.judge
    from t2i.geneval import ensure_embedded_judge

    assert (tiny["judge"] / "judge.json").is_file() and (tiny["judge"] / "judge.safetensors").is_file()
    assert not list((tiny["root"] / "cache").glob(".*"))  # built aside and renamed into place: no leftovers
    monkeypatch.setattr(eval.judge, "train_judge", lambda *a, **k: pytest.fail("the cached judge was retrained"))
    again = ensure_embedded_judge(tiny["root"] / "cache", tiny["cfg"].resolution, progress=False, **TINY_JUDGE)
    assert again == tiny["judge"]
    other = {**TINY_JUDGE, "steps": 3}  # another recipe is another judge
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        ensure_embedded_judge(tiny["root"] / "cache", tiny["cfg"].resolution, progress=False, **other)


def test_geneval_command_writes_genevals_layout_scores_and_repeats_seeds(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from eval.geneval import read_metadata, sample_path, write_metadata
    from t2i.__main__ import main
    from t2i.embedded import image_tensor_transform
    from t2i.sample import generate, load_pipeline, vae_roundtrip
    from testbed.geneval import geneval_metadata
    from testbed.judge_data import render_scenes

    out = tmp_path / "gen"
    argv = ["geneval", "--pipeline", str(tiny["pipeline"]), "--out", str(out), "--judge", str(tiny["judge"])]
    assert main([*argv, "--images-per-prompt", "2", "--per-tag", "2", "--steps", "2", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    records = geneval_metadata(seed=0, per_tag=2)
    assert len(records) == 6 and "real (ceiling)" in printed and "noise (floor)" in printed
    for i, record in enumerate(records):  # GenEval's layout: the record, then samples 00000.png, 00001.png
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == record
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == ["00000.png", "00001.png"]
    doc = json.loads((out / "geneval.json").read_text())
    scores = doc["scores"]
    assert (
        len(scores["verdicts"]) == 12
        and scores["n_images"]["colors"] == 4
        and scores["per_category"]["position"] is None
    )
    correct = [v["correct"] for v in scores["verdicts"] if v["tag"] == "counting"]
    assert scores["per_category"]["counting"] == pytest.approx(sum(correct) / len(correct))
    ref = doc["judge_reference"]
    assert set(ref) == {"real", "roundtrip", "noise"} and "verdicts" not in ref["real"]
    pipe, _ = load_pipeline(tiny["pipeline"])  # the round trip is the pipeline's VAE at its resolution
    real = render_scenes(2, 0, "holdout")
    trip = vae_roundtrip(pipe)([s.image for s in real])
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    assert [im.size for im in trip] == [(size, size)] * 2
    x = torch.stack([image_tensor_transform(size)(s.image.convert("RGB")) for s in real])
    with torch.no_grad():
        want = pipe.image_processor.postprocess(pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample, "pil")
    assert np.array_equal(np.asarray(trip[1]), np.asarray(want[1]))
    assert ref["roundtrip"]["per_category"].keys() == ref["real"]["per_category"].keys()
    assert "through VAE" in printed
    assert set(scores["attributes"]) == {"color_any_class", "count_any_class"}
    assert scores["n_images"]["color_any_class"] == 4  # 2 colour prompts x 2 images
    assert re.search(r"^color_any_class +(\d+\.\d +){4} 4$", printed, re.M)  # generated, real, VAE, noise
    assert doc["judge_card"]["train"]["steps"] == 2 and "evaluate_images.py" in doc["official_scorer"]
    # Sample n of prompt i is seed + i * N + n, whatever the batching: regenerate prompt 2, sample 1 alone.
    pipe, meta = load_pipeline(tiny["pipeline"])
    alone = generate(
        pipe, [records[2]["prompt"]], max_sequence_length=64, steps=2, guidance_scale=3.0, seed=7 + 2 * 2 + 1
    )
    with Image.open(sample_path(out, 2, 1)) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(alone[0]))

    # --out: an earlier GenEval output is replaced whole; a folder holding anything else is refused, untouched.
    from t2i.geneval import check_geneval_out

    assert check_geneval_out(out, "out") == out
    (out / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*argv, "--images-per-prompt", "1", "--per-tag", "1", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "'notes.txt'" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "notes.txt").unlink()

    # Real-data path: a GenEval metadata file, no judge -> images only, and the official scorer's command.
    write_metadata(records[:1], tmp_path / "evaluation_metadata.jsonl")
    argv = ["geneval", "--pipeline", str(tiny["pipeline"]), "--out", str(tmp_path / "real"), "--steps", "2"]
    assert main([*argv, "--metadata", str(tmp_path / "evaluation_metadata.jsonl"), "--images-per-prompt", "1"]) == 0
    assert "python evaluation/evaluate_images.py" in capsys.readouterr().out
    assert read_metadata(tmp_path / "evaluation_metadata.jsonl") == records[:1]
    assert sample_path(tmp_path / "real", 0, 0).is_file()
    assert "scores" not in json.loads((tmp_path / "real" / "geneval.json").read_text())


def test_embedded_evaluation_adds_geneval_and_distribution_and_the_html_shows_them(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate_pipeline on a testbed-trained run: metrics["geneval"] (judge from the embedded cache) and
    metrics["distribution"], which the sweep report and its HTML page then show."""
    import dataclasses

    import eval.judge
    import t2i.geneval
    from caption_mixing.shards import expand_shards
    from t2i.config import EMBEDDED
    from t2i.experiment import Resolved, evaluate_pipeline
    from t2i.report import write_t2i_report

    monkeypatch.setattr(t2i.geneval, "EMBEDDED_PER_TAG", 1)
    monkeypatch.setattr(t2i.geneval, "IMAGES_PER_PROMPT", 2)
    real_train, asked = eval.judge.train_judge, []

    def shrunk(out: Path, resolution: int, **kwargs):  # the embedded recipe, shrunk: only the wiring is tested here
        asked.append(kwargs.pop("real_shards"))  # the tiny world's shards carry no testbed labels to measure on
        return real_train(out, resolution, **{**kwargs, **TINY_JUDGE})

    monkeypatch.setattr(eval.judge, "train_judge", shrunk)
    cfg = dataclasses.replace(tiny["cfg"], train_shards=EMBEDDED, eval_prompts=3, sample_steps=2)
    holdout = expand_shards(tiny["world"]["overrides"]["holdout_shards"])
    testbed_root = tmp_path / "cache" / "testbed-x"  # the judge is cached beside the testbed
    res = Resolved(
        None, holdout, None, "", "", None, "EmbeddedCLIP-Tiny", cfg.eval_clip_checkpoint, True, str(testbed_root)
    )
    run_dir = tmp_path / "run"
    metrics = evaluate_pipeline(cfg, run_dir, tiny["pipeline"], res)
    g = metrics["geneval"]
    assert set(g["per_category"]) >= {"single_object", "counting", "colors"} and g["images_per_prompt"] == 2
    assert g["n_images"] == {**g["n_images"], "single_object": 2, "counting": 2, "colors": 2}
    assert "verdicts" not in g and set(g["judge"]) == {"real", "roundtrip", "noise"}
    assert g["judge"]["real"]["overall"] is not None and g["judge"]["roundtrip"]["overall"] is not None
    assert asked == [holdout]  # the judge's card also measures it on the run's held-out real images
    assert Path(g["judge_path"]).parent == tmp_path / "cache" and Path(g["folder"]) == (run_dir / "geneval").resolve()
    d = metrics["distribution"]
    assert d["n_real"] == 3 and d["n_generated"] == {"original": 3, "synthetic": 3, "noise": 3}
    assert set(d["clip_fd"]) == {"original", "synthetic", "noise"} and "fid" not in d
    readings = [json.loads(line) for line in (run_dir / "samples" / "judge.jsonl").read_text().splitlines()]
    assert len(readings) == 3 and {"category", "color", "count"} <= set(readings[0]["alt"])

    metrics.update(p=1.0, seed=0, steps=3, run_dir=str(run_dir))
    paths = write_t2i_report([metrics], tmp_path / "report")
    page = paths["html"].read_text()
    assert page.count('<img class="s"') == 2 * 3 + 3 * 2  # 3 held-out pairs, 3 GenEval prompts x 2 images
    md = paths["markdown"].read_text()
    assert "single_object" in md and paths["geneval_plot"].is_file()
    assert "| same renderings through the pipeline's VAE (its ceiling) | - |" in md


def test_held_out_images_are_read_by_the_judge_against_the_scenes_truth(tmp_path: Path) -> None:
    from t2i.evaluate import _truth
    from t2i.geneval import judge_holdout

    sample = {"json": json.dumps({"testbed": {"category": "bird", "color": "red", "count": 2, "concept": "x"}})}
    assert _truth(sample) == {"category": "bird", "color": "red", "count": 2}
    assert _truth({"json": b"{}"}) is None and _truth({}) is None and _truth({"json": b"not json"}) is None

    class Reads:  # a judge that reads every image as two red birds
        def predict(self, images):
            return [{"category": "bird", "color": "red", "count": 2, "probs": {}} for _ in images]

    truths = [{"category": "bird", "color": "red", "count": 2}, {"category": "fish", "color": "red", "count": 2}, None]
    items = [{"key": f"k{i}", "truth": t} for i, t in enumerate(truths)]
    images = {col: [Image.new("RGB", (8, 8))] * 3 for col in ("alt", "synthetic")}
    share = judge_holdout(Reads(), items, images, tmp_path / "judge.jsonl")
    assert share == {"original": 0.5, "synthetic": 0.5, "n": 2}  # the scene without truth is not counted
    rows = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert rows[1]["alt"]["match"] == {"category": False, "color": True, "count": True}
    assert "match" not in rows[2]["synthetic"] and rows[2]["truth"] is None


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["geneval", "--pipeline", "{tmp}/none", "--out", "{tmp}/g"], "--pipeline"),
        (
            ["geneval", "--pipeline", "{tmp}/none", "--out", "{tmp}/g", "--images-per-prompt", "0"],
            "--images-per-prompt",
        ),
        (["geneval", "--pipeline", "{tmp}/none", "--out", "{tmp}/g", "--metadata", "{tmp}/none.jsonl"], "none.jsonl"),
        (["geneval", "--pipeline", "{tmp}/none", "--out", "{tmp}/file/sub"], "--out"),
        (["geneval", "--pipeline", "{tmp}/none", "--out", "{tmp}/g", "--steps", "1"], "--steps"),
        (
            ["sample", "--pipeline", "{tmp}/none", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/s", "--steps", "1"],
            "--steps",
        ),
        (["sample", "--pipeline", "{tmp}/none", "--prompts", "{tmp}/none.txt", "--out", "{tmp}/s"], "--prompts"),
        (["sample", "--pipeline", "{tmp}/none", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/file"], "--out"),
        (["precompute", "--shards", "{tmp}/p.txt", "--vae", "{tmp}/none", "--out", "{tmp}/file"], "--out"),
    ],
)
def test_t2i_cli_bad_input_is_one_error_line_naming_it(
    argv: list[str], names: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Bad input to the t2i commands is ``python -m t2i CMD: error: ...`` naming the flag or file, exit 2, no
    traceback, and nothing written."""
    from t2i.__main__ import main

    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "p.txt").write_text("a prompt\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m t2i {argv[0]}: error: ") and names in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_attribute_columns_show_colour_and_count_read_whatever_the_class(tmp_path: Path) -> None:
    from t2i.report import geneval_table, report_csv

    runs = _runs(tmp_path)
    for run, color in zip(runs, (0.10, 0.20, 0.80, 0.90), strict=True):
        run["geneval"]["attributes"] = {"color_any_class": color, "count_any_class": 0.5}
        run["geneval"]["n_images"] |= {"color_any_class": 32, "count_any_class": 96}
        for name, level in (("real", 0.95), ("noise", 0.12)):
            run["geneval"]["judge"][name]["attributes"] = {"color_any_class": level, "count_any_class": level}
    rows = geneval_table(runs).splitlines()
    assert rows[0].endswith("| colors | color_any_class | count_any_class | images per category |")
    assert "| 15.0 ± 7.1 | 50.0 ± 0.0 |" in rows[2] and "color_any_class: 32, count_any_class: 96" in rows[2]
    assert "| 85.0 ± 7.1 (+70.0 *) |" in rows[3]  # beyond the seed spread
    assert rows[4].endswith("| 90.0 | 95.0 | 95.0 | - |") and rows[5].endswith("| 10.0 | 12.0 | 12.0 | - |")
    assert "`color_any_class`, `count_any_class`: the judge's colour and count read on their own" in "\n".join(rows)
    table = list(csv.DictReader(io.StringIO(report_csv(runs))))
    assert float(table[3]["geneval_color_any_class"]) == 0.9 and table[3]["geneval_n_count_any_class"] == "96"
    assert float(table[-1]["geneval_color_any_class"]) == 0.12  # the noise floor row
