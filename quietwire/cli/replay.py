"""The agent's commands: `replay`, `run` (the daemon), `check-config`, `rules check`."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from quietwire.agent.detect.incidents import IncidentSettings
from quietwire.agent.detect.model import DEFAULT_MODEL, ModelError, ScoringModel
from quietwire.agent.detect.rules import RuleError, load_rules
from quietwire.agent.flow.table import FlowConfig
from quietwire.agent.output.alerts import BudgetSettings
from quietwire.agent.output.flowlog import FlowLogSettings
from quietwire.agent.service.config import DEFAULT_RULES
from quietwire.agent.service.metrics import MetricsServerError, ServerSettings

from .common import DEFAULT_CAPTURE, error


def _listen(text: str) -> ServerSettings:
    host, _, port = text.rpartition(":")
    return ServerSettings(listen=host or "127.0.0.1", port=int(port))


def cmd_replay(args: argparse.Namespace) -> int:
    from quietwire.agent.service.daemon import ReplayOptions, replay
    from quietwire.agent.service.engine import EngineSettings

    try:
        flow_config = FlowConfig(
            idle_timeout_s=args.idle_timeout, active_timeout_s=args.active_timeout
        )
        serve = _listen(args.serve_metrics) if args.serve_metrics else None
        incidents = IncidentSettings(flow_alerts=args.flow_alerts)
        budget = BudgetSettings(lines_per_s=args.lines_per_s, burst=args.burst)
        flow_log = None
        if args.flow_log:
            flow_log = FlowLogSettings(
                path=args.flow_log,
                rotate_bytes=args.flow_log_rotate_bytes,
                rotate_age_s=args.flow_log_rotate_age,
                compress=not args.flow_log_no_gzip,
                retention_bytes=args.flow_log_retention_bytes,
            )
    except ValueError as exc:
        error(str(exc))
        return 2
    if args.workers < 1 or (args.workers > 1 and (args.realtime or args.speed is not None)):
        error("--workers: expected at least 1, and 1 with --realtime or --speed")
        return 2
    opts = ReplayOptions(
        files=args.files,
        model=args.model,
        rules=args.rules,
        alerts=None if args.alerts in (None, "-") else Path(args.alerts),
        stdout=args.alerts == "-",
        realtime=args.realtime or args.speed is not None,
        speed=args.speed or 1.0,
        serve=serve,
        engine=EngineSettings(flow=flow_config, incidents=incidents, budget=budget),
        flow_log=flow_log,
        workers=args.workers,
    )
    try:
        return replay(opts)
    except (ModelError, RuleError, MetricsServerError, OSError) as exc:
        error(str(exc))
        return 2


def cmd_run(args: argparse.Namespace) -> int:
    from quietwire.agent.capture.live import CaptureSetupError
    from quietwire.agent.service.config import ConfigError, load_config
    from quietwire.agent.service.daemon import run

    try:
        settings = load_config(args.config)
        return run(settings, args.config)
    except (
        ConfigError,
        ModelError,
        RuleError,
        CaptureSetupError,
        MetricsServerError,
        OSError,
    ) as exc:
        error(str(exc))
        return 2


def cmd_check_config(args: argparse.Namespace) -> int:
    from quietwire.agent.service.config import ConfigError, load_config
    from quietwire.agent.site.learning import format_duration

    try:
        settings = load_config(args.config)
        model = ScoringModel(settings.model)
        rules = load_rules(settings.rules)
    except (ConfigError, ModelError, RuleError) as exc:
        error(str(exc))
        return 2
    learn = settings.learn
    print(
        f"{args.config}: OK (interfaces {', '.join(settings.capture.interfaces)}; model "
        f"{model.path} {model.version}; {len(rules)} rules from {', '.join(rules.sources)}"
        + (f"; learning period {format_duration(learn.period_s)}" if learn else "")
        + ")"
    )
    return 0


def cmd_rules_check(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            rules = load_rules(path)
        except RuleError as exc:
            error(str(exc))
            failed = 1
            continue
        counts = Counter(r.action for r in rules.rules)
        print(
            f"{path}: OK, {len(rules)} rules ("
            + ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
            + ")"
        )
    return 2 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the parser."""
    rp = sub.add_parser(
        "replay",
        help="score captures end to end: flows, model, rules, EVE alerts",
        description="Read captures as fast as possible (or in real time), score every flow, "
        "apply the rules, correlate the evidence into incidents, write their open/update/"
        "close lines as EVE JSON alerts and print a summary.",
    )
    # Help lists the options in the order they are added: the groups keep that order.
    _add_inputs(rp)
    _add_pacing(rp)
    _add_flow_timeouts(rp)
    _add_alert_options(rp)
    _add_flow_log_options(rp)
    rp.set_defaults(func=cmd_replay)
    _register_daemon(sub)
    _register_rules(sub)


