"""YAML with line numbers: config and rule files are validated against the node tree, so every
error can say file:line, the key, and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quietwire.agent.errors import QuietwireError


class YamlError(QuietwireError):
    """A YAML document is malformed or does not match what was expected (file:line: ...)."""


class Node:
    """A YAML value with where it came from."""

    def __init__(self, node: yaml.Node, path: Path) -> None:
        self._node = node
        self.path = path
        self.line = node.start_mark.line + 1

    def error(self, message: str) -> YamlError:
        return YamlError(f"{self.path}:{self.line}: {message}")

    @property
    def kind(self) -> str:
        if isinstance(self._node, yaml.MappingNode):
            return "mapping"
        if isinstance(self._node, yaml.SequenceNode):
            return "list"
        return "scalar"

    def mapping(self, what: str, allowed: set[str] | None = None) -> dict[str, Node]:
        """The node as {key: Node}; unknown keys (when ``allowed`` is given) are errors."""
        if self.kind != "mapping":
            raise self.error(f"{what}: expected a mapping, got a {self.kind}")
        out: dict[str, Node] = {}
        for key_node, value_node in self._node.value:
            key = Node(key_node, self.path)
            name = key.scalar(f"a key of {what}", str)
            if allowed is not None and name not in allowed:
                raise key.error(
                    f"{what}: unknown key {name!r} (expected one of {', '.join(sorted(allowed))})"
                )
            if name in out:
                raise key.error(f"{what}: key {name!r} given twice")
            out[name] = Node(value_node, self.path)
        return out

    def items(self, what: str) -> list[Node]:
        if self.kind != "list":
            raise self.error(f"{what}: expected a list, got a {self.kind}")
        return [Node(n, self.path) for n in self._node.value]

    def scalar(self, what: str, kind: type | tuple[type, ...]) -> Any:
        """The node's value as one of the given Python types (ints count as floats)."""
        if self.kind != "scalar":
            raise self.error(f"{what}: expected a {_name(kind)}, got a {self.kind}")
        value = yaml.safe_load(yaml.serialize(self._node)) if self._node.tag else None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(f"{what}: expected a {_name(kind)}, got {value!r}")
        return value

    def scalars(self, what: str, kind: type | tuple[type, ...]) -> list[Any]:
        """A scalar or a list of scalars, as a list."""
        if self.kind == "list":
            return [item.scalar(what, kind) for item in self.items(what)]
        return [self.scalar(what, kind)]


def _name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "integer", float: "number", str: "string", bool: "boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load(path: str | Path) -> Node:
    """Parse a YAML file into a Node; YamlError on unreadable or malformed input."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise YamlError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlError(f"{where}: malformed YAML: {problem}") from exc
    if node is None:
        raise YamlError(f"{path}:1: empty document")
    return Node(node, path)
