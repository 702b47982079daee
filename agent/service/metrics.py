"""Prometheus metrics of the agent, and the HTTP endpoint that serves them (optional TLS and
basic auth). Label values stay bounded: interfaces, reasons, severities and rule ids, never
addresses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import platform
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from quietwire import __version__
from quietwire.agent.capture.decode import DECODE_ERROR_REASONS
from quietwire.agent.errors import QuietwireError
from quietwire.agent.flow.records import END_REASONS
from quietwire.agent.flow.table import EVICTION_REASONS
from quietwire.agent.service.drift import ScoreDrift

SCORE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300)
# What can fail in the flow log (flowlog.FlowLog): the label values of its error counter.
FLOW_LOG_OPERATIONS = ("open", "write", "rotate", "compress", "retention")
# How a learning period's calibration ended (learning.Learner): its counter's label values.
LEARNING_RESULTS = ("calibrated", "too_few_flows", "failed")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """Every metric the agent exports, in its own registry."""

    def __init__(self) -> None:
        # Declared by group, in the order /metrics lists them.
        self.registry = CollectorRegistry()
        self._capture_metrics(self.registry)
        self._alert_metrics(self.registry)
        self._flow_log_metrics(self.registry)
        self._model_metrics(self.registry)
        self._learning_metrics(self.registry)
        self._daemon_metrics(self.registry)
        self._label_values()

    def _capture_metrics(self, r: CollectorRegistry) -> None:
        """Packets, decoding, flows and the flow tables, per interface and capture worker."""
        self.packets = Counter("quietwire_packets", "Packets read", ["interface"], registry=r)
        self.bytes = Counter(
            "quietwire_bytes", "Bytes read (on the wire)", ["interface"], registry=r
        )
        self.decode_errors = Counter(
            "quietwire_decode_errors", "Packets skipped, by reason", ["reason"], registry=r
        )
        self.flows = Counter(
            "quietwire_flows", "Flows ended, by end reason", ["reason"], registry=r
        )
        self.interim_records = Counter(
            "quietwire_interim_records",
            "Interim records scored: flows still open, judged at 60 s of age and each doubling",
            registry=r,
        )
        self.active_flows = Gauge(
            "quietwire_active_flows", "Flows open in the flow tables", registry=r
        )
        self.evictions = Counter(
            "quietwire_flow_table_evictions",
            "Flows ended early under table pressure, by reason: table_full (evicted for room, "
            "emergency mode off), emergency_unanswered, emergency_idle",
            ["reason"],
            registry=r,
        )
        self.emergency = Gauge(
            "quietwire_flow_table_emergency",
            "1 while the interface's flow table is in emergency mode",
            ["interface"],
            registry=r,
        )
        self.emergency_starts = Counter(
            "quietwire_flow_table_emergency_starts",
            "Times the interface's flow table entered emergency mode",
            ["interface"],
            registry=r,
        )
        self.kernel_drops = Counter(
            "quietwire_kernel_drops",
            "Packets the kernel dropped before capture, by interface and capture worker",
            ["interface", "worker"],
            registry=r,
        )
        self.sensor = Gauge(
            "quietwire_sensor_info",
            'The sensor\'s name (config "sensor", default the host name), as in its EVE lines',
            ["sensor"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "quietwire_capture_worker_restarts",
            "Capture workers that died and were started again (their open flows were lost)",
            registry=r,
        )

    def _alert_metrics(self, r: CollectorRegistry) -> None:
        """Alert lines, incidents, and what the budget, allowlists and repeats held back."""
        self.alerts = Counter(
            "quietwire_alerts",
            "Alert lines written (incident open/update/close, or per-flow alerts)",
            ["severity", "rule"],
            registry=r,
        )
        self.incidents = Counter(
            "quietwire_incidents", "Incidents opened, by cause", ["cause"], registry=r
        )
        self.open_incidents = Gauge("quietwire_open_incidents", "Incidents open now", registry=r)
        self.alert_write_errors = Counter(
            "quietwire_alert_write_errors",
            "Writes of alert lines that failed (full disk, read-only or missing file, ...)",
            registry=r,
        )
        self.alert_lines_dropped = Counter(
            "quietwire_alert_lines_dropped",
            "Alert lines lost: past the queue held while the alert file could not be written",
            registry=r,
        )
        self.alert_lines_queued = Gauge(
            "quietwire_alert_lines_queued",
            "Alert lines waiting for the alert file to take writes again",
            registry=r,
        )
        self.risk_threshold = Gauge(
            "quietwire_risk_threshold",
            "Excess risk (over the host's baseline) that raises an incident",
            registry=r,
        )
        self.incident_budget = Gauge(
            "quietwire_incident_budget",
            "Benign incidents per 100 host-days the risk threshold was fitted for (0: not fitted)",
            registry=r,
        )
        self.entity_risk = Gauge(
            "quietwire_entity_risk_top",
            "The risk of the riskiest entities now, by rank (1 = the riskiest)",
            ["rank"],
            registry=r,
        )
        self.risk_entities = Gauge(
            "quietwire_risk_entities", "Entities (role, host) with risk tracked", registry=r
        )
        self.incidents_unraised = Counter(
            "quietwire_incidents_unraised",
            "Incidents that closed below the risk threshold (no line written)",
            registry=r,
        )
        self.evidence_dropped = Counter(
            "quietwire_incident_evidence_dropped",
            "Evidence flows no incident could take (incidents.max_open reached)",
            registry=r,
        )
        self.held_back = Counter(
            "quietwire_alert_lines_held_back",
            "Alert lines the line budget held back, by cause",
            ["cause"],
            registry=r,
        )
        self.suppressed = Counter(
            "quietwire_alerts_suppressed",
            "Alerts not written: allowlisted or repeated",
            ["rule", "reason"],
            registry=r,
        )

    def _flow_log_metrics(self, r: CollectorRegistry) -> None:
        self.flow_log_lines = Counter(
            "quietwire_flow_log_lines", "Flow records written to the flow log", registry=r
        )
        self.flow_log_bytes = Counter(
            "quietwire_flow_log_bytes", "Bytes written to the flow log", registry=r
        )
        self.flow_log_errors = Counter(
            "quietwire_flow_log_errors",
            "Flow log operations that failed (full disk, unwritable directory), by operation: "
            "open, write, rotate, compress, retention",
            ["operation"],
            registry=r,
        )
        self.flow_log_dropped = Counter(
            "quietwire_flow_log_lines_dropped",
            "Flow records not written to the flow log because an operation failed",
            registry=r,
        )

    def _model_metrics(self, r: CollectorRegistry) -> None:
        """The live model, its scores and their drift from its calibration."""
        self.score = BulkHistogram(
            "quietwire_flow_score",
            "Anomaly scores of flow records (ended, and interim)",
            SCORE_BUCKETS,
            registry=r,
        )
        self.scoring_seconds = Histogram(
            "quietwire_scoring_batch_seconds",
            "Time to score one batch of flows",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "quietwire_model_info",
            "The loaded model (value 1)",
            ["version", "schema_hash", "score"],
            registry=r,
        )
        self.model_loaded = Gauge(
            "quietwire_model_load_timestamp_seconds",
            "When the current model was loaded",
            registry=r,
        )
        self.threshold = Gauge(
            "quietwire_model_threshold",
            "The live model's score threshold at each false-positive rate",
            ["fpr"],
            registry=r,
        )
        self.drift = ScoreDrift(registry=r)

    def _learning_metrics(self, r: CollectorRegistry) -> None:
        self.learning = Gauge(
            "quietwire_learning_active",
            "1 during a learning period (unknown_anomaly incidents held back)",
            registry=r,
        )
        self.learning_left = Gauge(
            "quietwire_learning_seconds_left",
            "Seconds until the learning period ends and the model is calibrated",
            registry=r,
        )
        self.learning_progress = Gauge(
            "quietwire_learning_progress_ratio",
            "Share of the learning period done (0 to 1)",
            registry=r,
        )
        self.learning_held_back = Counter(
            "quietwire_learning_incidents_held_back",
            "Incidents not raised during the learning period, by cause (unknown_anomaly)",
            ["cause"],
            registry=r,
        )
        self.learning_calibrations = Counter(
            "quietwire_learning_calibrations",
            "Calibrations at the end of a learning period, by result: calibrated, "
            "too_few_flows (old thresholds kept), failed",
            ["result"],
            registry=r,
        )

    def _daemon_metrics(self, r: CollectorRegistry) -> None:
        """Reloads and the build."""
        self.reloads = Counter(
            "quietwire_config_reloads", "Reloads (SIGHUP), by result", ["result"], registry=r
        )
        self.reload_ok = Gauge(
            "quietwire_config_last_reload_successful",
            "1 if the last reload succeeded (or none was tried)",
            registry=r,
        )
        self.build_info = Gauge(
            "quietwire_build_info", "quietwire build (value 1)", ["version", "python"], registry=r
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.reload_ok.set(1)

    def _label_values(self) -> None:
        """Every label value known in advance, so its series is exported from the start (at 0)."""
        for reason in DECODE_ERROR_REASONS:
            self.decode_errors.labels(reason)
        for reason in END_REASONS:
            if reason != "interim":
                self.flows.labels(reason)
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for operation in FLOW_LOG_OPERATIONS:
            self.flow_log_errors.labels(operation)
        for result in LEARNING_RESULTS:
            self.learning_calibrations.labels(result)
        self.learning_held_back.labels("unknown_anomaly")

    def set_model(
        self,
        version: str,
        schema_hash: str,
        score: str,
        loaded_at: float,
        thresholds: dict[float, float] | None = None,
        table: np.ndarray | None = None,
    ) -> None:
        """A model went live: its info, its thresholds, and the drift gauges' new reference
        (its calibration ``table``; the drift window starts empty)."""
        self.model_info.clear()
        self.model_info.labels(version, schema_hash, score).set(1)
        self.model_loaded.set(loaded_at)
        self.threshold.clear()
        for fpr, value in (thresholds or {}).items():
            self.threshold.labels(f"{fpr:g}").set(value)
        self.drift.reset(thresholds or {}, table)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServerError(QuietwireError):
    """The metrics endpoint cannot start (address in use, bad certificate, unsafe settings)."""


class BulkHistogram(Collector):
    """A histogram fed a whole batch at once (numpy), so a flood of flows costs one bucket
    count per batch, not one locked observe() per flow. Exposed like prometheus_client's."""

    def __init__(self, name: str, documentation: str, buckets, registry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        counts = np.bincount(
            np.searchsorted(self.bounds, values, side="left"), minlength=len(self._counts)
        )
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self):
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        edges = [floatToGoString(b) for b in self.bounds.tolist()] + ["+Inf"]
        yield HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(edges, cumulative)),
            sum_value=total,
        )


