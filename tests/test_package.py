"""The package's shape: packages in the order data flows, no import cycle between vlq modules, modules and
functions of bounded size, a light CLI import, a clean ruff run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlq"

#: Most lines a module may have, and a function (its docstring included).
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
#: Modules and functions allowed over the bounds, each with why; empty is the goal.
MODULE_EXCEPTIONS: dict[str, str] = {
}
FUNCTION_EXCEPTIONS: dict[str, str] = {
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``vlq/search/search.py`` -> ``search.search``; a package's ``__init__.py`` is the package (``vlq/__init__.py``: "")."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def vlq_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _imported(base: str, names, modules: dict[str, Path]) -> set[str]:
    """What ``from base import names`` imports: each name that is a module, else ``base`` itself."""
    found = set()
    for alias in names:
        child = f"{base}.{alias.name}" if base else alias.name
        found.add(child if child in modules else base)
    return found


def vlq_import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> vlq modules it imports anywhere (top level or inside functions), from the source."""
    modules = vlq_modules(package)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        here = module.split(".") if module else []
        if path.name != "__init__.py":
            here = here[:-1]  # a relative import starts at the module's package
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base_parts = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                base = ".".join(base_parts + (node.module.split(".") if node.module else []))
                edges |= _imported(base, node.names, modules)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vlq":
                edges |= _imported(node.module[len("vlq."):] if node.module != "vlq" else "", node.names, modules)
            elif isinstance(node, ast.Import):
                edges |= {a.name[len("vlq."):] for a in node.names if a.name.startswith("vlq.")}
        graph[module] = {e for e in edges if e != module and e in modules}
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
    assert {"pipeline", "cli", "search.search", "export.export", "export.inspect", "serve.checks", "serve.runner"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_import_graph_resolves_relative_imports(tmp_path):
    """Negative control for the graph itself: relative imports from a module and from a package resolve to the
    modules they name, so a cycle through them is found."""
    root = tmp_path / "vlq"
    for name, text in {"__init__.py": "", "a/__init__.py": "from .b import x\n", "a/b.py": "from ..c.d import y\n",
                       "c/__init__.py": "", "c/d.py": "def y():\n    from ..a import b\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = vlq_import_graph(root)
    assert graph == {"": set(), "a": {"a.b"}, "a.b": {"c.d"}, "c": set(), "c.d": {"a.b"}}
    assert find_cycle(graph) == ["a.b", "c.d", "a.b"]


def test_cycle_finder_catches_a_cycle():
    """Negative control: a two-module and a three-module cycle are both found."""
    assert find_cycle({"export": {"state"}, "state": {"export"}}) == ["export", "state", "export"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_pipeline_is_the_only_module_that_wires_the_stages():
    """The CLI reaches the stages through the pipeline; stage modules never import the pipeline or the CLI."""
    graph = vlq_import_graph()
    cli = {m: edges for m, edges in graph.items() if m == "cli" or m.startswith("cli.")}
    assert any("pipeline" in edges for edges in cli.values())
    stages = {"search.search", "export.export", "data.calibration", "manifest.sweep"}
    assert not any(stages & edges for edges in cli.values()), cli
    wiring = {"pipeline", "cli"}
    importers = sorted(m for m, edges in graph.items() if m.split(".")[0] not in wiring
                       and any(e.split(".")[0] in wiring for e in edges))
    assert importers == [], importers


def _function_lengths(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def oversized(package: Path = PACKAGE) -> tuple[dict[str, int], dict[str, int]]:
    """Modules over MAX_MODULE_LINES and functions over MAX_FUNCTION_LINES (``module.function``), with their lengths."""
    modules, functions = {}, {}
    for name, path in vlq_modules(package).items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            modules[name] = lines
        for function, length in _function_lengths(path):
            if length > MAX_FUNCTION_LINES:
                functions[f"{name}.{function}"] = length
    return modules, functions


def test_modules_and_functions_stay_short():
    """No module over 600 lines, no function over 80, but the listed exceptions (each with its reason)."""
    modules, functions = oversized()
    assert set(modules) == set(MODULE_EXCEPTIONS), modules
    assert set(functions) == set(FUNCTION_EXCEPTIONS), functions


def test_size_bounds_catch_a_long_function(tmp_path):
    """Negative control: a function of 81 lines and a module of 601 are both reported."""
    root = tmp_path / "vlq"
    root.mkdir()
    (root / "__init__.py").write_text("")
    body = "def long():\n" + "    x = 1\n" * 80
    (root / "big.py").write_text(body + "\n" * (601 - body.count("\n")))
    assert oversized(root) == ({"big": 601}, {"big.long": 81})


def test_package_init_files_import_nothing_heavy():
    """Every package ``__init__`` imports without torch, ModelOpt, transformers or vLLM: the CLI's sub-second
    refusal depends on it."""
    packages = [f"vlq.{m}" if m else "vlq" for m, p in vlq_modules().items() if p.name == "__init__.py"]
    code = (f"import importlib, sys\nfor p in {packages!r}: importlib.import_module(p)\n"
            "print([m for m in ('torch', 'modelopt', 'vllm', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_cli_import_is_light():
    """Importing the CLI (what a bad input costs before it is refused) pulls in no torch, ModelOpt or vLLM."""
    code = "import sys, vlq.cli; heavy = [m for m in ('torch', 'modelopt', 'vllm', 'transformers') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_ruff_finds_nothing():
    """The static gate CI runs first (ruff comes with the test extras), here too for local runs."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", str(PACKAGE.parent)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def unshipped_files(package: Path, package_data: dict[str, list[str]]) -> list[str]:
    """Files under ``package`` (not Python sources) that no ``[tool.setuptools.package-data]`` pattern of their
    folder's package installs: a wheel would leave them out."""
    import fnmatch

    missing = []
    for path in sorted(package.rglob("*")):
        if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
            continue
        dotted = ".".join((package.name, *path.parent.relative_to(package).parts))
        if not any(fnmatch.fnmatch(path.name, p) for p in package_data.get(dotted, [])):
            missing.append(str(path.relative_to(package.parent)))
    return missing


def _package_data() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]


def test_every_data_file_is_installed():
    """The shipped model, configs, corpora and lm-eval tasks are all named in pyproject's package-data."""
    assert unshipped_files(PACKAGE, _package_data()) == []
    assert (PACKAGE / "data" / "tasks" / "vlq_sequences.jsonl").is_file()


def test_unshipped_file_is_reported(tmp_path):
    """Negative control: a task file in a folder package-data does not name is found."""
    (tmp_path / "vlq" / "data" / "tasks").mkdir(parents=True)
    (tmp_path / "vlq" / "data" / "tasks" / "t.jsonl").write_text("{}\n")
    (tmp_path / "vlq" / "data" / "c.json").write_text("{}\n")
    assert unshipped_files(tmp_path / "vlq", {"vlq.data": ["*.json"]}) == ["vlq/data/tasks/t.jsonl"]
