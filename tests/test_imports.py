"""The package's import graph: no cycles, imports at the top of each module, inference without the trainer.

A cycle between modules works only while every edge of it stays a function-level import; one import moved to
the top then fails at import time with a partially initialised module. These tests read the source (ast), so
they see function-level imports as well as top-level ones.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "metatuner"
# Modules that may import metatuner modules inside functions, and why.
DEFERRED_OK = {
    "metatuner": "MetaTuner is loaded on first access, so `import metatuner` stays light",
    "metatuner.cli": "commands check their arguments before torch loads (test_cli_usability)",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules) -> list[tuple[str, bool]]:
    """(imported metatuner module, at top level) for every import statement in the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` imports pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("metatuner"):
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                found.append((target, id(node) in top))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        # Importing an ancestor package is never a cycle: Python initialises a package before any of its modules.
        graph[name] = {t for t, _ in _imports(name, path, modules)
                       if t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_a_planted_cycle():
    """Guards the checker itself: a checker that never reports would pass the test below on any graph."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_metatuner_modules_are_imported_at_the_top():
    modules = _modules()
    deferred = sorted(f"{name} imports {target}" for name, path in modules.items() if name not in DEFERRED_OK
                      for target, at_top in _imports(name, path, modules) if not at_top)
    assert deferred == [], "function-level imports of metatuner modules (move them to the top): " + str(deferred)


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


@pytest.mark.parametrize("module", ["metatuner.model", "metatuner.serve.engine"])
def test_inference_does_not_reach_the_training_code(module):
    """MetaTuner.from_pretrained used to import the training module (for build_metatuner): loading a model for
    inference pulled in the trainer, its baselines and their imports."""
    reached = _reachable(_graph(), module)
    assert not reached & {"metatuner.train", "metatuner.compare", "metatuner.memory_estimate"}, sorted(reached)
    assert not any(m.startswith("metatuner.baselines") for m in reached), sorted(reached)


def test_from_metatuner_import_metatuner_loads_the_model_and_not_the_trainer():
    code = ("import sys\nimport metatuner\nassert 'torch' not in sys.modules\n"
            "from metatuner import MetaTuner\nfrom metatuner.model import MetaTuner as M\nassert MetaTuner is M\n"
            "assert 'metatuner.train' not in sys.modules, 'inference imported the trainer'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compare_report_only_does_not_load_torch():
    """`metatuner compare --report-only` rewrites the results from the run folders: it took ~8 s importing torch and
    the training machinery, which it never uses."""
    code = ("import sys\nimport metatuner.cli, metatuner.compare_report\n"
            "heavy = [m for m in ('torch', 'peft', 'transformers', 'metatuner.evaluate') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tests_named_for_a_reliability_group_carry_its_marker():
    """`-m "bad_input or fault or trust"` selects the reliability tests (docs/reliability.md); a new test named
    test_fault_... without its marker would silently drop out of that selection."""
    tests = Path(__file__).resolve().parent
    missing = []
    for path in sorted(tests.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marks = {ast.unparse(n.value) for n in tree.body if isinstance(n, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)}
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            marks = module_marks | {ast.unparse(d) for d in node.decorator_list}
            for group, prefix in (("bad_input", "bad_input"), ("fault", "test_fault"), ("trust", "test_trust")):
                if prefix in node.name and f"pytest.mark.{group}" not in marks:
                    missing.append(f"{path.name}::{node.name} ({group})")
    assert missing == [], missing


def test_no_function_in_the_package_is_longer_than_a_screenful_without_saying_why():
    """A function past ~80 lines is where closures over loop state and skipped steps hid (train_metatuner was 195
    lines, and its `continue`s skipped the checkpoint and the signal check). One may be longer only if its
    docstring says why (it names 'screenful')."""
    long = []
    for name, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 and "screenful" not in (ast.get_docstring(node) or ""):
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == [], long
