"""The default rule set. It is YAML, not code; this file only makes `rules/` installable with
the package so the agent finds it from a wheel as from a checkout."""

from pathlib import Path

DEFAULT_RULES = Path(__file__).resolve().parent / "default.yaml"
