"""The package's layering (issue 23): the `maskopt` command starts without torch, maskopt/ has no import
cycle, and only the command imports the search command's module."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1] / "maskopt"


def imports() -> dict[str, set[str]]:
    """module -> the maskopt modules it imports, at the top or inside a function."""
    files = {".".join(f.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in ROOT.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base += f".{node.module}" if node.module else ""
            elif (node.module or "").startswith("maskopt"):
                base = node.module
            else:
                continue
            for alias in node.names:  # `from . import space` names a module; `from .space import x` its module
                deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {d for d in deps if d in files and d != name and d != "maskopt"}
    return graph


def test_no_import_cycle_and_only_the_command_imports_search():
    graph = imports()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep]) \
                if dep in path else f"import cycle through {dep}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert sorted(m for m, deps in graph.items() if "maskopt.search" in deps) == ["maskopt.cli"]


def test_the_command_starts_without_torch():
    code = "import sys, maskopt, maskopt.cli; print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from click.testing import CliRunner

    from maskopt.cli import main

    assert "search" in CliRunner().invoke(main, ["--help"]).output


def test_the_search_options_are_the_settings():
    """`maskopt search`'s options and SearchConfig's fields are one list: a setting without its flag, or a flag
    the settings do not hold, fails here (a recipe takes the same names)."""
    from dataclasses import fields

    from maskopt.cli import search
    from maskopt.config import SearchConfig

    assert {p.name for p in search.params} - {"recipe"} == {f.name for f in fields(SearchConfig)}
