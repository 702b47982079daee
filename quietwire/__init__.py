"""quietwire: network-flow anomaly detection."""

__version__ = "0.1.0"
