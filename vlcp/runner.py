"""How stages meet the cache: a whole-stage wrapper and a per-item map, both reporting what they did.

Stages are plain functions; these wrappers decide from keys alone whether to call them, load models
only when something is missing (``Lazy``), store every finished item at once (a killed run keeps its
progress) and return a ``StageReport`` that goes into ``manifest.json``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from vlcp.cache import Entry, StageCache, stable_hash


@dataclass
class StageReport:
    name: str
    key: str
    cached: bool
    items_computed: int
    items_cached: int
    model_loaded: bool
    seconds: float
    details: dict = field(default_factory=dict)

    def manifest(self) -> dict:
        d = asdict(self)
        d.pop("name")
        if not d["details"]:
            d.pop("details")
        return d


class Lazy:
    """A model loaded on first use, so a stage whose items are all cached never pays for it."""

    def __init__(self, load: Callable):
        self._load = load
        self._value = None
        self.loaded = False

    def __call__(self):
        if not self.loaded:
            self._value = self._load()
            self.loaded = True
        return self._value

    def release(self) -> None:
        """Drop the model (and the GPU memory it held) once no later stage needs it."""
        if not self.loaded:
            return
        self._value = None
        self.loaded = False
        import gc
        import sys

        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def _was_loaded(model: Lazy | None, before: bool) -> bool:
    return bool(model is not None and model.loaded and not before)


class PlanStop(Exception):
    """Raised in dry-run mode where a stage would have to compute: the plan ends there.

    ``report`` is that stage's plan (what it would compute), or None when the stage cannot even be
    planned because its inputs are not cached yet."""

    def __init__(self, report: StageReport | None):
        self.report = report


def run_stage(cache: StageCache, stage: str, key: str, compute: Callable[[], tuple[dict, dict]],
              model: Lazy | None = None, dry: bool = False) -> tuple[Entry, StageReport]:
    """A whole-stage artefact: compute() -> (meta, tensors), unless the key is cached."""
    t0 = time.perf_counter()
    before = model.loaded if model else False
    entry = cache.get(stage, key)
    cached = entry is not None
    if entry is None and dry:
        raise PlanStop(StageReport(stage, key, False, 1, 0, False, 0.0))
    if entry is None:
        meta, tensors = compute()
        entry = cache.put(stage, key, meta, tensors)
    return entry, StageReport(stage, key, cached, 0 if cached else 1, 1 if cached else 0, _was_loaded(model, before),
                              round(time.perf_counter() - t0, 3))


def run_items(cache: StageCache, stage: str, keys: list[str],
              compute: Callable[[list[int]], Iterable[tuple[dict, dict]]], batch_size: int,
              model: Lazy | None = None, progress: bool | str = True,
              dry: bool = False) -> tuple[list[Entry | None], StageReport]:
    """Per-item stage: compute(indices) yields (meta, tensors) for each index, in order.

    Items with equal keys (duplicate images) are computed once. ``progress`` is False (no bar), True
    (a bar named after the stage) or the bar's name. With ``dry``, nothing is computed:
    missing entries stay None and the report counts what would be computed.
    """
    t0 = time.perf_counter()
    before = model.loaded if model else False
    entries: list[Entry | None] = [None] * len(keys)
    missing: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        if k in missing:
            missing[k].append(i)
            continue
        e = cache.get(stage, k)
        if e is None:
            missing[k] = [i]
        else:
            entries[i] = e
    todo = [idx[0] for idx in missing.values()]
    if todo and not dry:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=progress if isinstance(progress, str) else stage, unit="img",
                   disable=progress is False, leave=False)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            for i, (meta, tensors) in zip(batch, compute(batch)):
                e = cache.put(stage, keys[i], meta, tensors)
                for j in missing[keys[i]]:
                    entries[j] = e
            bar.update(len(batch))
        bar.close()
    computed = len(todo)
    return entries, StageReport(stage, stable_hash(keys), computed == 0, computed, len(keys) - computed,
                                _was_loaded(model, before), round(time.perf_counter() - t0, 3))