@dataclass(frozen=True)
class ServerSettings:
    listen: str = "127.0.0.1"
    port: int = 9109
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password_sha256: str | None = None
    # Basic auth sends the password in clear text without TLS: refused unless the operator
    # says so explicitly (e.g. the endpoint only listens on loopback behind a TLS proxy).
    allow_plaintext_auth: bool = False
    # A client gets this long for the TLS handshake and for each read; past it, it is dropped.
    timeout_s: float = 5.0
    # Connections handled at once; more are closed at once, so idle ones cannot pile up.
    max_connections: int = 16

    def __post_init__(self) -> None:
        if self.username and not self.tls_cert and not self.allow_plaintext_auth:
            raise ValueError(
                "metrics: basic_auth without TLS sends the password in clear text; set "
                "tls_cert/tls_key, or allow_plaintext_auth: true to accept that"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"metrics.timeout_s: expected a positive number, got {self.timeout_s}")
        if self.max_connections < 1:
            raise ValueError(
                f"metrics.max_connections: expected at least 1, got {self.max_connections}"
            )


class MetricsServer:
    """GET /metrics over HTTP(S) in background threads.

    The accept loop only accepts: each connection is handled in its own thread, where the TLS
    handshake and every read run under ``timeout_s``, and at most ``max_connections`` are
    handled at once (more are closed at once). So a client that connects and says nothing
    delays nobody, and idle connections cannot pile up threads."""

    def __init__(self, metrics: Metrics, settings: ServerSettings) -> None:
        expected = None
        if settings.username:
            expected = (settings.username, (settings.password_sha256 or "").lower())

        class Handler(BaseHTTPRequestHandler):
            timeout = settings.timeout_s  # every read of the request, after the handshake

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                if expected and not _authorized(self.headers.get("Authorization"), expected):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="quietwire"')
                    self.end_headers()
                    return
                body = metrics.exposition()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not log lines
                pass

        tls = None
        if settings.tls_cert:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                tls.load_cert_chain(settings.tls_cert, settings.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise MetricsServerError(
                    f"metrics: cannot load tls_cert {settings.tls_cert} / tls_key "
                    f"{settings.tls_key}: {exc}"
                ) from exc
        try:
            self.httpd = _BoundedServer((settings.listen, settings.port), Handler, tls, settings)
        except OSError as exc:
            raise MetricsServerError(
                f"metrics: cannot listen on {settings.listen}:{settings.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, daemon=True, name="quietwire-metrics"
        )
        self._thread.start()

    @property
    def refused(self) -> int:
        """Connections closed at once because ``max_connections`` were being handled."""
        return self.httpd.refused

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections in flight and the TLS handshake moved
    from the accept loop into each connection's thread, under a timeout."""

    daemon_threads = True

    def __init__(self, address, handler, tls: ssl.SSLContext | None, settings: ServerSettings):
        self._tls = tls
        self._timeout_s = settings.timeout_s
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self.refused = 0
        super().__init__(address, handler)

    def verify_request(self, request, client_address) -> bool:
        if self._slots.acquire(blocking=False):
            return True
        self.refused += 1  # closed by the caller (shutdown_request)
        return False

    def process_request_thread(self, request, client_address) -> None:
        try:
            request.settimeout(self._timeout_s)
            if self._tls is not None:
                request = self._tls.wrap_socket(request, server_side=True)
            self.finish_request(request, client_address)
        except (OSError, ssl.SSLError):
            pass  # a client that timed out, hung up or spoke no TLS: nothing to answer
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()


def _authorized(header: str | None, expected: tuple[str, str]) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    digest = hashlib.sha256(password.encode()).hexdigest()
    return hmac.compare_digest(user, expected[0]) & hmac.compare_digest(digest, expected[1])
