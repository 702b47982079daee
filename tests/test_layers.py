"""The layout: every package imports only the layers before it, and no module imports itself
back through others.

The picture in docs/architecture.md is this table. Imports are read from the source (ast),
including those inside functions, so a lazy import cannot hide a reach upward; an import under
``if TYPE_CHECKING:`` is a type hint's, allowed across layers like any other downward import,
but it is left out of the cycle check because it does not run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Where each import name lives in the checkout (pyproject's package-dir).
ROOTS = {
    "quietwire.agent": REPO / "agent",
    "quietwire.trainer": REPO / "trainer",
    "quietwire.rules": REPO / "rules",
    "quietwire.cli": REPO / "quietwire" / "cli",
}

# Lowest first: a package may import its own layer and the ones listed before it. Packages
# on one line are siblings that must not import each other.
AGENT_LAYERS = (
    ("quietwire.agent.capture",),
    ("quietwire.agent.flow",),
    ("quietwire.agent.features",),
    ("quietwire.agent.detect",),
    ("quietwire.agent.output",),
    ("quietwire.agent.parallel", "quietwire.agent.site"),
    ("quietwire.agent.service",),
)
TRAINER_LAYERS = (
    ("quietwire.trainer.model", "quietwire.trainer.traffic", "quietwire.trainer.lab"),
    ("quietwire.trainer.synthesis",),
    ("quietwire.trainer.evaluation",),
)
# Modules at a package's top that every layer may use (they import nothing of the project).
BASE = ("quietwire.agent.errors", "quietwire.agent.yamlnodes")


def _modules() -> dict[str, Path]:
    found = {}
    for name, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, runs at import or call time) for each import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for b in node.body for n in ast.walk(b))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        runs = id(node) not in typing_only
        if isinstance(node, ast.Import):
            out += [(a.name, runs) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, runs))
            # `from package import module` imports the module
            out += [(f"{base}.{a.name}", runs) for a in node.names]
    return out


MODULES = _modules()
GRAPH = {
    m: [(i, runs) for i, runs in _imports(p, m) if i in MODULES and i != m]
    for m, p in MODULES.items()
}


def _package(module: str, layers) -> tuple[int, str] | None:
    for rank, row in enumerate(layers):
        for pkg in row:
            if module == pkg or module.startswith(pkg + "."):
                return rank, pkg
    return None


@pytest.mark.parametrize("layers", [AGENT_LAYERS, TRAINER_LAYERS], ids=["agent", "trainer"])
def test_each_layer_imports_only_the_layers_before_it(layers):
    wrong = []
    for module, imports in GRAPH.items():
        here = _package(module, layers)
        if here is None:
            continue
        for target, _ in imports:
            there = _package(target, layers)
            if there is None or there[1] == here[1]:
                continue
            if there[0] >= here[0]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_every_agent_module_belongs_to_a_layer():
    loose = [
        m
        for m in MODULES
        if m.startswith("quietwire.agent.") and _package(m, AGENT_LAYERS) is None and m not in BASE
    ]
    assert not loose, f"agent modules in no layer: {loose}"


def test_base_modules_import_nothing_of_the_project():
    for module in BASE:
        assert not [t for t, _ in GRAPH[module] if not t.startswith("quietwire.agent.errors")]


def test_the_agent_never_imports_the_trainer_torch_or_the_command_line():
    wrong = [
        f"{m} imports {i}"
        for m, p in MODULES.items()
        if m.startswith(("quietwire.agent", "quietwire.rules"))
        for i, _ in _imports(p, m)
        if i.split(".")[0] == "torch" or i.startswith(("quietwire.trainer", "quietwire.cli"))
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    """Tarjan's strongly connected components over the imports that run."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    counter = 0
    for root in GRAPH:
        if root in index:
            continue
        # iterative DFS: (node, iterator over its successors)
        work = [(root, iter([t for t, runs in GRAPH[root] if runs]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter([t for t, runs in GRAPH[nxt] if runs])))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_reach_upward(tmp_path):
    """The reader finds lazy and relative imports (the forms a reach upward would take)."""
    path = tmp_path / "mod.py"
    path.write_text(
        "def f():\n    from quietwire.agent.service import engine\n"
        "from ..detect.model import ScoringModel\n"
    )
    found = {i for i, _ in _imports(path, "quietwire.agent.flow.mod")}
    assert "quietwire.agent.service.engine" in found
    assert "quietwire.agent.detect.model" in found
