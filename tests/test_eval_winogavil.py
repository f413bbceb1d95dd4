"""WinoGAViL (issue 14, item 3): `eval prepare winogavil` from the released layout, scored as DataComp scores
it, and counted in DataComp's Retrieval group."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import jaccard_score

from eval.__main__ import main
from eval.association import cue_prompt
from eval.preflight import check_tasks
from eval.runner import run_suite
from eval.tasks import parse_task_spec
from tests.test_eval import clip  # noqa: F401  (the tiny random CLIP fixture)

# (cue, DataComp's text for it, number of candidates, number of associations)
INSTANCES = [("apple", "An apple", 5, 2), ("Dog", "A dog", 6, 3), ("ice", "An ice", 10, 3), ("sun", "A sun", 12, 4),
             ("Umbrella", "An umbrella", 12, 2), ("tree", "A tree", 10, 5), ("car", "A car", 5, 1)]  # fmt: skip


def make_release(src: Path, seed: int = 0) -> list[dict]:
    """winogavil_dataset.csv + winogavil_images/<name>.jpg, as nlphuji/winogavil releases them."""
    rng = np.random.default_rng(seed)
    (src / "winogavil_images").mkdir(parents=True)
    rows = []
    for i, (cue, _, n_cand, n_assoc) in enumerate(INSTANCES):
        cands = [f"word{i}_{j}" for j in range(n_cand)]
        for name in cands:
            color = rng.integers(0, 255, 3)
            arr = np.clip(color[None, None, :] + rng.normal(0, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG")
            (src / "winogavil_images" / f"{name}.jpg").write_bytes(buf.getvalue())
        assoc = [str(x) for x in rng.choice(cands, n_assoc, replace=False)]
        rows.append({"candidates": json.dumps(cands), "cue": cue, "associations": json.dumps(assoc),
                     "score_fool_the_ai": 50.0, "num_associations": n_assoc, "num_candidates": n_cand,
                     "solvers_jaccard_mean": 80.0, "ID": 1000 + i})  # fmt: skip
    with open(src / "winogavil_dataset.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def datacomp_scores(tiny, src: Path, rows: list[dict]) -> dict[str, float]:
    """DataComp's wino_eval loop written out: texts, top-k by similarity, sklearn's Jaccard, group means."""
    model, tokenizer, preprocess = tiny
    scores, groups = [], []
    for (_, text, _, _), row in zip(INSTANCES, rows, strict=True):
        cands, assoc = json.loads(row["candidates"]), json.loads(row["associations"])
        images = [Image.open(src / "winogavil_images" / f"{c}.jpg") for c in cands]
        with torch.no_grad():
            img = F.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer([text])), dim=-1)
        logits = (txt @ img.T).squeeze(0).numpy()
        y_true = np.isin(cands, assoc)
        y_pred = np.isin(np.arange(len(cands)), np.argsort(logits)[-y_true.sum() :])
        scores.append(jaccard_score(y_true, y_pred))
        groups.append(len(cands))
    s, g = np.array(scores), np.array(groups)
    out = {"avg_jaccard_score": s.mean()}
    for name, sel in (("5", g == 5), ("6", g == 6), ("10", g == 10), ("12", g == 12), ("5-6", g <= 6),
                      ("10-12", g >= 10)):  # fmt: skip
        out[f"jaccard_score_{name}"] = s[sel].mean()
    return out


def test_cue_prompt_is_datacomps():
    assert [cue_prompt(cue) for cue, *_ in INSTANCES] == [text for _, text, *_ in INSTANCES]


def test_prepare_and_score_as_datacomp(clip, tmp_path, capsys):  # noqa: F811
    model, tokenizer, preprocess = clip
    src, root = tmp_path / "release", tmp_path / "root"
    rows = make_release(src)
    assert main(["prepare", "winogavil", "--source", str(src), "--out", str(root / "wds_winogavil")]) == 0
    assert '"num_samples": 7' in capsys.readouterr().out
    assert check_tasks(parse_task_spec("winogavil"), root) == []

    suite = run_suite(model, tokenizer, preprocess, parse_task_spec("retrieval"), root, batch_size=16,
                      keep_going=True, progress=False)  # fmt: skip
    res = suite["tasks"]["winogavil"]
    assert res["status"] == "ok" and res["task_type"] == "association" and res["main_metric"] == "jaccard_score_10-12"
    assert res["num_samples"] == 7 and res["expected_samples"] == 3563 and "3563 instances" in res["size_note"]
    want = datacomp_scores((model, tokenizer, preprocess), src, rows)
    for key, value in want.items():
        assert res[key] == pytest.approx(value, abs=1e-6), key
    assert 0.0 < want["jaccard_score_10-12"] < 1.0, "a degenerate fixture would make the check vacuous"
    group = suite["summary"]["datacomp_groups"]["Retrieval"]  # flickr30k and mscoco have no data here
    assert group["coverage"] == "1/3" and group["average"] == pytest.approx(want["jaccard_score_10-12"])
    assert group["missing"] == ["flickr30k", "mscoco"]


def test_bad_release_and_folder_are_named(tmp_path, capsys):
    src = tmp_path / "release"
    make_release(src)
    (src / "winogavil_images").rename(src / "elsewhere")
    (src / "winogavil_images.zip").write_bytes(b"PK")
    assert main(["prepare", "winogavil", "--source", str(src), "--out", str(tmp_path / "o1")]) == 2
    assert f"unzip {src / 'winogavil_images.zip'}" in capsys.readouterr().err
    (src / "elsewhere").rename(src / "winogavil_images")
    (src / "winogavil_images" / "word1_0.jpg").unlink()
    assert main(["prepare", "winogavil", "--source", str(src), "--out", str(tmp_path / "o2")]) == 2
    assert f"{src / 'winogavil_images' / 'word1_0.jpg'} is missing; candidate of" in capsys.readouterr().err
    with open(src / "winogavil_dataset.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["associations"] = json.dumps(["nowhere"])
    with open(src / "winogavil_dataset.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["prepare", "winogavil", "--source", str(src), "--out", str(tmp_path / "o3")]) == 2
    assert f"{src / 'winogavil_dataset.csv'}:2: associations ['nowhere'] must be" in capsys.readouterr().err
    wrong = tmp_path / "root" / "wds_winogavil"
    (wrong / "test").mkdir(parents=True)
    (wrong / "dataset_type.txt").write_text("retrieval\n")
    (wrong / "test" / "nshards.txt").write_text("1\n")
    (wrong / "test" / "0.tar").write_bytes(b"")
    (problem,) = check_tasks(parse_task_spec("winogavil"), tmp_path / "root", keep_going=True)
    assert (
        problem
        == f"winogavil: {wrong / 'dataset_type.txt'} must say 'association' (`python -m eval prepare winogavil`)"
    )
