"""Burst balancing: how much one flow counts when a model is fitted or calibrated.

A burst of near-identical flows (one scanner's probes, one flooder's packets, a spoofed flood's
forged sources) would otherwise count as many flows: in training it would teach the model that
the burst is normal, in calibration it would set the thresholds. One rule, numpy only, used
by both: the trainer's sampling (trainer/model/detector.py) and `quietwire calibrate`'s weighted
quantiles (calibrate.py).
"""

from __future__ import annotations

import numpy as np

from quietwire.agent.features.schema import FEATURE_NAMES

CLIENT_COUNT = "src_host_flows"  # flows the client started in the context window
SERVER_COUNT = "dst_host_distinct_src_hosts"  # distinct clients of the server in the window


def burst_weights(features: np.ndarray, client: int, server: int = 0) -> np.ndarray | None:
    """Per-flow weights min(1, client / the client's flows, server / the server's distinct
    clients) in the context window (float64, in (0, 1]), or None when both bounds are 0 (off).

    One scanner's probes share the first count; a spoofed SYN flood's flows (one forged source
    each) the second. The server side needs a larger bound: a popular server's many real
    clients are no burst, and down-weighting them would make flows to rare servers (a C2
    beacon's) look commoner. Both counts run up within the window, so a burst of N flows
    weighs about client * (1 + ln(N / client)) in all, not N.
    """
    if not client and not server:
        return None
    x = np.asarray(features)

    def bound(limit: int, name: str) -> np.ndarray:
        if not limit:
            return np.ones(len(x))
        # In the features' own precision (float32), as training has always computed it: the
        # same weights draw the same training batches.
        count = np.nan_to_num(x[:, FEATURE_NAMES.index(name)], nan=1.0)
        return np.minimum(1.0, limit / np.maximum(count, 1.0))

    w = np.minimum(bound(client, CLIENT_COUNT), bound(server, SERVER_COUNT))
    return w.astype(np.float64)
