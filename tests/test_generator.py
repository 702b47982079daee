"""The generator (trainer/synthesis/generator.py) and the fidelity report (trainer/synthesis/fidelity.py): the
schema's rules hold on real flows and on generated ones, the two-sample test can tell garbage
from flows and cannot tell two halves of one set apart, the written flow table carries only
documentation addresses, and `quietwire train --augment N` adds N flows."""

from __future__ import annotations

import csv
import ipaddress
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")

from quietwire.agent.features.schema import FEATURE_NAMES  # noqa: E402
from quietwire.agent.output.flowtable import read_flow_table  # noqa: E402
from quietwire.cli import main  # noqa: E402
from quietwire.trainer.data import load_labels  # noqa: E402
from quietwire.trainer.evaluation.evaluate import _features  # noqa: E402
from quietwire.trainer.synthesis.fidelity import (  # noqa: E402
    classifier_auc,
    compare,
    constraint_violations,
    violation_share,
)
from quietwire.trainer.synthesis.generator import (  # noqa: E402
    Encoding,
    FlowGenerator,
    GeneratorConfig,
    GeneratorError,
    assemble,
    free_columns,
    generator_path,
    write_flow_table,
)
from quietwire.trainer.traffic.trafficgen import flow_kinds, generate, read_labels  # noqa: E402

J = {name: j for j, name in enumerate(FEATURE_NAMES)}


def _benign(workdir, seed: int, scale: float) -> np.ndarray:
    pcap, labels = workdir / f"b{seed}.pcap", workdir / f"b{seed}.csv"
    generate(pcap, labels, seed=seed, scale=scale, attack_share=0.0)
    lab = read_labels(labels)
    parts = _features(pcap)
    kinds = np.concatenate([flow_kinds(p.records, lab) for p in parts])
    return np.concatenate([p.features for p in parts])[kinds == "benign"]


@pytest.fixture(scope="module")
def benign(tmp_path_factory) -> np.ndarray:
    """Benign flows of trafficgen's office network, through the agent's meter."""
    return _benign(tmp_path_factory.mktemp("gen"), seed=0, scale=0.4)


@pytest.fixture(scope="module")
def fitted(benign) -> FlowGenerator:
    return FlowGenerator(GeneratorConfig(train_steps=300, width=64, steps=50)).fit(benign)


def test_real_flows_break_no_rule(ndpi, benign):
    """The rules are the schema's: every real flow keeps them (nDPI captures, benign and
    malicious, and trafficgen's)."""
    labels = load_labels()
    names = labels["benign"][:15] + list(labels["malicious"])[:8]
    x = np.concatenate([p.features for n in names for p in _features(ndpi / "pcap" / n)] + [benign])
    assert len(x) > 1000
    broken = {k: int(v.sum()) for k, v in constraint_violations(x).items() if v.any()}
    assert broken == {}


def test_rules_catch_broken_rows(benign):
    x = benign.copy()
    rows = {}
    tcp = np.flatnonzero((x[:, J["proto_tcp"]] == 1) & (x[:, J["src2dst_packets"]] >= 3))
    i = tcp[0]
    x[i, J["src2dst_pkt_len_min"]] = x[i, J["src2dst_pkt_len_mean"]] + 5
    rows["min <= mean <= max"] = i
    one = np.flatnonzero(x[:, J["dst2src_packets"]] == 1)[0]
    x[one, J["dst2src_pkt_len_std"]] = 3.0
    rows["one packet (or one gap): std 0"] = one
    x[tcp[1], J["src2dst_syn_packets"]] = np.nan
    rows["NaN where a feature does not apply"] = tcp[1]
    x[tcp[2], J["dst_port_registered"]] = 1.0
    x[tcp[2], J["dst_port_well_known"]] = 1.0
    rows["protocol and port class valid"] = tcp[2]
    x[tcp[3], J["src2dst_packets"]] += 0.5
    rows["counts are non-negative integers"] = tcp[3]
    found = constraint_violations(x)
    for rule, row in rows.items():
        assert found[rule][row], rule
    flagged = np.logical_or.reduce(list(found.values()))
    assert sorted(np.flatnonzero(flagged).tolist()) == sorted(set(rows.values()))


