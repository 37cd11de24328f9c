"""How stages meet the cache: a whole-stage wrapper and a per-item map, both reporting what they did.

Stages are plain functions; these wrappers decide from keys alone whether to call them, load models
only when something is missing (``Lazy``), store every finished item at once (a killed run keeps its
progress) and return a ``StageReport`` that goes into ``manifest.json``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from vlcp.store.cache import Entry, StageCache, stable_hash


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
    """A whole-stage artefact: compute() -> (meta, tensors), unless the key is cached.

    In a multi-process launch (``vlcp.store.parallel``) only rank 0 computes; the others wait for the key."""
    from vlcp.store import parallel

    t0 = time.perf_counter()
    before = model.loaded if model else False
    entry = cache.get(stage, key)
    cached = entry is not None
    if entry is None and dry:
        raise PlanStop(StageReport(stage, key, False, 1, 0, False, 0.0))
    w = parallel.world()
    if w.parallel:  # from the first stage on, so peers waiting on our long whole stage see us alive
        parallel.start_heartbeat(cache, w)
    by_peer = entry is None and not w.main
    if by_peer:
        parallel.wait_for(cache, stage, {key: 0}, w, what="artefact")
        entry = _peer_entry(cache, stage, key)
    elif entry is None:
        meta, tensors = compute()
        entry = cache.put(stage, key, meta, tensors)
    rep = StageReport(stage, key, cached, 0 if cached or by_peer else 1, 1 if cached else 0,
                      _was_loaded(model, before), round(time.perf_counter() - t0, 3))
    if by_peer:
        rep.details = {"computed_by_peers": 1}
    return entry, rep


def _peer_entry(cache: StageCache, stage: str, key: str) -> Entry:
    from vlcp.store.parallel import ParallelError

    entry = cache.get(stage, key)
    if entry is None:
        raise ParallelError(f"stage {stage}: the entry {key[:12]} another process wrote is unreadable here "
                            f"(is the cache directory shared and complete?); rerun to recompute it")
    return entry


@dataclass(frozen=True)
class ItemOpts:
    """How ``run_items`` runs, beyond what it computes."""
    dry: bool = False  # plan only: compute nothing, missing entries stay None
    retain: bool = True  # computed entries keep their tensors; False: read back from the blob when used
    unit: str = "img"  # what the progress bar counts ("class" for a stage with one item per class)


def run_items(cache: StageCache, stage: str, keys: list[str],
              compute: Callable[[list[int]], Iterable[tuple[dict, dict]]], batch_size: int | Callable[[], int],
              model: Lazy | None = None, progress: bool | str = True,
              opts: ItemOpts = ItemOpts()) -> tuple[list[Entry | None], StageReport]:
    """Per-item stage: compute(indices) yields (meta, tensors) for each index, in order.

    Items with equal keys (duplicate images) are computed once. ``progress`` is False (no bar), True
    (a bar named after the stage) or the bar's name. With ``opts.dry``, nothing is computed: missing
    entries stay None and the report counts what would be computed. With ``opts.retain`` False the
    computed entries do not keep their tensors (a latents stage over a million images must not hold
    them all). In a multi-process launch (``vlcp.store.parallel``) this process computes the missing items
    of its batches only (whole batches are dealt, so every item is computed in the batch it would
    have in one process), then waits for the others' and returns every entry;
    ``details.computed_by_peers`` counts the others' items.
    """
    from vlcp.store import parallel

    t0 = time.perf_counter()
    before = model.loaded if model else False
    w = parallel.SINGLE if opts.dry else parallel.world()
    where: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        where.setdefault(k, []).append(i)
    unique = list(where)
    if w.parallel:
        parallel.start_heartbeat(cache, w)
    found = cache.get_many(stage, unique)
    entries: list[Entry | None] = [None] * len(keys)
    for k, e in zip(unique, found):
        if e is not None:
            for j in where[k]:
                entries[j] = e
    missing = [n for n, e in enumerate(found) if e is None]  # positions in ``unique``
    batches: list[list[int]] = []
    peers: dict[str, int] = {}
    if missing and not opts.dry:
        bs = parallel.batch_size(cache, stage, unique, batch_size, w)  # e.g. from GPU memory: only when needed
        mine, peers = parallel.deal(unique, missing, bs, w)
        batches = [[where[unique[n]][0] for n in b] for b in mine]
        for i, e in _compute(cache, stage, keys, batches, compute, progress, opts):
            for j in where[keys[i]]:
                entries[j] = e
    if peers:
        parallel.wait_for(cache, stage, peers, w, progress)
        for k in peers:
            e = _peer_entry(cache, stage, k)
            for j in where[k]:
                entries[j] = e
    computed = sum(len(b) for b in batches) if not opts.dry else len(missing)
    by_peers = sum(len(where[k]) for k in peers)
    rep = StageReport(stage, stable_hash(keys), computed == 0 and not peers, computed,
                      len(keys) - computed - by_peers, _was_loaded(model, before), round(time.perf_counter() - t0, 3))
    if peers:
        rep.details = {"computed_by_peers": len(peers)}
    return entries, rep


def _compute(cache: StageCache, stage: str, keys: list[str], batches: list[list[int]], compute: Callable,
             progress: bool | str, opts: ItemOpts) -> Iterator[tuple[int, Entry]]:
    """Compute each batch (first indices of missing keys), storing every item at once."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(b) for b in batches), desc=progress if isinstance(progress, str) else stage,
               unit=opts.unit, disable=progress is False, leave=False)
    try:
        for batch in batches:
            done = [(i, meta, tensors) for i, (meta, tensors) in zip(batch, compute(batch))]
            entries = cache.put_many(stage, [(keys[i], meta, tensors) for i, meta, tensors in done],
                                     retain=opts.retain)
            yield from ((i, e) for (i, _, _), e in zip(done, entries))  # stored together: one index commit
            bar.update(len(batch))
    finally:  # also when a batch fails: the bar's line is cleared, so the error message starts a line of its own
        bar.close()
