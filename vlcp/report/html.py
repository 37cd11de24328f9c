"""``OUT/report.html``: one page to judge a distilled set by looking at it.

Built only from the files in the folder (``manifest.json``, ``prototypes.json``, the class image
folders, ``finetune_loss.csv``, ``evaluations/*.json``, ``preview_refined.png``), so ``vlcp report OUT``
can rebuild it at any time and the page survives being zipped and moved: images are referenced by
relative paths, the loss curve is inline SVG, the CSS is inlined, there is no script and nothing from
the network. A folder left partial by a killed or older run still gets a page: each section shows what
exists and says what is missing or unreadable. Never imports torch: it runs at the end of every
``vlcp distill`` and must stay well under a second for hundreds of images.

This module reads the folder (``folder.py``), builds each section's data (``sections.py``,
``classes.py``, ``plots.py``) and renders ``templates/report.html.j2`` with autoescaping, so no class
name, caption, prompt or path from the folder can add markup; a local absolute path (dataset folder, models,
OUT) shows as ``…/<its last part>`` (``card.public``, as on the card), since ``vlcp publish`` uploads the page.
"""
from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from vlcp.report.card import public
from vlcp.report.classes import classes_section
from vlcp.report.folder import Folder, ReportError, load
from vlcp.report.sections import (
    dataset_name,
    evaluation_section,
    finetune_section,
    ipc_text,
    post_sampling_section,
    refinement_section,
    run_section,
)

__all__ = ["REPORT", "ReportError", "build", "render"]

REPORT = "report.html"
# (name in the "could not be drawn" note, template, data builder); a builder returning None: nothing to show
SECTIONS: list[tuple[str, str, Callable[[Folder], Any]]] = [
    ("run", "run.html.j2", run_section), ("post-sampling", "post_sampling.html.j2", post_sampling_section),
    ("fine-tuning", "finetune.html.j2", finetune_section), ("refinement", "refinement.html.j2", refinement_section),
    ("evaluation", "evaluation.html.j2", evaluation_section), ("classes", "classes.html.j2", classes_section)]


@dataclass
class Section:
    """One section for the page: its data, or why it could not be built."""
    name: str
    template: str
    data: Any
    error: str = ""


def build(out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` atomically from the folder's files; return its path."""
    from vlcp.store.cache import atomic_write_text

    folder = load(Path(out_dir))
    path = folder.root / REPORT
    atomic_write_text(path, render(folder))
    return path


def render(f: Folder) -> str:
    """The whole page; a section that cannot be built from odd data says so instead of failing."""
    sections = []
    for name, template, fn in SECTIONS:
        try:
            sections.append(Section(name, template, fn(f)))
        except Exception as exc:  # noqa: BLE001 - odd data in one section must not lose the page
            sections.append(Section(name, template, None, f"{exc.__class__.__name__}: {exc}"))
    title = f"vlcp report: {public(dataset_name(f.manifest))} IPC {ipc_text(f)}"
    return environment().get_template("report.html.j2").render(title=title, problems=f.problems, sections=sections)


def _escape(value: Any) -> Markup:
    """Escape with ``html.escape`` before autoescape sees the value: the same entities (``&#x27;``,
    ``&quot;``) as pages written before the templates, and as safe as markupsafe's."""
    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


@lru_cache(maxsize=1)
def environment() -> Environment:
    """Templates from the installed package (``vlcp/report/templates``); autoescape on, and an undefined
    name is an error rather than an empty string."""
    return Environment(loader=PackageLoader("vlcp.report", "templates"), autoescape=True, undefined=StrictUndefined,
                       finalize=_escape, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
