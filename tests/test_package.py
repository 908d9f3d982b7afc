"""The package's shape: no import cycle between vlq modules, a light CLI import, a clean ruff run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlq"


def vlq_import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> vlq modules it imports anywhere (top level or inside functions), from the source."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        module = path.stem
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges.add(node.module.split(".")[0])
                else:  # from . import x, y
                    edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vlq."):
                edges.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                edges.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vlq."))
        graph[module] = {e for e in edges if e != module and (package / f"{e}.py").exists()}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_between_vlq_modules():
    graph = vlq_import_graph()
    assert {"pipeline", "cli", "search", "export", "checkpoint", "serving", "vllm_runner"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_catches_a_cycle():
    """Negative control: a two-module and a three-module cycle are both found."""
    assert find_cycle({"export": {"state"}, "state": {"export"}}) == ["export", "state", "export"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_pipeline_is_the_only_module_that_wires_the_stages():
    """The CLI reaches the stages through the pipeline; stage modules never import the pipeline or the CLI."""
    graph = vlq_import_graph()
    assert "pipeline" in graph["cli"]
    assert not {"search", "export", "calibration", "sweep"} & graph["cli"], graph["cli"]
    importers = sorted(m for m, edges in graph.items() if {"pipeline", "cli"} & edges and m != "cli")
    assert importers == [], importers


def test_cli_import_is_light():
    """Importing the CLI (what a bad input costs before it is refused) pulls in no torch, ModelOpt or vLLM."""
    code = "import sys, vlq.cli; heavy = [m for m in ('torch', 'modelopt', 'vllm', 'transformers') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_ruff_finds_nothing():
    """The static gate CI runs first (ruff comes with the test extras), here too for local runs."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", str(PACKAGE.parent)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
