"""Module layering: no tfvision module imports one that imports it back, even lazily.

Every import counts, including those inside functions: a lazy import only hides a
circle until someone moves it. A package's implicit import of its parent when a
submodule loads is not an edge; only the imports written in the source are.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "tfvision"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load: the module and, for `from`, each name."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                targets.update(_imported(node, name, path.name == "__init__.py"))
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_sees_lazy_and_relative_imports():
    # The checker itself: a function-level import closing a circle is found.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from . import x\n    from ..y import z\n")
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert _imported(nodes[0], "tfvision.data.sources", False) == ["tfvision.data", "tfvision.data.x"]
    assert _imported(nodes[1], "tfvision.data.sources", False) == ["tfvision.y", "tfvision.y.z"]
    # The edges that were circles before the split: training no longer imports train.
    graph = import_graph()
    assert "tfvision.train" not in graph["tfvision.training"]
    assert "tfvision.training" not in graph["tfvision.tasks.base"]


def test_importing_any_module_leaves_the_tensorflow_runtime_unstarted():
    """A TF op at import time (a module-level tf.constant) starts TensorFlow's runtime, after which
    MultiWorkerMirroredStrategy's collectives and virtual devices can no longer be configured.
    After each import, the virtual CPU devices are reconfigured, which raises once the runtime runs."""
    import subprocess
    import sys

    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    script = f"""
import importlib
import tensorflow as tf
cpu, n = tf.config.list_physical_devices("CPU")[0], 2
for name in {names!r}:
    importlib.import_module(name)
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as e:
        raise SystemExit(f"importing {{name}} started TensorFlow's runtime: {{e}}")
    n = 5 - n
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