def test_generated_rows_keep_the_rules(fitted, benign):
    x = fitted.sample(400, seed=1)
    assert x.shape == (400, len(FEATURE_NAMES)) and fitted.last_rate > 0
    share, by_rule = violation_share(x)
    assert share == 0.0, {k: v for k, v in by_rule.items() if v}
    # by construction, not by luck: any point of model space assembles into valid flows
    enc = Encoding.fit(free_columns(benign))
    z = np.random.default_rng(0).normal(0, 3, (2000, enc.width)).astype(np.float32)
    garbage, repairs = assemble(enc.decode(z))
    assert violation_share(garbage)[0] == 0.0
    assert repairs  # random points do need the repair step, and it says so


def test_modelled_columns_give_back_real_flows(benign):
    """The modelled columns say everything: assembling a real flow's own free columns gives it
    back (lengths' min and max as they are, gaps' as ratios to the mean, every std as its
    share of what min, mean, max and count allow), with nothing for the repair step to move."""
    free = free_columns(benign)
    for name in [k for k in free if k.endswith("_std_share")]:
        present = free[name][~np.isnan(free[name])]
        assert len(present) and present.min() >= 0 and present.max() <= 1, name
    x, repairs = assemble(free)
    assert repairs == {}
    same = np.isclose(x, benign, rtol=1e-4, atol=1e-6) | (np.isnan(x) & np.isnan(benign))
    assert same.all(), [FEATURE_NAMES[j] for j in np.flatnonzero(~same.all(0))]


def test_missing_values_follow_rules_that_read_missing_values(benign):
    """A decoded HTTP request in a flow whose client sent no payload: the request is missing
    (no client payload), so are all its statistics (no request), not only the first."""
    free = free_columns(benign)
    rows = np.flatnonzero(free["http_request"] == 1)[:5]
    assert len(rows)
    for name in ("src2dst_payload_packets", "src2dst_payload_bytes"):
        free[name][rows] = 0
    x, _ = assemble(free)
    assert violation_share(x)[0] == 0.0
    assert np.isnan(x[rows, J["http_request"]]).all()
    assert np.isnan(x[rows, J["http_header_count"]]).all()


def test_encoding_round_trip_of_real_flows(benign):
    """Categories come back exactly; quantile-coded columns within their table's steps."""
    free = free_columns(benign)
    enc = Encoding.fit(free)
    back = enc.decode(enc.encode(free))
    for name in enc.categorical:
        ok = ~np.isnan(free[name])
        np.testing.assert_array_equal(back[name][ok], free[name][ok])
    x, _ = assemble(back)
    assert violation_share(x)[0] == 0.0
    assert np.array_equal(np.isnan(x), np.isnan(benign))


def test_missing_values_of_a_category_are_a_class(benign):
    """A category with missing values in the training flows has a last "missing" class: every
    row has exactly one hot entry, the missing rows in that class (what cross-entropy
    trains on), and decoding never gives "missing" (the schema's rules say where it is)."""
    free = free_columns(benign)
    enc = Encoding.fit(free)
    z = enc.encode(free)
    classes = enc.classes(z)
    k = enc.categorical.index("src2dst_syn_packets")  # missing for every flow but TCP
    assert enc.missing[k] and enc.block_sizes()[k] == len(enc.values[k]) + 1
    np.testing.assert_array_equal(
        classes[:, k] == enc.block_sizes()[k] - 1, np.isnan(free["src2dst_syn_packets"])
    )
    cats = z[:, len(enc.numeric) :]
    assert ((cats == 1).sum(1) == len(enc.categorical)).all()
    back = enc.decode(z, np.random.default_rng(0))
    assert not any(np.isnan(back[name]).any() for name in enc.categorical)


