"""The `quietwire` command. Each module of this package adds its subcommands (parser beside
handler); each handler turns the stage errors it can meet into one line on stderr and a
non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys

from quietwire import __version__
from quietwire.agent.flowfile import FlowFileError

from . import calibrate, evaluation, flows, replay, train
from .common import DEFAULT_CAPTURE, error

__all__ = ["DEFAULT_CAPTURE", "build_parser", "main"]

COMMAND_MODULES = (flows, replay, calibrate, train, evaluation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quietwire", description="Network-flow anomaly detection: flows, features, scores."
    )
    parser.add_argument("--version", action="version", version=f"quietwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlowFileError as exc:
        error(str(exc))
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
