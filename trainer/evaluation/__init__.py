"""Evaluation: detectors ranked on generated and real sets, and incident-level results from the
agent replaying captures."""
