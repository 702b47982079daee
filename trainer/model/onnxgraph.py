"""A tiny ONNX graph builder shared by the detector's and the generator's exports: named
constants (initializers) and nodes whose outputs are named after their op and a counter."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class OnnxGraph:
    """Nodes and initializers in the order they are asked for."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._n = 0

    def const(self, name: str, value) -> str:
        """A named constant; asking again for a name reuses the first one (shared weights)."""
        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        """A node; its output is named ``<op_type lowercased>_<counter>``."""
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out
