"""The `quietwire` command. Each module of this package adds its subcommands (parser beside
handler). A handler may turn the stage errors it meets into its own line and exit status;
``main`` turns any other stage error (``QuietwireError``) into one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from quietwire import __version__
from quietwire.agent.errors import QuietwireError

from .common import DEFAULT_CAPTURE, error

__all__ = ["DEFAULT_CAPTURE", "build_parser", "main"]

# The module of this package that adds each subcommand. A command imports only its own module,
# so `quietwire flows` does not import the daemon's (rules, incidents, metrics, YAML config)
# at every start.
COMMANDS = {
    "flows": "flows",
    "schema": "flows",
    "replay": "replay",
    "run": "replay",
    "check-config": "replay",
    "rules": "replay",
    "calibrate": "calibrate",
    "train": "train",
    "sample": "train",
    "eval": "evaluation",
    "lab": "lab",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``command``'s module only."""
    parser = argparse.ArgumentParser(
        prog="quietwire", description="Network-flow anomaly detection: flows, features, scores."
    )
    parser.add_argument("--version", action="version", version=f"quietwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = [COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES
    for name in names:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return args.func(args)
    except QuietwireError as exc:
        error(" ".join(str(exc).splitlines()))
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
