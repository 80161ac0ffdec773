"""The code's layout: ``service/`` is packages by stage with the CLI on top, and nothing below
the CLI imports it; no import cycle between modules (imports inside functions count too); the
CLI's help and ``status`` do not load torch; every package says what it owns, and README's
map of the packages names packages that exist."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "parsers", "pipelines")


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> file."""
    return {module_name(path, root): path
            for package in PACKAGES for path in sorted((root / package).rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (top level, functions,
    ``TYPE_CHECKING`` blocks), absolute and relative: ``from a.b import c`` counts as ``a.b.c``
    when that is a module, else as ``a.b``; a module's packages are imported with it, but a
    package importing its own submodules is not an edge to itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else base)
    edges: set[str] = set()
    for target in targets:
        # importing a.b.c imports a and a.b too
        parts = target.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix in known and prefix != name and not name.startswith(prefix + "."):
                edges.add(prefix)
    return edges


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the list of its modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "service.cli" in graph and "pipelines.ddiccir" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    (tmp_path / "service" / "a").mkdir(parents=True)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "service" / "a" / "__init__.py").write_text('"""a."""\n')
    (tmp_path / "service" / "a" / "one.py").write_text("def f():\n    from ..b import two\n")
    (tmp_path / "service" / "b.py").write_text("from service.a import one\n")
    (tmp_path / "service" / "two.py").write_text("from .a.one import f\n")
    graph = import_graph(tmp_path)
    assert graph["service.a.one"] == {"service.b"}
    assert graph["service.two"] == {"service.a", "service.a.one"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"service.a.one", "service.b"}
    (tmp_path / "service" / "b.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_only_the_cli_imports_the_cli():
    """The stages are libraries the CLI calls; ``python -m service`` is the one other way in."""
    graph = import_graph()
    assert "service.cli" in graph["service.__main__"]
    offenders = sorted(name for name, targets in graph.items()
                       if not (name == "service.cli" or name.startswith("service.cli.")
                               or name == "service.__main__")
                       and any(t == "service.cli" or t.startswith("service.cli.")
                               for t in targets))
    assert offenders == []


def test_every_service_package_says_what_it_owns():
    packages = sorted((REPO_ROOT / "service").rglob("__init__.py"))
    assert len(packages) > 1
    silent = [module_name(path) for path in packages
              if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert silent == []


def _loaded_after(code: str, **environ: str) -> set[str]:
    """The modules loaded once ``code`` (which prints them) has run in a fresh Python."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, env={**os.environ, **environ}, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["evaluate", "--help"]])
def test_the_cli_help_does_not_load_torch(argv):
    """``pacs-annotate --help`` builds every command's parser: none may import torch, nor
    the stages' modules (they load when their command runs)."""
    loaded = _loaded_after(
        "import contextlib, io, sys\n"
        "from service.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(*sys.modules)\n")
    assert "service.cli" in loaded
    assert "torch" not in loaded or argv == ["evaluate", "--help"]
    assert "dask" not in loaded
    if argv != ["evaluate", "--help"]:
        assert not {name for name in loaded if name.startswith("pipelines.")}


def test_the_status_command_does_not_load_torch(settings):
    loaded = _loaded_after(
        "import contextlib, io, sys\n"
        "from service.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    code = main(['status'])\n"
        "assert code == 0, code\n"
        "print(*sys.modules)\n", DATABASE_URL=settings.database_url)
    assert "service.cli" in loaded and "torch" not in loaded


def test_readme_maps_packages_that_exist():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:service|parsers|pipelines)(?:/[a-z_]+)*)/`", section))
    assert "service/cli" in named
    missing = sorted(name for name in named if not (REPO_ROOT / name / "__init__.py").is_file())
    assert missing == []
    packages = {str(path.parent.relative_to(REPO_ROOT))
                for path in (REPO_ROOT / "service").rglob("__init__.py")}
    assert sorted(packages - named) == []
