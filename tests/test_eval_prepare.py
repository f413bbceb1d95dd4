"""`prepare` converters: tiny fixtures in each original layout -> clip_benchmark local wds folders."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from eval.__main__ import main
from eval.prepare import prepare
from eval.video import middle_frame_jpeg


def _jpeg(color: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_video(path: Path, levels: list[int], codec: str = "mpeg4") -> None:
    """A tiny video whose frame i is uniformly gray at ``levels[i]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=5)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), level, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def read_wds(folder: Path) -> list[tuple[bytes, int]]:
    """(image bytes, label) per sample of folder/test, in order."""
    split = folder / "test"
    samples: dict[str, dict[str, bytes]] = {}
    for i in range(int((split / "nshards.txt").read_text())):
        with tarfile.open(split / f"{i}.tar") as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [(next(v for k, v in s.items() if k != "cls"), int(s["cls"])) for _, s in sorted(samples.items())]


def _gray(jpg: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(jpg)).convert("L")).mean())


def test_middle_frame(tmp_path):
    write_video(tmp_path / "v.mp4", [10, 60, 120, 180, 240])
    assert abs(_gray(middle_frame_jpeg(tmp_path / "v.mp4")) - 120) < 12
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        middle_frame_jpeg(tmp_path / "bad.mp4")


def test_prepare_cub(tmp_path):
    src = tmp_path / "CUB_200_2011"
    (src / "images").mkdir(parents=True)
    (src / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    images, labels, split = [], [], []
    for i, (cls, train) in enumerate([(1, 1), (1, 0), (2, 0), (2, 1), (2, 0)], 1):
        rel = f"{cls:03d}.x/img_{i}.jpg"
        (src / "images" / rel).parent.mkdir(exist_ok=True)
        (src / "images" / rel).write_bytes(_jpeg((40 * i, 0, 0)))
        images.append(f"{i} {rel}")
        labels.append(f"{i} {cls}")
        split.append(f"{i} {train}")
    (src / "images.txt").write_text("\n".join(images) + "\n")
    (src / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (src / "train_test_split.txt").write_text("\n".join(split) + "\n")

    out = tmp_path / "wds_cub"
    assert main(["prepare", "cub", "--source", str(tmp_path), "--out", str(out)]) == 0
    assert (out / "classnames.txt").read_text().splitlines() == ["Black footed Albatross", "Laysan Albatross"]
    assert (out / "zeroshot_classification_templates.txt").read_text().strip() == "a photo of a {c}, a type of bird."
    got = read_wds(out)
    assert [y for _, y in got] == [0, 1, 1]  # test images 2, 3, 5 only
    assert got[0][0] == (src / "images" / "001.x/img_2.jpg").read_bytes()

    (src / "train_test_split.txt").write_text("\n".join(f"{i} 1" for i in range(1, 6)))
    with pytest.raises(ValueError, match="train_test_split.txt: no test images"):
        prepare("cub", tmp_path, tmp_path / "again")


def test_prepare_ucf101_middle_frames(tmp_path, monkeypatch):
    import eval.prepare as prep

    names = ["Apply Eye Makeup", "Handstand Pushups", "Yo Yo"]
    monkeypatch.setattr(prep, "packaged_classnames", lambda key: (names, "eval/data/classnames.json"))
    src = tmp_path / "ucf"
    lists = src / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n")
    # the real list spells a folder "HandStandPushups": matching must ignore case
    test = ["YoYo/v_YoYo_g01_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
            "HandStandPushups/v_HandStandPushups_g01_c01.avi"]  # fmt: skip
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    for i, rel in enumerate(test):
        write_video(src / "UCF-101" / rel, [0, 50 + 60 * i, 255])
    out = tmp_path / "wds_ucf101"
    info = prepare("ucf101", src, out)
    assert info["num_samples"] == 3
    assert (out / "classnames.txt").read_text().splitlines() == names
    got = read_wds(out)
    assert [y for _, y in got] == [2, 0, 1]
    assert [round(_gray(j) / 10) for j, _ in got] == [5, 11, 17]  # the middle frames' gray levels 50, 110, 170

    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Knitting\n3 YoYo\n")
    with pytest.raises(ValueError, match="classInd.txt.*unmatched"):
        prepare("ucf101", src, tmp_path / "again")


def test_prepare_kinetics700_reports_missing_videos(tmp_path):
    src = tmp_path / "k700"
    rows = [("zumba", "aaa", 10, 20), ("abseiling", "bbb", 0, 10), ("zumba", "ccc", 5, 15)]
    (src / "annotations").mkdir(parents=True)
    (src / "annotations" / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n" + "".join(f"{a},{b},{c},{d},validate\n" for a, b, c, d in rows)
    )
    for label, yid, s, e in rows[:2]:  # "ccc" is gone, as many Kinetics videos are
        write_video(src / "val" / label / f"{yid}_{s:06d}_{e:06d}.mp4", [0, 200, 0])
    out = tmp_path / "wds_kinetics700"
    info = prepare("kinetics700", src, out)
    assert (out / "classnames.txt").read_text().splitlines() == ["abseiling", "zumba"]
    assert [y for _, y in read_wds(out)] == [1, 0]
    assert info["num_missing_videos"] == 1
    assert json.loads((out / "prepare_report.json").read_text())["missing_videos"] == ["ccc_000005_000015"]
    assert len((out / "zeroshot_classification_templates.txt").read_text().splitlines()) == 28


def test_prepare_hateful_memes_and_bad_inputs(tmp_path):
    src = tmp_path / "hm"
    (src / "img").mkdir(parents=True)
    lines = []
    for i, label in enumerate([0, 1, 1, 0]):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(src / "img" / f"{i:05d}.png")
        lines.append(json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": label, "text": "t"}))
    (src / "dev.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "wds_hateful_memes"
    prepare("hateful_memes", src, out)
    assert (out / "classnames.txt").read_text().splitlines() == ["meme", "hatespeech meme"]
    assert [y for _, y in read_wds(out)] == [0, 1, 1, 0]
    assert sorted(p.name for p in (out / "test").iterdir()) == ["0.tar", "nshards.txt"]

    (src / "dev.jsonl").write_text('{"img": "img/00000.png"}\n')
    with pytest.raises(ValueError, match=r"dev.jsonl:1: expected JSON with 'img' and 'label'"):
        prepare("hateful_memes", src, tmp_path / "again")
    with pytest.raises(ValueError, match="did you|cannot be prepared; choose one of cub"):
        prepare("imagenet1k", src, tmp_path / "x")
    assert main(["prepare", "cub", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
