"""Synthetic benign flows: the generator, the categorical flow columns it writes, and its fidelity
measures."""
