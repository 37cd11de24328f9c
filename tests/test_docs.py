"""The README stays short and the docs site stays true: every page is in the nav, every link resolves, and no
page names a module path that does not exist (the package moves; the docs must follow)."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
MKDOCS = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
PATH_RE = re.compile(r"(?<![\w/.-])vlcp/[\w./-]*")  # vlcp/..., not /scratch/vlcp
DOTTED_RE = re.compile(r"`(vlcp(?:\.\w+)+)")  # `vlcp.method.sas.select(...)`
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _texts() -> dict[str, str]:
    files = [ROOT / "README.md", ROOT / "FIDELITY.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {str(f.relative_to(ROOT)): f.read_text() for f in files}


def paths_missing(text: str, root: Path) -> list[str]:
    """The `vlcp/...` paths in `text` that are not files or folders under `root`."""
    found = {m.group().rstrip(".,;:") for m in PATH_RE.finditer(text)}
    return sorted(p for p in found if not (root / p).exists())


def _top_level_names(module: Path) -> set[str]:
    names = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def dotted_missing(text: str, root: Path) -> list[str]:
    """The `vlcp.a.b.name` references in `text` whose module does not exist or does not define `name`.

    A mutmut mutant (`vlcp.m.x_f__mutmut_7`) names the function `f` of module `m`."""
    missing = []
    for ref in sorted({m.group(1) for m in DOTTED_RE.finditer(text)}):
        parts, here = ref.split("."), root / "vlcp"
        for i, part in enumerate(parts[1:], start=1):
            if (here / part).is_dir():
                here = here / part
                continue
            if (here / f"{part}.py").is_file():
                rest = parts[i + 1:]
                name = re.sub(r"^x_(\w+?)__mutmut_\d+$", r"\1", rest[0]) if rest else None
                if name and name not in _top_level_names(here / f"{part}.py"):
                    missing.append(ref)
            elif i == 1 or not (here / "__init__.py").is_file() or part not in _top_level_names(here / "__init__.py"):
                missing.append(ref)
            break
    return missing


def test_the_readme_is_at_most_150_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    config = _config()
    assert config["site_name"] == "vlcp" and config["theme"]["name"] == "material" and config["docs_dir"] == "docs"
    pages = _nav_pages(config["nav"])
    assert pages[0] == "index.md" and len(pages) == len(set(pages))
    assert [p for p in pages if not (ROOT / "docs" / p).is_file()] == []
    assert sorted(pages) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def test_the_fidelity_page_includes_fidelity_md():
    assert '--8<-- "FIDELITY.md"' in (ROOT / "docs" / "fidelity.md").read_text()
    snippets = next(e["pymdownx.snippets"] for e in _config()["markdown_extensions"]
                    if isinstance(e, dict) and "pymdownx.snippets" in e)
    assert snippets["check_paths"] is True and (ROOT / snippets["base_path"][0] / "FIDELITY.md").is_file()


@pytest.mark.parametrize("name", list(_texts()))
def test_no_page_names_a_module_that_does_not_exist(name):
    text = _texts()[name]
    assert paths_missing(text, ROOT) == []
    assert dotted_missing(text, ROOT) == []


def test_the_module_checks_catch_old_and_misspelt_names():
    text = ("`vlcp/stages.py:STAGES`, `vlcp/pipeline/table.py`, `vlcp/pipeline/stages/`, `/scratch/vlcp distill`,"
            " `vlcp.sas.select`, `vlcp.method.sas.select`, `vlcp.method.sas.nothing_here`, `vlcp.store.cache`,"
            " `vlcp.method.outliers.x_inlier_mask__mutmut_7`, `vlcp.method.outliers.x_gone__mutmut_1`.")
    assert paths_missing(text, ROOT) == ["vlcp/stages.py"]
    assert dotted_missing(text, ROOT) == ["vlcp.method.outliers.x_gone__mutmut_1", "vlcp.method.sas.nothing_here",
                                          "vlcp.sas.select"]


def test_the_readme_and_fidelity_links_resolve():
    for name in ("README.md", "FIDELITY.md"):
        local = [u.split("#")[0] for u in LINK_RE.findall((ROOT / name).read_text()) if "://" not in u]
        assert [u for u in local if u and not (ROOT / u).exists()] == [], name


def test_the_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    pages = _nav_pages(_config()["nav"])
    assert [p for p in pages if p != "fidelity.md" and f"(docs/{p}" not in readme] == []
    assert "(FIDELITY.md)" in readme  # the fidelity page is FIDELITY.md itself


def test_the_readme_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "vlcp", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    commands = re.findall(r"^  (\w+)  ", out.split("Commands:")[1], re.M)
    assert len(commands) >= 9
    readme = (ROOT / "README.md").read_text()
    assert [c for c in commands if f"| `vlcp {c}" not in readme] == []


def test_the_site_builds_without_a_warning(tmp_path):
    assert MKDOCS, "mkdocs is a test dependency (pip install -e .[test])"
    r = subprocess.run([MKDOCS, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                       text=True, env={"PATH": str(Path(sys.executable).parent), "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stderr
    page = (tmp_path / "site" / "fidelity" / "index.html").read_text()
    assert "Fidelity: the paper, the reference code, and vlcp" in page  # the snippet was included, not linked
