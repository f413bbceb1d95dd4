"""Text-to-image distribution metrics (issue 17 part 5): Fréchet distance in the judge CLIP's feature space,
FID/KID through torchmetrics from a local Inception weights file, per-image CLIP scores through public API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_t2i_units import _random_clip_checkpoint


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets computed apart from torchmetrics: with A, B the centred feature
    rows, tr sqrt(cov_a cov_b) is the nuclear norm of A B^T / sqrt((n-1)(m-1)) (n x m, cheap at 2048-d)."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    cross = np.linalg.norm(ca @ cb.T, "nuc") / np.sqrt((len(a) - 1) * (len(b) - 1))
    traces = (ca**2).sum() / (len(a) - 1) + (cb**2).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + traces - 2 * cross)


def _images(n: int, size: int, seed: int, kind: str) -> list[Image.Image]:
    """``smooth``: a colour blob on a flat background (image-like); ``noise``: uniform noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "noise":
            arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
        else:
            arr = torch.full((size, size, 3), 0, dtype=torch.uint8) + torch.randint(0, 256, (1, 1, 3), generator=g)
            x0, y0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            arr[y0 : y0 + size // 2, x0 : x0 + size // 2] = torch.randint(0, 256, (3,), generator=g, dtype=torch.uint8)
        out.append(Image.fromarray(arr.to(torch.uint8).numpy()))
    return out


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    from t2i.evaluate import ClipJudge

    clip, preprocess, tokenizer = _random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "clip.pt")
    return ClipJudge(clip, preprocess, tokenizer)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """A stand-in for torch-fidelity's ``pt_inception-2015-12-05`` file: the same network and state-dict keys
    with random weights. Built with torch-fidelity's own class (its download and load are switched off
    while building); the file then goes through the real ``feature_extractor_weights_path`` loading."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()

    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    for module in net.modules():  # He init keeps 90 layers of activations alive (the default init vanishes)
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "pt_inception-standin.pth"
    torch.save(net.state_dict(), path)
    return path


def test_per_image_clip_scores_use_public_api_and_match_open_clip(judge) -> None:
    import t2i.evaluate as ev

    assert "_clip_score_update" not in Path(ev.__file__).read_text()
    images = _images(4, 24, 0, "noise") + _images(2, 40, 1, "smooth")  # mixed sizes are fine
    prompts = ["a red bird", "two fish", "sand", "a photo of a lotus", "a blue cat", "x"]
    model, preprocess, tokenizer = judge.adapter.clip, judge.processor.preprocess, judge.processor.tokenizer
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(i) for i in images]))
        txt = model.encode_text(tokenizer(prompts))
    want = 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert judge.per_image(images, prompts) == pytest.approx(want.tolist(), abs=1e-4)


def test_clip_frechet_distance_matches_a_direct_computation_and_orders_sets(judge) -> None:
    from t2i.evaluate import distribution_metrics

    real = _images(12, 64, 0, "smooth")  # real images at 64 px, generated at 32 px (as the embedded preset)
    sets = {"alike": _images(12, 32, 1, "smooth"), "noise": _images(12, 32, 2, "noise")}
    got = distribution_metrics(judge, real, sets)
    assert got["n_real"] == 12 and got["n_generated"] == {"alike": 12, "noise": 12} and got["resolution"] == [32, 32]
    assert "fid" not in got and "kid" not in got  # no Inception weights: CLIP space only
    # Real images are matched to the generated size (resize + center crop) before either extractor sees them.
    from t2i.evaluate import match_resolution

    ref = judge.image_features(match_resolution(real, (32, 32))).double().numpy()
    for name, images in sets.items():
        direct = _frechet(judge.image_features(images).double().numpy(), ref)
        assert got["clip_fd"][name] == pytest.approx(direct, rel=1e-3, abs=1e-5)
    assert got["clip_fd"]["noise"] > got["clip_fd"]["alike"] > 0
    too_few = distribution_metrics(judge, real[:1], sets)
    assert "clip_fd" not in too_few and "at least 2" in too_few["skipped"] and too_few["n_real"] == 1


def test_fid_and_kid_load_a_local_inception_file_and_see_images_at_their_own_size(judge, inception_file) -> None:
    from torchmetrics.image.fid import NoTrainInceptionV3

    from t2i.evaluate import distribution_metrics, kernel_distances, match_resolution

    real = _images(8, 64, 0, "smooth")
    fake = {"mixed": _images(3, 24, 1, "smooth") + _images(3, 40, 2, "noise")}  # two sizes in one set
    got = distribution_metrics(judge, real, fake, inception_weights=str(inception_file), seed=5)
    assert set(got["fid"]) == set(got["kid"]) == {"mixed"} and got["kid_subset_size"] == 6
    assert got["inception_weights"] == str(inception_file) and got["n_real"] == 8
    # The same network, fed one image at a time at its own size (torchmetrics resizes to 299 itself),
    # gives the same FID: nothing was pre-resized to 299.
    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file))
    state = torch.load(inception_file, weights_only=True)
    assert torch.equal(net.state_dict()["fc.weight"], state["fc.weight"])  # the file's weights, not a download

    def feats(images: list[Image.Image]) -> np.ndarray:
        with torch.no_grad():
            rows = [net(torch.from_numpy(np.array(i)).permute(2, 0, 1)[None]) for i in images]
        return torch.cat(rows).double().numpy()

    ref = match_resolution(real, (24, 24))  # the size of the first generated image
    assert got["fid"]["mixed"] == pytest.approx(_frechet(feats(fake["mixed"]), feats(ref)), rel=1e-3)
    assert got["fid"]["mixed"] > 1e-3 and got["kid"]["mixed"]["std"] > 0  # 6 of 8 real images per subset
    again, subset = kernel_distances(net, ref, fake, seed=5)
    assert again == got["kid"] and subset == 6  # seeded subsets


def test_bad_inception_weights_name_the_key(judge, tmp_path: Path) -> None:
    from t2i.evaluate import DistributionError, inception_features

    with pytest.raises(FileNotFoundError, match="fid_inception_weights=.*missing.pth.*no such file"):
        inception_features(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DistributionError, match="fid_inception_weights=.*junk.pth"):
        inception_features(str(tmp_path / "junk.pth"))
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(DistributionError, match="other.pth.* not a torch-fidelity FeatureExtractorInceptionV3"):
        inception_features(str(tmp_path / "other.pth"))
