"""mix_mode=gate: the share p of samples with the lowest alt-text score get the synthetic caption
(caption_mixing.gate), and `python -m eval score` writes the scores it reads (eval.score)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from caption_mixing import SharedEpoch
from caption_mixing.gate import GateSpec, ScoreGate, tie_break
from caption_mixing.mixconfig import MixingFields, mixing_plan, validate_mixing
from caption_mixing.mixing import ALT, MixStats, Mixture
from caption_mixing.pipeline import DataErrors, caption_sample_stages
from caption_mixing.shards import expand_shards
from caption_mixing.sidecar import read_sidecar_fields, sidecar_path, write_sidecar
from tests.conftest import make_shards

N_SHARDS, PER_SHARD = 4, 50


def _score(key: str) -> float:
    """Scores with many ties (10 distinct values), so the tie-break decides part of the gate."""
    return (int(key) * 7919 % 10) / 10.0


def _write_scores(pattern: str, score=_score, source: str = "clip_score_alt", fld: str = "clip_score") -> None:
    import tarfile

    for url in expand_shards(pattern):
        with tarfile.open(url) as tar:
            keys = sorted({m.name.split(".")[0] for m in tar.getmembers()})
        write_sidecar(sidecar_path(url, source), url, source, {}, fields={fld: {k: score(k) for k in keys}})


@pytest.fixture
def scored(tmp_path: Path) -> tuple[str, list[str]]:
    pattern, keys = make_shards(tmp_path / "shards", N_SHARDS, PER_SHARD, missing=frozenset({"000010003"}))
    _write_scores(pattern)
    return pattern, keys


def _run(pattern: str, mixture: Mixture, gate: GateSpec | None, seed: int = 0, epoch: int = 0) -> list[dict]:
    import webdataset as wds

    stages = caption_sample_stages(
        pattern, mixture=mixture, seed=seed, epoch=SharedEpoch(epoch), shuffle=False, gate=gate, errors=DataErrors()
    )
    return list(wds.DataPipeline(*stages))


def _lowest(keys: list[str], share: float, seed: int = 0) -> set[str]:
    order = sorted(keys, key=lambda k: (_score(k), tie_break(seed, k)))
    return set(order[: round(share * len(keys))])


def test_gate_picks_exactly_the_lowest_scored_share_ties_deterministic(scored) -> None:
    pattern, keys = scored
    for p in (0.15, 0.5):
        samples = _run(pattern, Mixture.from_p(p), GateSpec())
        gated = {s["__key__"] for s in samples if s["caption_wanted"] != ALT}
        assert gated == _lowest(keys, p)  # exactly the lowest round(p*N), ties broken by the (seed, key) hash
        assert len(gated) == round(p * len(keys))  # realized share == p (well within one sample per shard)
        again = _run(pattern, Mixture.from_p(p), GateSpec())
        assert [s["caption_wanted"] for s in again] == [s["caption_wanted"] for s in samples]
    # p=0.15 gates 30 of 200 samples with 10 distinct scores (20 each): the tie at the threshold is split
    gated = _lowest(keys, 0.15)
    cut = max(_score(k) for k in gated)
    assert any(_score(k) == cut and k not in gated for k in keys) and any(_score(k) == cut for k in gated)
    # another seed breaks the ties differently but gates every strictly lower score alike
    other = {
        s["__key__"] for s in _run(pattern, Mixture.from_p(0.15), GateSpec(), seed=1) if s["caption_wanted"] != ALT
    }
    assert other == _lowest(keys, 0.15, seed=1) and other != _lowest(keys, 0.15)
    assert {k for k in other if _score(k) < cut} == {k for k in keys if _score(k) < cut}


def test_gate_is_counted_like_mixing_and_falls_back(scored) -> None:
    pattern, keys = scored
    samples = _run(pattern, Mixture.from_p(1.0), GateSpec())  # p=1: everything gated
    stats = MixStats()
    stats.update([s["caption_source"] for s in samples], [s["caption_wanted"] for s in samples])
    assert stats.used == Counter({"altogether": 199, ALT: 1}) and stats.fallbacks == Counter({"altogether": 1})
    assert [s["caption_source"] for s in samples if s["__key__"] == "000010003"] == [ALT]


def test_gate_threshold_follows_a_schedule_and_nway_mixture(scored) -> None:
    pattern, keys = scored
    urls = expand_shards(pattern)
    gate = ScoreGate.build(urls, "clip_score_alt", 0.0, seed=0)
    nway = Mixture.parse("alt=0.5,altogether=0.3,other=0.2", fallback="altogether,alt")
    for p in (0.1, 0.3, 0.5):  # a schedule's epochs: one threshold per p
        rule = gate.rule(nway.with_synthetic_share(p))
        gated = {k for k in keys if rule.gated(_score(k), 0, 0, k)}
        assert gated == _lowest(keys, p)
    samples = _run(pattern, nway, GateSpec())
    wanted = Counter(s["caption_wanted"] for s in samples)
    assert wanted[ALT] == 100 and wanted["altogether"] + wanted["other"] == 100
    assert 45 <= wanted["altogether"] <= 75  # drawn 0.6 : 0.4 among the gated
    # "other" has no sidecar: those samples fall back along the declared order to altogether, counted
    assert all(s["caption_source"] == "altogether" for s in samples if s["caption_wanted"] == "other")


def test_soft_gate_calibrated_reproducible_and_favours_low_scores(scored) -> None:
    pattern, keys = scored
    spec = GateSpec(soft=0.1)
    gate = spec.build(expand_shards(pattern), seed=0)
    rule = gate.rule(Mixture.from_p(0.3))
    import numpy as np

    mean = float(np.mean(1 / (1 + np.exp(-(rule.offset - gate.scores.scores) / 0.1))))
    assert mean == pytest.approx(0.3, abs=1e-6)  # expected share is p
    runs = [[s["caption_wanted"] for s in _run(pattern, Mixture.from_p(0.3), spec, epoch=e)] for e in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]  # same (seed, epoch): same draws; next epoch draws anew
    share = sum(w != ALT for w in runs[0]) / len(keys)
    assert abs(share - 0.3) < 0.1
    low = [k for k in keys if _score(k) <= 0.1]
    high = [k for k in keys if _score(k) >= 0.8]
    by_key = {s["__key__"]: s["caption_wanted"] != ALT for s in _run(pattern, Mixture.from_p(0.3), spec)}
    assert sum(by_key[k] for k in low) / len(low) > sum(by_key[k] for k in high) / len(high)


def test_gate_config_keys_validated_and_resolved() -> None:
    plan = mixing_plan(MixingFields(mix_mode="gate", p=0.15, gate_scores="recap:org_clip_score", gate_soft=0.05))
    assert plan.gate == GateSpec("recap:org_clip_score", 0.05) and plan.mixture.mode == "per_visit"
    assert mixing_plan(MixingFields(p=0.15)).gate is None
    with pytest.raises(ValueError, match="gate_soft"):
        validate_mixing(MixingFields(mix_mode="gate", gate_soft=-1.0))
    with pytest.raises(ValueError, match="gate_scores"):
        validate_mixing(MixingFields(mix_mode="gate", gate_scores="../x"))
    with pytest.raises(ValueError, match="mix_mode"):
        validate_mixing(MixingFields(mix_mode="gated"))
    with pytest.raises(ValueError, match="p_mode"):
        validate_mixing(MixingFields(mix_mode="gate", p_mode="effective"))


def test_gate_without_score_sidecars_names_what_to_run(tmp_path: Path) -> None:
    pattern, _ = make_shards(tmp_path / "s", 1, 5)
    with pytest.raises(ValueError, match="eval score"):
        _run(pattern, Mixture.from_p(0.5), GateSpec())


def test_release_score_field_in_the_same_form(tmp_path: Path) -> None:
    pattern, keys = make_shards(tmp_path / "s", 2, 20)
    _write_scores(pattern, source="recap", fld="org_clip_score")
    gated = {s["__key__"] for s in _run(pattern, Mixture.from_p(0.25), GateSpec("recap:org_clip_score"))}
    samples = _run(pattern, Mixture.from_p(0.25), GateSpec("recap:org_clip_score"))
    assert {s["__key__"] for s in samples if s["caption_wanted"] != ALT} == _lowest(keys, 0.25) and gated


def test_eval_score_writes_cosines_resumably_and_the_gate_reads_them(tmp_path: Path) -> None:
    import open_clip

    import testbed.models  # noqa: F401  (registers EmbeddedCLIP-Tiny)
    from eval.model_loading import load_model
    from eval.score import score_shards

    pattern, keys = make_shards(tmp_path / "s", 2, 6, missing=frozenset({"000000002"}))
    torch.manual_seed(0)
    ckpt = tmp_path / "scorer.pt"
    torch.save(open_clip.create_model("EmbeddedCLIP-Tiny").state_dict(), ckpt)
    model, tok, pre, mid = load_model("EmbeddedCLIP-Tiny", ckpt)
    out = None  # beside the shards, where the pipeline looks (or --out = the run's sidecar_dir)
    summary = score_shards(model, tok, pre, pattern, ["alt", "altogether"], model_id=mid, out_dir=out, batch_size=4)
    assert summary["scored_shards"] == 2 and summary["samples_scored"] == {"alt": 12, "altogether": 11}
    url = expand_shards(pattern)[0]
    alt = read_sidecar_fields(sidecar_path(url, "clip_score_alt", out), shard=url)["clip_score"]
    # direct check of one cosine
    from PIL import Image

    from tests.conftest import jpeg_bytes

    with torch.no_grad():
        import io

        img = model.encode_image(pre(Image.open(io.BytesIO(jpeg_bytes((200, 30, 30)))).convert("RGB"))[None])
        txt = model.encode_text(tok(["alt text 000000001"]))
        cos = torch.nn.functional.cosine_similarity(img, txt).item()
    assert alt["000000001"] == pytest.approx(cos, abs=1e-5)
    again = score_shards(model, tok, pre, pattern, ["alt", "altogether"], model_id=mid, out_dir=out)
    assert again["skipped"] == 2 and again["scored_shards"] == 0  # resumable: complete sidecars are kept
    Path(sidecar_path(url, "clip_score_altogether", out)).unlink()
    third = score_shards(model, tok, pre, pattern, ["alt", "altogether"], model_id=mid, out_dir=out)
    assert third["scored_shards"] == 1 and third["samples_scored"] == {"alt": 0, "altogether": 5}
    samples = _run(pattern, Mixture.from_p(0.5), GateSpec())
    assert sum(s["caption_wanted"] != ALT for s in samples) == 6  # p=0.5 of 12 scored samples
