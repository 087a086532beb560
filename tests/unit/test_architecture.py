"""The folder tree is the architecture: each layer imports only the layers below it, and nothing is a cycle.

    models/ . streamer/  ->  consumers/core  ->  consumers/state  ->  consumers/runtime
        ->  consumers/trainer . consumers/serving . consumers/tools  ->  consumers/cli.py

(read "->" as "is imported by"). Every import counts: module level, inside functions, under ``TYPE_CHECKING``,
and the subcommand modules ``consumers/cli.py`` names as strings. Modules of one layer may import each other
(without cycles); the three application packages (trainer, serving, tools) may not import one another. A
function-level import of the project's own modules needs a ``# lazy:`` comment on its line or above its block
of imports saying why (usually: ``crossdistil --help`` must not load torch). Sizes: no class over 400 lines, no function
over 80 lines in ``consumers/`` and ``streamer/``, and the trainer's loop at most 50 lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "streamer", "consumers")
# Layer of each package prefix (the longest matching prefix wins); a module imports only lower layers, or its own.
LAYERS = {
    "models": 0, "streamer": 0,
    "consumers.core": 1, "consumers.state": 2, "consumers.runtime": 3,
    "consumers.trainer": 4, "consumers.serving": 4, "consumers.tools": 4,
    "consumers.cli": 5, "consumers": 5,
}
KAFKA_CLIENTS = ("kafka", "confluent_kafka")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    function_level: bool
    commented: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (``a.b.c`` may be a name inside module ``a.b``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(name: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    """Every import of a project module by ``name``, with where it is and whether a comment explains it."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        resolved = {_resolve(t, known) for t in targets} - {None, name}
        for target in sorted(resolved):
            edges.append(Edge(name, target, node.lineno, id(node) in in_function, _explained(lines, node.lineno)))
    if name == "consumers.cli":  # subcommands are imported by name (importlib)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
                edges.append(Edge(name, node.value, node.lineno, True, True))
    return edges


def _explained(lines: list[str], lineno: int) -> bool:
    """A ``# lazy:`` comment on the import's line, or above the block of imports (and comments) it belongs to."""
    if "# lazy:" in lines[lineno - 1]:
        return True
    for line in reversed(lines[: lineno - 1]):
        text = line.strip()
        if "# lazy:" in text:
            return True
        if text and not text.startswith(("import ", "from ", "#")):
            return False
    return False


def graph() -> list[Edge]:
    known = modules()
    return [edge for name, path in known.items() for edge in imports(name, path, known)]


def layer_of(module: str) -> tuple[str, int]:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return prefix, LAYERS[prefix]


def test_no_import_cycle() -> None:
    adjacency: dict[str, set[str]] = {}
    for edge in graph():
        adjacency.setdefault(edge.source, set()).add(edge.target)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(adjacency.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(adjacency):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_layer_imports_only_layers_below_it() -> None:
    violations = []
    for edge in graph():
        (source_pkg, source_layer), (target_pkg, target_layer) = layer_of(edge.source), layer_of(edge.target)
        same_package = source_pkg == target_pkg
        if target_layer > source_layer or (target_layer == source_layer and not same_package):
            violations.append(f"{edge.source}:{edge.line} imports {edge.target} ({source_pkg} may not import "
                              f"{target_pkg})")
    assert not violations, "\n".join(violations)


def test_models_and_streamer_never_import_consumers_and_models_never_kafka() -> None:
    bad = [f"{e.source}:{e.line} -> {e.target}" for e in graph()
           if e.source.split(".")[0] in ("models", "streamer") and e.target.split(".")[0] == "consumers"]
    for name, path in modules().items():
        if name.split(".")[0] != "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in KAFKA_CLIENTS]
    assert not bad, "\n".join(bad)


def test_function_level_imports_of_the_project_say_why() -> None:
    silent = [f"{e.source}:{e.line} imports {e.target} inside a function without a '# lazy:' comment"
              for e in graph() if e.function_level and not e.commented]
    assert not silent, "\n".join(silent)


def _sizes(package: str) -> list[tuple[str, str, str, int]]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                out.append((str(path.relative_to(ROOT)), kind, node.name, node.end_lineno - node.lineno + 1))
    return out


def test_no_class_over_400_lines_no_function_over_80_in_consumers_and_streamer() -> None:
    limits = {"class": 400, "function": 80}
    too_long = [f"{path}: {kind} {name} has {n} lines (at most {limits[kind]})"
                for package in ("consumers", "streamer") for path, kind, name, n in _sizes(package) if n > limits[kind]]
    assert not too_long, "\n".join(too_long)


def test_the_trainer_loop_reads_on_one_screen() -> None:
    loops = [n for path, kind, name, n in _sizes("consumers") if path.endswith("trainer/daemon.py") and name == "_loop"]
    assert loops and loops[0] <= 50, f"Trainer._loop has {loops} lines (at most 50)"


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path: Path) -> None:
    """The graph counts an import hidden in a function, and the cycle check finds a two-module cycle."""
    known = {"consumers.a": tmp_path / "a.py", "consumers.b": tmp_path / "b.py"}
    known["consumers.a"].write_text("def f():\n    from consumers.b import g\n")
    known["consumers.b"].write_text("from consumers import a\n# lazy: documented\nimport consumers.a\n")
    a_edges = imports("consumers.a", known["consumers.a"], known)
    b_edges = imports("consumers.b", known["consumers.b"], known)
    assert [(e.target, e.function_level, e.commented) for e in a_edges] == [("consumers.b", True, False)]
    assert {e.target for e in b_edges} == {"consumers.a"} and any(e.commented for e in b_edges)