class _FixedLogits:
    """A stand-in denoiser: no noise predicted, fixed logits for every category."""

    def __init__(self, enc: Encoding, logits: dict[str, np.ndarray]) -> None:
        import torch

        row = np.zeros(enc.width, np.float32)
        pos = len(enc.numeric)
        for name, size in zip(enc.categorical, enc.block_sizes()):
            row[pos : pos + size] = logits.get(name, np.zeros(size))
            pos += size
        self.row = torch.from_numpy(row)

    def __call__(self, x, t):
        return self.row.expand(len(x), -1)


def test_categories_are_drawn_with_the_networks_probabilities(benign):
    """The sampler follows the network's class probabilities (not a regression of the
    one-hot): fixed logits for the protocol's classes give those shares within binomial
    noise (4 SD of 4,000 draws)."""
    gen = FlowGenerator(GeneratorConfig(steps=20))
    gen.encoding = enc = Encoding.fit(free_columns(benign))
    k = enc.categorical.index("proto")
    values = enc.values[k]  # trafficgen's flows: TCP and UDP
    assert len(values) >= 2 and not enc.missing[k]
    want = np.arange(1, len(values) + 1) / np.arange(1, len(values) + 1).sum()
    gen.denoiser = _FixedLogits(enc, {"proto": np.log(want)})
    free = enc.decode(gen.sample_inputs(4000, seed=0), np.random.default_rng(1))
    shares = np.array([np.mean(free["proto"] == v) for v in values])
    assert np.all(np.abs(shares - want) <= 4 * np.sqrt(want * (1 - want) / 4000)), shares


def test_generated_categories_have_the_training_shares(fitted, benign):
    """Each category's shares in 2,000 generated flows against the training flows': mean
    total-variation distance over the categorical columns. The fixture's small generator
    (300 steps, width 64) gave 0.034-0.106 over generator seeds 0-8 (categories as
    cross-entropy-trained logits); with categories as regressed one-hots decoded by argmax
    it gave 0.152-0.192 (seeds 0-3)."""
    free, real = free_columns(fitted.sample(2000, seed=5)), free_columns(benign)
    distances = []
    for name in fitted.encoding.categorical:
        a, b = real[name], free[name]
        values = np.unique(np.r_[a[~np.isnan(a)], b[~np.isnan(b)]])
        distances.append(0.5 * sum(abs(np.mean(a == v) - np.mean(b == v)) for v in values))
    assert np.mean(distances) < 0.13, np.mean(distances)


def test_export_and_load(fitted, tmp_path):
    path = fitted.export(tmp_path / "m.gen.onnx")
    assert path.stat().st_size < 2 << 20
    loaded = FlowGenerator.load(path)
    torch_x = fitted.sample(200, seed=4)
    onnx_x = loaded.sample(200, seed=4)
    assert violation_share(onnx_x)[0] == 0.0
    # the file's graph is the torch network's arithmetic: the same draws, the same flows
    same = np.isclose(torch_x, onnx_x, rtol=1e-3, atol=1e-4) | (
        np.isnan(torch_x) & np.isnan(onnx_x)
    )
    assert same.mean() > 0.99
    # a file whose modelled columns are not this code's (an older layout) is refused by name
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "layout":
            layout = json.loads(prop.value)
            layout["numeric"] = layout["numeric"][1:]
            prop.value = json.dumps(layout)
    onnx.save(model, str(tmp_path / "old.gen.onnx"))
    with pytest.raises(GeneratorError, match="old.gen.onnx: generator of other modelled columns"):
        FlowGenerator.load(tmp_path / "old.gen.onnx")
    # a generator of the first kind (categories as regressed one-hots) too
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "quietwire_generator":
            prop.value = "1"
    onnx.save(model, str(tmp_path / "v1.gen.onnx"))
    with pytest.raises(GeneratorError, match="v1.gen.onnx: generator of an older kind"):
        FlowGenerator.load(tmp_path / "v1.gen.onnx")
    (tmp_path / "bad.gen.onnx").write_bytes(b"nope")
    with pytest.raises(GeneratorError, match="bad.gen.onnx"):
        FlowGenerator.load(tmp_path / "bad.gen.onnx")


