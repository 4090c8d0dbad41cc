"""The layout rules of docs/architecture.md that import-linter does not check.

- no module over 400 lines, no function over 60 lines;
- no import cycle between fedseg modules, counting imports inside functions;
- imports inside functions (outside the CLI, which imports the library lazily for its
  start-up time) only for torch and the optional dependencies, each with a comment saying why;
- no private name (`_x`) imported from another module;
- no module outside the strategies and the model recipes names a built-in strategy: code
  that branches on a strategy belongs to the strategy.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fedseg"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# Imports a function may make: torch (start-up time: importing it takes seconds) and the
# optional extras (flower, privacy), which must not be needed to import the module.
LAZY_ALLOWED = ("torch", "safetensors.torch", "flwr", "ray", "dp_accounting")
STRATEGY_NAMES = ("fedavg", "local", "asymfedavg", "flames", "mixmfl", "fedmsa", "fedsam")
# Where a strategy may be named: its rule and its model recipe. The synthetic presets are
# datasets named after the papers' settings (`synth --preset flames`), not strategies.
STRATEGY_HOMES = ("federation/strategies/", "training/recipes/", "synth/")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """ids of the statements under `if TYPE_CHECKING:` (not imported at run time)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imports(path: Path) -> Iterator[tuple[ast.stmt, list[str], bool]]:
    """(statement, imported module names, inside a function) for every run-time import."""
    tree = _tree(path)
    skipped = _type_checking_blocks(tree)
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield node, [alias.name for alias in node.names], id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
            yield node, names, id(node) in in_function


def _import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _node, targets, _lazy in _imports(path):
            for target in targets:
                if target in MODULES and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_file_over_the_line_limit():
    long = {_rel(p): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"modules over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_the_line_limit():
    long = {}
    for path in MODULES.values():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{_rel(path)}:{node.lineno} {node.name}"] = length
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_import_cycle_counting_imports_inside_functions():
    assert _cycles(_import_graph()) == []


def test_imports_inside_functions_only_for_torch_and_optional_dependencies():
    bad = []
    for name, path in MODULES.items():
        if name.startswith("fedseg.cli"):
            continue
        lines = path.read_text().splitlines()
        for node, targets, lazy in _imports(path):
            if not lazy:
                continue
            allowed = all(any(t == a or t.startswith(a + ".") for a in LAZY_ALLOWED) for t in targets)
            said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            if not (allowed and said):
                bad.append(f"{_rel(path)}:{node.lineno} {ast.unparse(node)}" + ("" if allowed else "  (not torch/optional)")
                           + ("" if said else "  (no comment)"))
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def test_no_private_name_imported_from_another_module():
    bad = []
    for path in MODULES.values():
        for node, _targets, _lazy in _imports(path):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedseg"):
                bad += [f"{_rel(path)}:{node.lineno} {alias.name}" for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not bad, f"private names imported across modules: {bad}"


def _docstring_ids(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_no_module_outside_strategies_and_recipes_names_a_strategy(strategy):
    bad = []
    for name, path in MODULES.items():
        if _rel(path).startswith(STRATEGY_HOMES):
            continue
        tree = _tree(path)
        docstrings = _docstring_ids(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == strategy and id(node) not in docstrings:
                bad.append(f"{_rel(path)}:{node.lineno} {node.value!r}")
        for node, targets, _lazy in _imports(path):
            for target in targets:
                if target.rsplit(".", 1)[-1] == strategy or target.endswith(f".{strategy}_trainer"):
                    bad.append(f"{_rel(path)}:{node.lineno} imports {target}")
    assert not bad, f"strategy {strategy!r} named outside its rule and recipe: {bad}"
