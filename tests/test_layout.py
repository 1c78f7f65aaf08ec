"""The package's layering, checked on its source: the folders tell the data flow.

core (model, data, bounds) <- graph (torch-free edits), engine (torch), runtime (onnxruntime)
<- defences <- comparison, inspection <- cli. A lower layer never imports a higher one, no
module imports another's private names, and the torch-free layers never import torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmexport"

# What each layer may import from mmexport (itself included).
ALLOWED = {
    "core": {"core"},
    "graph": {"core", "graph"},
    "engine": {"core", "engine"},
    "runtime": {"core", "runtime"},
    "defences": {"core", "graph", "engine", "runtime", "defences"},
    "comparison": {"core", "graph", "engine", "runtime", "defences", "comparison"},
    "inspection": {"core", "graph", "engine", "runtime", "inspection"},
    "cli": {"core", "graph", "engine", "runtime", "defences", "comparison", "inspection", "cli"},
}
TORCH_FREE = ("core", "graph", "runtime")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names], node.lineno))
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mmexport" else None


MODULES = modules()


@pytest.mark.parametrize("name", [n for n in MODULES if layer(n) in ALLOWED])
def test_a_module_imports_only_from_the_layers_below_it(name):
    bad = [f"line {line}: {target}" for target, _, line in imports(name, MODULES[name])
           if layer(target) is not None and layer(target) not in ALLOWED[layer(name)]]
    assert not bad, f"{name} imports from a higher layer: {bad}"


@pytest.mark.parametrize("name", list(MODULES))
def test_no_module_imports_private_names_of_another(name):
    bad = [f"line {line}: {n} from {target}" for target, names, line in imports(name, MODULES[name])
           if target.startswith("mmexport") and target != name
           for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, f"{name} imports private names: {bad}"


@pytest.mark.parametrize("name", [n for n in MODULES if layer(n) in TORCH_FREE])
def test_the_torch_free_layers_never_import_torch(name):
    bad = [line for target, _, line in imports(name, MODULES[name]) if target.split(".")[0] == "torch"]
    assert not bad, f"{name} imports torch at lines {bad}"


def test_the_top_level_imports_form_no_cycle():
    """Module-level imports only: an import inside a function runs after both modules loaded."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        top_lines = {n.lineno for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))}
        for target, names, line in imports(name, path):
            if not target.startswith("mmexport") or line not in top_lines:
                continue
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in MODULES and candidate != name:
                    deps.add(candidate)
                    break
        graph[name] = deps
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for d in graph[n]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, d]))
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_no_module_is_over_500_lines_except_the_op_registry():
    long = {name: len(p.read_text().splitlines()) for name, p in MODULES.items()}
    over = {n: k for n, k in long.items() if k > 500 and n != "mmexport.engine.ops"}
    assert not over, f"modules over 500 lines: {over}"
