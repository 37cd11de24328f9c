"""One row of the stage table: what a stage reads, what its key holds, and when it runs (no imports: every
stage module and the loop use it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[["Run", "Step"], None]
    version: int
    what: str  # for the stage table in docs/stages.md
    per: str = "run"  # "image" (cached per item), "class" (per class) or "run" (one artefact)
    params: tuple[str, ...] = ()  # config fields in the key, by value
    selects: tuple[str, ...] = ()  # config fields that choose which items exist
    unkeyed: tuple[str, ...] = ()  # config fields that cannot change a result
    inputs: str = ""  # what else the key holds (for docs/stages.md)
    models: tuple[str, ...] = ()  # models it uses (released after the last stage that does)
    enabled_by: str | None = None  # config flag that turns it on
    stored_as: tuple[str, ...] = ()  # cache stage(s) its items live under when shared with others (default: name)
