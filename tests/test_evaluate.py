"""Evaluation: the metrics on cases with a known answer, the generator's labels, and a small
end-to-end run of `quietwire eval` on the generated set."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="the trainer extra (torch) is not installed")
pytest.importorskip("sklearn", reason="scikit-learn (dev extra) is not installed")

from quietwire.agent.features.schema import FEATURE_NAMES  # noqa: E402
from quietwire.cli import main  # noqa: E402
from quietwire.trainer.data import load_labels  # noqa: E402
from quietwire.trainer.evaluation.evaluate import (  # noqa: E402
    DiffusionBaseline,
    auprc,
    generated_set,
    mean_report,
    payload_borne,
    payload_borne_files,
    payload_table,
    recall_at_fpr,
    report,
)
from quietwire.trainer.model.detector import TrainConfig, host_weights  # noqa: E402
from quietwire.trainer.synthesis.fidelity import auroc  # noqa: E402
from quietwire.trainer.traffic.trafficgen import ATTACKS, WEB_ATTACKS, generate, read_labels  # noqa: E402

from .conftest import meter_file  # noqa: E402


def test_perfect_and_random_scorers():
    rng = np.random.default_rng(0)
    benign, attack = rng.normal(0, 1, 5000), rng.normal(10, 1, 500)
    assert auroc(attack, benign) == 1.0 and auprc(attack, benign) == 1.0
    assert recall_at_fpr(attack, benign, 1e-3) == 1.0
    noise_b, noise_a = rng.random(20000), rng.random(2000)
    assert abs(auroc(noise_a, noise_b) - 0.5) < 0.02
    assert abs(auprc(noise_a, noise_b) - 2000 / 22000) < 0.01  # precision of a coin = base rate
    assert abs(recall_at_fpr(noise_a, noise_b, 0.01) - 0.01) < 0.01
    # hand-computed: scores 4,3 attack / 2,1 benign plus a tie
    assert auprc(np.array([4.0, 1.0]), np.array([3.0, 2.0])) == pytest.approx((1 + 0.5) / 2)
    r = report(np.array([0.0, 1.0, 2.0]), np.array([1.5, 3.0]), np.array(["a", "b"]), 1.2)
    assert r.confusion == {
        "true_positive": 2,
        "false_negative": 0,
        "false_positive": 1,
        "true_negative": 2,
    }
    assert r.per_attack["b"]["auroc"] == 1.0 and r.per_attack["a"]["auroc"] == pytest.approx(2 / 3)


def test_mean_over_seeds():
    kinds = np.array(["a", "b"])
    benign = np.array([0.0, 1.0, 2.0, 3.0])
    one = report(benign, np.array([2.5, 3.5]), kinds, 2.2)  # a: 3/4, b: 1
    two = report(benign, np.array([0.5, 1.5]), kinds, 2.2)  # a: 1/4, b: 2/4
    m = mean_report([one, two])
    assert m.runs == 2
    assert m.per_attack["a"]["auroc"] == pytest.approx(0.5)
    assert m.per_attack["b"]["auroc"] == pytest.approx(0.75)
    assert m.auroc == pytest.approx((one.auroc + two.auroc) / 2)
    assert m.type_mean == pytest.approx(0.625)
    assert m.sd["type_mean"] == pytest.approx(abs(one.type_mean - two.type_mean) / 2)
    assert m.confusion["true_positive"] == 1  # (2 + 0) / 2


def test_payload_borne_table():
    """The payload-borne types: the real set's by their label reasons, AUROC per detector
    and the mean over the types a set has flows of."""
    assert payload_borne_files(load_labels()) == (
        "WebattackRCE",
        "WebattackSQLinj",
        "log4j-webapp-exploit",
        "sql_injection",
        "xss",
    )
    assert payload_borne_files(
        {"malicious": {"a.pcap": {"reason": "XSS probe"}, "b.pcap": "scan"}}
    ) == ("a",)
    benign = np.array([0.0, 1.0, 2.0, 3.0])
    kinds = np.array(["web_sqli", "web_xss", "syn_scan"])
    reports = {
        "one": report(benign, np.array([2.5, 3.5, 9.0]), kinds, 2.2),  # sqli 3/4, xss 1
        "two": report(benign, np.array([0.5, 1.5, 9.0]), kinds, 2.2),  # sqli 1/4, xss 2/4
    }
    r = payload_borne(reports, ("web_sqli", "web_xss", "web_jndi"))  # no jndi flows here
    assert set(r["types"]) == {"web_sqli", "web_xss"}
    assert r["types"]["web_sqli"] == {"flows": 1, "auroc": {"one": 0.75, "two": 0.25}}
    assert r["mean_auroc"] == {"one": pytest.approx(0.875), "two": pytest.approx(0.375)}
    text = payload_table({"generated": r, "real": payload_borne(reports, ())})
    assert "web_sqli" in text and "mean over 2 types" in text and "0.875" in text
    assert "real" not in text.split("\n", 2)[2]  # a set without such types has no rows


def test_generator_labels_every_flow(tmp_path):
    pcap, labels = tmp_path / "g.pcap", tmp_path / "g.csv"
    info = generate(pcap, labels, seed=5, scale=0.2)
    assert info["attacks"] == len(ATTACKS)
    table = read_labels(labels)
    flows = meter_file(pcap).records
    kinds = []
    for i in range(len(flows)):
        a = (int(flows["src_lo"][i]) & 0xFFFFFFFF, int(flows["src_port"][i]))
        b = (int(flows["dst_lo"][i]) & 0xFFFFFFFF, int(flows["dst_port"][i]))
        kinds.append(table.get((int(flows["proto"][i]),) + tuple(sorted([a, b]))))
    assert None not in kinds  # every flow the meter finds has a label
    assert set(kinds) == {"benign", *ATTACKS}
    again = tmp_path / "h.pcap"
    generate(again, tmp_path / "h.csv", seed=5, scale=0.2)
    assert again.read_bytes() == pcap.read_bytes()  # seeded


def test_robust_weights_see_bursts_from_one_host_and_to_one_server(tmp_path):
    """Host balancing on the generator's capture: a scan's or UDP flood's flows (one source)
    are sampled far less than their share of flows by the client side; a spoofed SYN
    flood's flows (one forged source each) only by the server side; ordinary benign flows
    keep full weight."""
    s = generated_set(tmp_path, seed=5, scale=0.2)
    x = np.concatenate([s.train, s.benign, s.attack])
    kinds = np.concatenate([np.full(len(s.train) + len(s.benign), "benign"), s.kinds])
    w, client_only = host_weights(x, 10, 100).numpy(), host_weights(x, 10).numpy()
    assert host_weights(x, 0, 0) is None
    with pytest.raises(ValueError, match="server_balance"):
        TrainConfig(server_balance=-1)
    assert np.median(w[kinds == "benign"]) == 1.0

    def weight_share(weights, kind):
        return weights[kinds == kind].sum() / weights.sum()

    assert weight_share(w, "udp_flood") < (kinds == "udp_flood").mean() / 3
    assert np.median(w[kinds == "syn_scan"]) <= 0.1  # a scan's first probes are no burst yet
    flood = kinds == "syn_flood"
    assert np.nanmax(x[flood, FEATURE_NAMES.index("src_host_flows")]) <= 2
    assert (client_only[flood] == 1.0).all()
    assert np.median(w[flood]) < 0.4
    assert weight_share(w, "syn_flood") < 0.7 * weight_share(client_only, "syn_flood")

    # weight = min(1, 10 / the client's flows, 100 / the server's distinct clients)
    def count(name):
        return np.maximum(np.nan_to_num(x[:, FEATURE_NAMES.index(name)], nan=1.0), 1.0)

    expected = np.minimum.reduce(
        [np.ones(len(x)), 10 / count("src_host_flows"), 100 / count("dst_host_distinct_src_hosts")]
    )
    assert np.allclose(w, expected)


# Bound from the measured spread: generated sets of seeds 5-8 (scale 0.2) by training seeds
# 0-4, 150 steps (20 runs): SYN flood AUROC 0.984-1.0, SYN scan 0.969-1.0 against the
# held-out benign flows. One optimiser step (training seeds 0-4 on the sets of seeds 5 and 6):
# SYN flood 0.21-0.77, so every such run fails the bound.
OBVIOUS_ATTACK_AUROC = 0.9


def test_diffusion_separates_obvious_attacks(tmp_path):
    """A briefly trained diffusion detector ranks a SYN flood's and a SYN scan's flows above
    held-out benign flows of the generated set; the same bound refuses an untrained one."""
    s = generated_set(tmp_path, seed=5, scale=0.2)

    def separation(train_steps: int) -> dict[str, float]:
        det = DiffusionBaseline(TrainConfig(train_steps=train_steps)).fit(s.train, seed=0)
        benign = det.score(s.benign)
        return {
            k: auroc(det.score(s.attack[s.kinds == k]), benign) for k in ("syn_flood", "syn_scan")
        }

    trained, untrained = separation(150), separation(1)
    print(f"AUROC after 150 steps {trained}, after one step {untrained}")
    assert min(trained.values()) > OBVIOUS_ATTACK_AUROC, trained
    assert min(untrained.values()) < OBVIOUS_ATTACK_AUROC, untrained


def test_eval_command_small(tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--data",
                "generated",
                "--scale",
                "0.5",
                "--train-steps",
                "150",
                "--seeds",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    diffusion = f"diffusion ({TrainConfig.score})"
    for name in (diffusion, "isolation_forest", "lof", "autoencoder", "syn_scan"):
        assert name in text
    result = json.loads((out / "report.json").read_text())
    gen = result["generated"]
    assert set(gen) >= {
        diffusion,
        "isolation_forest",
        "lof",
        "autoencoder",
        "imbalance_auprc",
    }
    for det in (diffusion, "isolation_forest", "lof", "autoencoder"):
        assert 0.5 < gen[det]["auroc"] <= 1.0  # every detector beats chance on this set
        assert set(gen[det]["per_attack"]) == set(ATTACKS)
        assert gen[det]["runs"] == 2
    # incident-level results on a fresh capture: every attack type has its entry, and each
    # incident has a line at least (its open line may be held back by the line budget, which
    # a replay paces by traffic time)
    inc = gen["incidents"]
    assert set(inc["types"]) == set(ATTACKS)
    named = [k for k, t in inc["types"].items() if t["named"]]
    print(f"incident eval (150 training steps): named {sorted(named)}")
    assert len(named) >= 8  # a 150-step model; the full eval names all eleven (README)
    for t in inc["types"].values():
        assert t["lines_per_incident"] is None or t["lines_per_incident"] >= 1
    assert inc["risk_threshold"] > 0 and "risk threshold" in inc["risk_fit"]
    assert len(inc["curve"]) == 5 and inc["benign_host_days"] > 0
    assert "incidents on a fresh generated capture" in text
    # the payload-borne table: the five exploit types, every detector's AUROC
    assert "payload-borne attacks" in text
    borne = gen["payload_borne"]
    assert set(borne["types"]) == set(WEB_ATTACKS)
    for kind, t in borne["types"].items():
        assert t["flows"] > 0 and set(t["auroc"]) == set(gen["payload_borne"]["mean_auroc"])
        print(f"{kind}: " + ", ".join(f"{d} {v:.3f}" for d, v in t["auroc"].items()))
