"""The package layout's import rules (README "How the code is laid out"): no import circles,
counting function-level imports and module names in strings, and no upward imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hybridstack"
CORE = {"config", "tasks", "text", "folds", "experiment", "runs", "tables", "models", "versions",
        "errors", "synthetic", "recipes", "console", "progress"}
# layer of each top-level part; a module may import its own layer and the ones below
LAYERS = {**dict.fromkeys(CORE, 0), "features": 1, "heads": 2, "ensembles": 2, "finetune": 2,
          "predict": 3, "stages": 3, "pipeline": 4, "commands": 5, "live": 5, "cli": 6, "__main__": 6,
          "__init__": 6}
# parts of one layer that must not import each other
FORBIDDEN = {("predict", "stages"), ("stages", "predict")}
MODULE_STRING = re.compile(r"hybridstack(\.\w+)+")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every hybridstack module ``path`` imports, anywhere in the file (or names in a string)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybridstack"):
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in known] or [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("hybridstack")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if MODULE_STRING.fullmatch(node.value):
                names = [node.value]
        for name in names:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known and name != "hybridstack":
                found.add(name)
    return found


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_no_import_circles():
    edges = graph()
    visiting, done, cycles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        visiting.add(node)
        for nxt in edges[node]:
            if nxt in visiting:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        visiting.discard(node)
        done.add(node)

    for node in sorted(edges):
        if node not in done:
            visit(node, [node])
    assert not cycles, f"import circles: {cycles[:3]}"


def test_no_upward_imports():
    wrong = []
    for module, targets in graph().items():
        here = part(module)
        for target in targets:
            there = part(target)
            if LAYERS[there] > LAYERS[here] or (here, there) in FORBIDDEN:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "upward imports: " + ", ".join(sorted(wrong))


def test_the_root_holds_only_core_modules_and_entry_points():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root <= CORE | {"cli", "pipeline", "__init__", "__main__"}, root - CORE
