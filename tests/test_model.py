"""Scoring with the bundled model: batches of any size give the same scores, and bulk scoring
(emergency mode) stays within its rounding of the exact scores on a crafted flood."""

from __future__ import annotations

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether

import quietwire.agent.detect.model as model_module
from quietwire.agent.detect.model import ScoringModel, round_mantissa

from .conftest import meter_file, write_pcap


def test_round_mantissa():
    x = np.array([0, 1, 3, 64, 65, 66, 67, 517, -0.0044, np.nan, np.inf, -np.inf], np.float32)
    r = round_mantissa(x, 5)
    np.testing.assert_array_equal(r[:4], [0, 1, 3, 64])  # small integers are exact
    assert r[4] in (64, 66) and r[5] == 66 and r[6] in (66, 68)  # 2**-6 steps at 64
    finite = np.isfinite(x) & (x != 0)
    assert (np.abs(r[finite] - x[finite]) <= np.abs(x[finite]) * 2.0**-6).all()
    assert np.isnan(r[9]) and r[10] == np.inf and r[11] == -np.inf
    a, b = round_mantissa(np.array([np.nan], np.float32), 5), np.array([np.nan], np.float32)
    assert a.tobytes() == round_mantissa(-b, 5).tobytes()  # one NaN bit pattern


def flood_features(tmp_path, n=3000):
    rng = np.random.default_rng(3)
    picks = rng.choice(250 * 250, n, replace=False)
    pkts = [
        Ether()
        / IP(src=f"198.51.{1 + k // 250}.{1 + k % 250}", dst="10.0.0.80")
        / TCP(sport=int(1024 + k % 60000), dport=80, flags="S")
        for k in picks.tolist()
    ]
    return meter_file(write_pcap(tmp_path / "f.pcap", pkts, [1e-4 * i for i in range(n)])).features


def test_batches_of_any_size_score_the_same(tmp_path, monkeypatch):
    x = flood_features(tmp_path, 1000)
    model = ScoringModel()
    whole = model.score(x)
    monkeypatch.setattr(model_module, "SCORE_BATCH", 64)
    parts = model.score(x)
    np.testing.assert_allclose(parts.score, whole.score, rtol=1e-5)
    np.testing.assert_allclose(parts.contributions, whole.contributions, rtol=1e-4, atol=1e-5)


def test_bulk_scores_a_flood_by_its_distinct_shapes(tmp_path):
    """3,000 spoofed SYNs differ only in counts: bulk scoring scores each distinct rounded row
    once; every flow's scores stay within the rounding of the exact ones."""
    x = flood_features(tmp_path)
    model = ScoringModel()
    exact, bulk = model.score(x), model.score_bulk(x)
    rows = round_mantissa(x, 5)
    distinct = len(np.unique(rows.view(np.dtype((np.void, rows.shape[1] * 4))).ravel()))
    print(f"3000 flood flows, {distinct} distinct rounded rows")
    assert distinct < 300
    rel = np.abs(bulk.score - exact.score) / np.abs(exact.score)
    assert rel.max() < 0.02
    assert np.abs(bulk.tail_probability - exact.tail_probability).max() < 0.02
    # the same rows decide the same way at every calibrated threshold but a hair's breadth
    for fpr, thr in model.thresholds.items():
        flips = (bulk.score > thr) != (exact.score > thr)
        near = np.abs(exact.score - thr) < 0.02 * thr
        assert not (flips & ~near).any(), fpr


def test_mixed_scoring_is_bulk_where_asked_and_exact_elsewhere(tmp_path):
    """The rest of a flood after emergency mode ended: its flows scored as in bulk, the
    others exactly, each row where it was."""
    from quietwire.agent.detect.model import ScoringModel

    x = flood_features(tmp_path)[:500]
    model = ScoringModel()
    bulk = np.zeros(len(x), dtype=bool)
    bulk[::3] = True
    mixed = model.score_mixed(x, bulk)
    exact, in_bulk = model.score(x[~bulk]), model.score_bulk(x[bulk])
    np.testing.assert_array_equal(mixed.score[~bulk], exact.score)
    np.testing.assert_array_equal(mixed.contributions[~bulk], exact.contributions)
    np.testing.assert_array_equal(mixed.score[bulk], in_bulk.score)
    np.testing.assert_array_equal(mixed.tail_probability[bulk], in_bulk.tail_probability)


def test_a_model_of_the_previous_schema_is_refused_with_how_to_retrain(tmp_path):
    """A schema-v3 model (before payload statistics) is refused, naming both schemas and the
    command that makes a matching one."""
    import onnx

    from quietwire.agent.detect.model import DEFAULT_MODEL, ModelError, ScoringModel

    model = onnx.load(str(DEFAULT_MODEL))
    for prop in model.metadata_props:
        if prop.key == "schema_hash":
            prop.value = "0b1a154b90a51c1a"  # schema v3's hash
        if prop.key == "schema_version":
            prop.value = "3"
    old = tmp_path / "v3.onnx"
    onnx.save_model(model, str(old))
    with pytest.raises(ModelError) as info:
        ScoringModel(old)
    message = str(info.value)
    assert message.startswith(f"{old}: model expects feature schema 0b1a154b90a51c1a (v3)")
    assert "(v4); retrain it with this version: quietwire train --benign" in message


def test_features_that_do_not_apply_are_never_named(tmp_path):
    """A SYN probe has no payload (its payload statistics are NaN): none of them is among
    the features that explain its score, though the model's error touches their inputs."""
    from quietwire.agent.features.schema import FEATURE_NAMES

    pkts = [
        Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000 + i, dport=i + 1, flags="S")
        for i in range(30)
    ]
    flows = meter_file(write_pcap(tmp_path / "p.pcap", pkts, [0.01 * i for i in range(30)]))
    scores = ScoringModel().score(flows.features)
    nan = np.isnan(flows.features)
    assert nan.any(axis=0)[FEATURE_NAMES.index("http_uri_specials")]
    assert (scores.contributions[nan] == 0).all() and (scores.contributions[~nan] > 0).any()
    named = {name for flow in scores.top_features(5) for name, _ in flow}
    assert not named & {FEATURE_NAMES[j] for j in np.flatnonzero(nan.all(axis=0))}