def test_two_sample_test_can_fail(benign, tmp_path):
    """Two halves of one real set: ~0.5. The same rows with each column shuffled on its own
    (marginals kept, rows broken): trees see it. Rows of noise: both see it."""
    rng = np.random.default_rng(0)
    x = benign[rng.permutation(len(benign))]
    a, b = x[: len(x) // 2], x[len(x) // 2 :]
    assert abs(classifier_auc(a, b, "logistic") - 0.5) < 0.1
    assert abs(classifier_auc(a, b, "trees") - 0.5) < 0.1
    shuffled = np.stack([rng.permutation(col) for col in b.T], axis=1)
    assert classifier_auc(a, shuffled, "trees") > 0.85
    noise = b * rng.lognormal(0, 1, b.shape).astype(np.float32)
    report = compare(a, noise)
    assert report.classifier_auc > 0.8 and report.trees_auc > 0.9
    assert report.violations > 0.5  # noisy counts are not counts
    assert compare(a, b).violations == 0.0


def test_flow_table_has_only_documentation_addresses(fitted, tmp_path):
    x = fitted.sample(150, seed=2)
    out = tmp_path / "synthetic.csv"
    write_flow_table(out, x, seed=2)
    docs = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32")]
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 150
    for row in rows:
        for field in ("src_ip", "dest_ip"):
            addr = ipaddress.ip_address(row[field])
            assert any(addr in net for net in docs), row[field]
        wk = x[int(row["flow_id"]), J["dst_port_well_known"]]
        if row["dest_port"]:
            assert (int(row["dest_port"]) < 1024) == (wk == 1)
        else:
            assert np.isnan(wk)
    back = read_flow_table(out)
    np.testing.assert_array_equal(np.isnan(back), np.isnan(x))
    np.testing.assert_allclose(np.nan_to_num(back), np.nan_to_num(x), rtol=1e-6)


def test_train_augment_and_sample_commands(tmp_path, capsys, benign):
    table = tmp_path / "benign.csv"
    write_flow_table(table, benign[:120])
    model = tmp_path / "m.onnx"
    args = ["train", "--benign", str(table), "-o", str(model), "--train-steps", "30"]
    assert main([*args, "--augment", "50"]) == 0
    printed = capsys.readouterr()
    assert "augmented: 50 synthetic flows from the generator added to 120 benign ones" in (
        printed.err
    )
    assert "records: 136 trained, 34 held out for calibration" in printed.out  # 120 + 50
    assert generator_path(model).exists()
    synth = tmp_path / "s.csv"
    code = main(
        ["sample", "--model", str(model), "-n", "60", "-o", str(synth), "--compare", str(table)]
    )
    assert code == 0
    printed = capsys.readouterr()
    assert "flows/s" in printed.err
    assert "classifier AUC synthetic vs real" in printed.out
    assert "rows breaking a schema rule: 0.0000" in printed.out
    assert read_flow_table(synth).shape == (60, len(FEATURE_NAMES))
    # the generator is its own network: the scorer trained beside it is the same
    with_gen = tmp_path / "g.onnx"
    assert main([*args[:3], "-o", str(with_gen), "--train-steps", "30"]) == 0
    no_gen = tmp_path / "n.onnx"
    assert (
        main([*args[:3], "-o", str(no_gen), "--train-steps", "30", "--generator-steps", "0"]) == 0
    )
    capsys.readouterr()
    assert generator_path(with_gen).exists() and not generator_path(no_gen).exists()
    weights = [
        {t.name: numpy_helper.to_array(t) for t in onnx.load(str(m)).graph.initializer}
        for m in (with_gen, no_gen)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert main(["sample", "--model", str(no_gen)]) == 2
    assert "n.gen.onnx: no generator beside the model" in capsys.readouterr().err
