"""FIDELITY.md says only what is true: every "vlcp" cell names a flag, a default or a file that exists."""
import importlib
import re
from pathlib import Path

import click

from vlcp.cli.main import cli

ROOT = Path(__file__).parents[1]


def _flags() -> set[str]:
    out: set[str] = set()

    def walk(cmd):
        for p in cmd.params:
            if isinstance(p, click.Option):
                out.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(cli)
    return out


def _vlcp_cells() -> list[tuple[str, str, str]]:
    """(section, row's first cell, vlcp cell) for every table row of FIDELITY.md."""
    cells, section, columns = [], "", []
    for line in (ROOT / "FIDELITY.md").read_text().splitlines():
        if line.startswith("## "):
            section, columns = line[3:], []
        elif line.startswith("|") and not line.startswith("|---"):
            parts = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if not columns:
                columns = parts
                continue
            for head, cell in zip(columns, parts):
                if head.startswith("vlcp") and head != "vlcp before":  # a flag in the header anchors its cells
                    anchor = " ".join(re.findall(r"--[a-z][a-z0-9-]*", head))
                    cells.append((section, parts[0], f"{cell} {anchor}".strip()))
    return cells


def _exists(ref: str) -> bool:
    if ref.startswith("vlcp/"):
        return (ROOT / ref.split(":")[0]).exists()
    mod, _, attr = ref.partition(":")
    parts = mod.split(".")
    for i in range(len(parts), 1, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for a in parts[i:] + ([attr] if attr else []):
            if not hasattr(obj, a):
                return False
            obj = getattr(obj, a)
        return True
    return False


def _problems(cells, flags) -> list[str]:
    bad = []
    for section, choice, cell in cells:
        named = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cell)
        refs = re.findall(r"`(vlcp[./][\w./:]+?)`", cell)
        refs = [r.rstrip(".") for r in refs if not r.startswith("vlcp.py")]
        for f in named:
            if f not in flags:
                bad.append(f"{section} / {choice}: {f} is not an option of any command")
        for r in refs:
            if not _exists(r):
                bad.append(f"{section} / {choice}: {r} does not exist")
        if not (cell.startswith("=") or named or refs or "default" in cell or re.search(r"\d", cell)):
            bad.append(f"{section} / {choice}: the vlcp cell names no flag, default or file: {cell!r}")
        if re.fullmatch(r"see .*", cell):
            bad.append(f"{section} / {choice}: 'see ...' is not a statement: {cell!r}")
    return bad


def test_every_vlcp_cell_names_a_flag_a_default_or_a_file_that_exists():
    cells = _vlcp_cells()
    assert len(cells) > 60
    assert _problems(cells, _flags()) == []


def test_the_check_catches_the_kinds_of_false_row():
    flags = _flags()
    assert "--text-prototypes" in flags and "--caption-mode" in flags and "--protocol" in flags
    wrong = [("s", "a", "see `vlcp/method/finetune.py`"), ("s", "b", "`--no-such-flag` 3"),
             ("s", "c", "`vlcp/method/gone.py`"), ("s", "d", "`vlcp.method.sas.no_such_name`"), ("s", "e", "")]
    got = _problems(wrong, flags)
    assert len(got) == 5 and "no-such-flag" in got[1] and "gone.py" in got[2] and "no_such_name" in got[3]
    assert _problems([("s", "f", "= (`vlcp.method.sas.select`, `--sas-lambda`)")], flags) == []
