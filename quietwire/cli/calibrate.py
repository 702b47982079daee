"""`quietwire calibrate`: a model's thresholds and tail probabilities from the site's own
flows (agent only: onnxruntime and onnx, no torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from quietwire.rules import DEFAULT_RULES

from .common import error

if TYPE_CHECKING:
    from quietwire.agent.site.calibrate import CalibrationReport


def cmd_calibrate(args: argparse.Namespace) -> int:
    # Imported here: onnx (to edit the model file) is needed by this command only.
    from quietwire.agent.detect.model import ModelError
    from quietwire.agent.site.calibrate import CalibrationError, TooFewFlowsError, calibrate
    from quietwire.agent.site.sources import SiteFlowsError, read_site_flows

    if not args.budget > 0:
        error(f"--budget {args.budget:g}: expected a positive number")
        return 2
    if args.risk_only:
        return _risk_only(args)
    try:
        site = read_site_flows(list(args.inputs))
        for warning in site.warnings:
            print(f"quietwire: warning: {warning}", file=sys.stderr)
        report = calibrate(
            args.model,
            site.features,
            args.out,
            host_balance=args.host_balance,
            server_balance=args.server_balance,
            allow_few_flows=args.allow_few_flows,
            inputs=site.inputs,
            period=(site.first_start, site.last_end),
        )
    except TooFewFlowsError as exc:
        error(f"{exc}; give more flows, or --allow-few-flows")
        return 2
    except (CalibrationError, ModelError, SiteFlowsError) as exc:
        error(str(exc))
        return 2
    print(format_report(report))
    return _fit_risk(args, site)


def _risk_only(args: argparse.Namespace) -> int:
    """--risk-only: the model copied to --out with entity risk fitted; scores untouched."""
    import shutil

    from quietwire.agent.site.sources import SiteFlowsError, site_records

    try:
        chunks = site_records(list(args.inputs))
        if not chunks:
            raise SiteFlowsError(
                f"{', '.join(map(str, args.inputs))}: no capture or flow log with flows "
                "(--risk-only fits on flow records: flow tables carry none)"
            )
        if Path(args.out).resolve() != Path(args.model).resolve():
            shutil.copyfile(args.model, args.out)
    except (SiteFlowsError, OSError) as exc:
        error(str(exc))
        return 2
    return fit_risk_or_error(args.out, chunks, args.rules, args.budget)


def _fit_risk(args: argparse.Namespace, site) -> int:
    """The incident threshold and host baselines, from the inputs that have flow records
    (captures, flow logs); with flow tables alone the model keeps its own."""
    if not site.records:
        print(
            "incidents: no capture or flow log among the inputs (flow tables carry no flow "
            "records): the model's risk threshold and baselines are kept"
        )
        return 0
    return fit_risk_or_error(args.out, site.records, args.rules, args.budget)


def fit_risk_or_error(model: Path, chunks, rules_path: Path, budget: float) -> int:
    """Fit entity risk into ``model`` and print what was set; 2 after a one-line error."""
    from quietwire.agent.detect.model import ModelError
    from quietwire.agent.detect.rules import RuleError, load_rules
    from quietwire.agent.site.calibrate import CalibrationError
    from quietwire.agent.site.riskfit import describe, fit_model

    try:
        fitted = fit_model(model, chunks, load_rules(rules_path), budget)
    except (RuleError, ModelError, CalibrationError, ValueError) as exc:
        error(str(exc))
        return 2
    print(describe(fitted))
    return 0


def format_report(r: CalibrationReport) -> str:
    """The few lines an operator reads: records used, thresholds old -> new, records over
    each."""
    balance = (
        f"host {r.host_balance}, server {r.server_balance}"
        if r.host_balance or r.server_balance
        else "off"
    )
    lines = [
        f"calibrated {r.model_path} -> {r.out_path}",
        f"records: {r.records:,} ({r.records - r.interim_records:,} flows, "
        f"{r.interim_records:,} interim) from {len(r.inputs)} "
        f"input{'s' if len(r.inputs) != 1 else ''}, {r.balanced_records:,.0f} after burst "
        f"balancing ({balance})",
        f"{'FPR':<8}{'old threshold':>14} -> {'new':<10}{'records over old':>17}"
        f"{'over new':>10} (balanced)",
    ]
    if r.first_start and r.last_end:
        lines.insert(2, f"period: {r.first_start[:19]} to {r.last_end[:19]} (UTC)")
    for lv in r.levels:
        mark = "*" if lv.too_few_flows else ""
        lines.append(
            f"{lv.fpr:<8g}{lv.old_threshold:>14.4g} -> {lv.new_threshold:<8.4g}{mark:<2}"
            f"{lv.share_over_old:>17.2%}{lv.share_over_new:>10.2%} "
            f"({lv.balanced_share_over_new:.2%})"
        )
    if any(lv.too_few_flows for lv in r.levels):
        lines.append(
            "* fewer balanced records than 1/FPR: the threshold is about the highest site score"
        )
    return "\n".join(lines)


def register(sub) -> None:
    """Add this module's subcommand to the parser."""
    cal = sub.add_parser(
        "calibrate",
        help="recompute a model's thresholds on the site's own flows",
        description="Score the site's flows (captures, flow tables that `quietwire flows` "
        "wrote, or the agent's flow logs, rotated and gzipped ones too) with the model, "
        "recompute its threshold at each false-positive rate and its "
        "tail-probability table from them, and write a new model that scores the same and "
        "records the calibration. Attacks in the flows are kept from setting the thresholds "
        "by the burst balancing the model was trained with. From captures and flow logs, also "
        "fit the "
        "incidents' host baselines and the risk threshold that keeps the site's benign "
        "traffic within --budget incidents per 100 host-days (on its held-out second half).",
    )
    cal.add_argument("--model", type=Path, required=True, help="the model to calibrate")
    cal.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="the site's captures, flow tables or flow logs, or directories of them",
    )
    cal.add_argument("-o", "--out", type=Path, required=True, help="the ONNX file to write")
    cal.add_argument(
        "--host-balance",
        type=int,
        default=None,
        metavar="K",
        help="burst balancing: a client's flows beyond K per context window count less "
        "(default: the model's training value; 0 = off)",
    )
    cal.add_argument(
        "--server-balance",
        type=int,
        default=None,
        metavar="K",
        help="burst balancing: flows to a server beyond K distinct clients per context "
        "window count less (default: the model's training value; 0 = off)",
    )
    cal.add_argument(
        "--allow-few-flows",
        action="store_true",
        help="calibrate even with fewer balanced flows than 1/FPR of the smallest level; "
        "such a level's threshold is then about the highest site score",
    )
    cal.add_argument(
        "--risk-only",
        action="store_true",
        help="keep the model's thresholds and table; only fit the incidents' risk threshold "
        "and host baselines (on the captures among the inputs)",
    )
    add_risk_options(cal)
    cal.set_defaults(func=cmd_calibrate)


def add_risk_options(parser) -> None:
    """--budget and --rules: how entity risk is fitted (calibrate, train)."""
    parser.add_argument(
        "--budget",
        type=float,
        default=1.0,
        metavar="N",
        help="benign incidents per 100 host-days the risk threshold is set for (default 1)",
    )
    parser.add_argument(
        "--rules",
        type=Path,
        default=DEFAULT_RULES,
        help="the rules the agent runs, whose evidence risk is fitted on (default: bundled)",
    )
