"""quietwire: network-flow anomaly detection."""

from pathlib import Path

__version__ = "0.1.0"

# The bundled model, captures and label file (installed with the package).
DATA = Path(__file__).resolve().parent / "data"
