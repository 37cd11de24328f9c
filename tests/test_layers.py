"""The architecture is enforced, not hoped for: import contracts, no import circle, small modules."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
SUBPACKAGES = ["cli", "pipeline", "baselines", "method", "evaluation", "report", "models", "data", "store"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    assert LINT, "import-linter is a test dependency (pip install -e .[test])"
    env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent), "NO_COLOR": "1", "COLUMNS": "400"}
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def test_the_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, upward, contract", [
    ("vlcp/store/output.py", "vlcp.cli.main", "Layers"),  # the store reaching for the CLI
    ("vlcp/method/finetune.py", "vlcp.pipeline.run", "Layers"),  # an algorithm reaching for the pipeline
    ("vlcp/pipeline/loop.py", "vlcp.baselines.select", "do not know each other"),
    ("vlcp/method/clusters.py", "vlcp.store.cache", "are pure"),
])
def test_a_lazy_upward_import_breaks_a_contract(tmp_path, module, upward, contract):
    shutil.copytree(ROOT / "vlcp", tmp_path / "vlcp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    with (tmp_path / module).open("a") as f:  # inside a function: lazy imports count too
        f.write(f"\n\ndef _reaches_up():\n    import {upward}  # noqa: F401\n")
    r = _lint(tmp_path)
    assert r.returncode == 1, r.stdout
    broken = [line for line in r.stdout.splitlines() if line.rstrip().endswith(" BROKEN")]
    assert any(contract in line for line in broken), r.stdout
    importer = module[:-3].replace("/", ".")
    assert f"{importer} -> {upward}" in r.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), lazy imports included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on, found = [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph.modules):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = grimp.build_graph("vlcp", exclude_type_checking_imports=True, cache_dir=None)
    assert len(graph.modules) > 60
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    class Graph:
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert _cycles(Graph()) == [["a", "b", "c"]]


def test_no_module_exceeds_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "vlcp").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_the_package_is_its_subpackages():
    """Nothing but the entry points at the top; each subpackage says what lives there and what it may import."""
    top = sorted(p.name for p in (ROOT / "vlcp").glob("*.py"))
    assert top == ["__init__.py", "__main__.py"]
    found = sorted(p.parent.name for p in (ROOT / "vlcp").glob("*/__init__.py"))
    assert set(SUBPACKAGES) <= set(found)
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / "vlcp" / name / "__init__.py").read_text()))
        assert doc and "import" in doc, f"vlcp/{name}/__init__.py: say what lives here and what it may import"