def _add_inputs(rp: argparse.ArgumentParser) -> None:
    """The captures, the model and rules that score them, where the alerts go."""
    rp.add_argument(
        "files",
        nargs="*",
        type=Path,
        default=[DEFAULT_CAPTURE, DEFAULT_CAPTURE.with_name("scan.pcap")],
        help="capture files (default: the bundled sample and scan captures)",
    )
    rp.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX model (bundled)")
    rp.add_argument(
        "--rules",
        type=Path,
        default=DEFAULT_RULES,
        help="rule file or directory (rules/default.yaml)",
    )
    rp.add_argument(
        "--alerts",
        metavar="FILE",
        default="-",
        help="alert file (JSON lines); '-' for stdout (the default)",
    )


def _add_pacing(rp: argparse.ArgumentParser) -> None:
    """How the replay runs: its timing, its worker processes, its metrics."""
    rp.add_argument("--realtime", action="store_true", help="honour the capture's timing")
    rp.add_argument(
        "-w",
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="meter up to N files at once in worker processes (1). Each file stays an "
        "independent capture, as with 1: its flows are scored, judged and correlated centrally "
        "in input order, and its incidents close at its end; alerts, incidents, the flow log "
        "and the summary are the same as with 1 (not with --realtime)",
    )
    rp.add_argument("--speed", type=float, help="real time times X (implies --realtime)")
    rp.add_argument(
        "--serve-metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics, and keep serving after the replay",
    )


def _add_flow_timeouts(rp: argparse.ArgumentParser) -> None:
    """When the flow table ends a flow."""
    rp.add_argument("--idle-timeout", type=float, default=FlowConfig.idle_timeout_s, metavar="S")
    rp.add_argument(
        "--active-timeout", type=float, default=FlowConfig.active_timeout_s, metavar="S"
    )


def _add_alert_options(rp: argparse.ArgumentParser) -> None:
    """Which alert lines are written, and the budget that caps them."""
    rp.add_argument(
        "--flow-alerts",
        action="store_true",
        help="also write one alert line per flow and matching rule (off: incidents only)",
    )
    rp.add_argument(
        "--lines-per-s",
        type=float,
        default=BudgetSettings.lines_per_s,
        metavar="R",
        help="alert line budget: at most R lines per second on average (%(default)g)",
    )
    rp.add_argument(
        "--burst",
        type=int,
        default=BudgetSettings.burst,
        metavar="N",
        help="alert line budget: up to N lines at once (%(default)d)",
    )


def _add_flow_log_options(rp: argparse.ArgumentParser) -> None:
    """The flow log: its file, rotation and retention."""
    rp.add_argument(
        "--flow-log",
        type=Path,
        metavar="FILE",
        help="also write every scored flow record as an EVE flow line to FILE (the flow log: "
        "identity, counts, features, score), rotated and gzipped",
    )
    rp.add_argument(
        "--flow-log-rotate-bytes",
        type=int,
        default=FlowLogSettings.rotate_bytes,
        metavar="N",
        help="rotate the flow log at N bytes (%(default)d; 0 = never by size)",
    )
    rp.add_argument(
        "--flow-log-rotate-age",
        type=float,
        default=FlowLogSettings.rotate_age_s,
        metavar="S",
        help="rotate the flow log after S seconds (%(default)g; 0 = never by age)",
    )
    rp.add_argument(
        "--flow-log-retention-bytes",
        type=int,
        default=FlowLogSettings.retention_bytes,
        metavar="N",
        help="delete the oldest rotated flow logs beyond N bytes (%(default)d; 0 = keep all)",
    )
    rp.add_argument(
        "--flow-log-no-gzip", action="store_true", help="leave rotated flow logs uncompressed"
    )


def _register_daemon(sub: argparse._SubParsersAction) -> None:
    """`run` and `check-config`."""
    run = sub.add_parser(
        "run",
        help="the daemon: live capture, scoring, alerts, metrics",
        description="Capture on the configured interfaces until SIGTERM "
        "(drain, score every open flow, exit 0); SIGHUP reloads rules and "
        "model and reopens the alert file.",
    )
    run.add_argument("--config", type=Path, default=Path("/etc/quietwire/config.yaml"))
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a daemon config without starting")
    check.add_argument("--config", type=Path, default=Path("/etc/quietwire/config.yaml"))
    check.set_defaults(func=cmd_check_config)


def _register_rules(sub: argparse._SubParsersAction) -> None:
    """`rules check`."""
    rules = sub.add_parser("rules", help="rule files")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    rc = rules_sub.add_parser("check", help="validate rule files (errors as file:line)")
    rc.add_argument("files", nargs="+", type=Path)
    rc.set_defaults(func=cmd_rules_check)
