"""Many processes, one cache: split per-item stages by item, run whole stages once, meet in the cache.

``torchrun`` and ``accelerate launch`` start N copies of ``vlcp distill`` with ``RANK``/``WORLD_SIZE``
(and ``LOCAL_RANK``) in the environment; without them there is one process and nothing here changes
what a run does. The processes never talk to each other directly (no ``torch.distributed``): the
shared stage cache is the only channel. Per item, the unique keys of a stage are cut into the
batches a cold single-process run would use and whole batches are dealt out round-robin (batch b to
rank ``b % world``: the same split in every process whatever is cached already, and every item
computed with the same batch mates as in one process); each process computes the missing keys of its
batches and then waits until every key is in the cache.
Whole-stage artefacts are computed by rank 0 alone while the others wait for the key.

A waiting process must not hang forever on a peer that died: every process beats a counter in the
cache index (``_alive/<launch>/<rank>``) from a daemon thread, and a waiter gives up with a one-line
error when a peer that still owes keys has not beaten for ``VLCP_PEER_TIMEOUT`` seconds (default 1800;
the counter's change is what counts, so clocks of different nodes need not agree). Everything finished
before that is in the cache: a rerun computes only the missing items.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from vlcp.store.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.store.cache import StageCache

log = logging.getLogger("vlcp")

BEAT_S = 2.0  # heartbeat period of every process of a multi-process run
DEFAULT_PEER_TIMEOUT_S = 1800.0


class ParallelError(click.ClickException):
    """A multi-process run that cannot go on (bad launch environment, a peer that stopped): one line, exit 1."""


@dataclass(frozen=True)
class World:
    """This process's place in the launch: rank 0 of 1 when nothing launched it in parallel."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launch: str = ""  # the same id in every process of one launch (names heartbeats and reports)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


SINGLE = World()


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ParallelError(f"{name}={raw!r} in the environment is not an integer") from None


def world(env: Mapping[str, str] | None = None) -> World:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun and accelerate launch); absent = one process."""
    env = os.environ if env is None else env
    size = _int(env, "WORLD_SIZE", 1)
    rank = _int(env, "RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ParallelError(f"RANK={rank} and WORLD_SIZE={size} in the environment do not fit "
                            f"(need 0 <= RANK < WORLD_SIZE)")
    if size == 1:
        return SINGLE
    return World(rank, size, _int(env, "LOCAL_RANK", 0), launch_id(env))


def launch_id(env: Mapping[str, str]) -> str:
    """An id shared by the processes of one launch: VLCP_LAUNCH_ID if set, else the rendezvous
    (run id, master address and port) plus, on one node, the launcher's pid (our parent)."""
    if env.get("VLCP_LAUNCH_ID"):
        return env["VLCP_LAUNCH_ID"]
    parts = [env.get("TORCHELASTIC_RUN_ID", ""), env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
    if env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):  # one node: the launcher is everybody's parent
        parts.append(str(os.getppid()))
    return stable_hash(parts, 16)


def peer_timeout() -> float:
    raw = os.environ.get("VLCP_PEER_TIMEOUT", "").strip()
    try:
        return float(raw) if raw else DEFAULT_PEER_TIMEOUT_S
    except ValueError:
        raise ParallelError(f"VLCP_PEER_TIMEOUT={raw!r} is not a number of seconds") from None


# -- heartbeats ------------------------------------------------------------------------------------
_beating: set[tuple[str, str, int]] = set()
_lock = threading.Lock()


def _alive_key(w: World, rank: int) -> str:
    return f"_alive/{w.launch}/{rank}"


def start_heartbeat(cache: StageCache, w: World) -> None:
    """Beat ``_alive/<launch>/<rank>`` every BEAT_S seconds for the rest of this process (once per cache)."""
    ident = (str(cache.root), w.launch, w.rank)
    with _lock:
        if ident in _beating:
            return
        _beating.add(ident)
    key = _alive_key(w, w.rank)
    cache.index.set(key, 0)

    def beat():
        n = 0
        while True:
            time.sleep(BEAT_S)
            n += 1
            try:
                cache.index.set(key, n)
            except Exception as exc:  # noqa: BLE001  a closed or busy index: the next beat tries again
                log.debug("heartbeat %s: %r", key, exc)

    threading.Thread(target=beat, name=f"vlcp-heartbeat-{w.rank}", daemon=True).start()


# -- waiting -----------------------------------------------------------------------------------------
def owners(unique: list[str], w: World, batch: int = 1) -> dict[str, int]:
    """Which rank computes each unique key: whole batches (``batch`` keys by position) dealt round-robin,
    identical in every process whatever is cached."""
    return {k: (i // batch) % w.size for i, k in enumerate(unique)}


def deal(unique: list[str], missing: list[int], batch: int, w: World) -> tuple[list[list[int]], dict[str, int]]:
    """(this process's batches to compute, as positions in ``unique``; the others' missing keys -> owner).

    One process batches its missing items densely, as it always has. In a launch the batch
    boundaries are those of a cold single-process run (``unique`` cut every ``batch`` keys) and whole
    batches are dealt round-robin: every item of a cold run is computed with the same batch mates as
    in one process, so batched models round the same way (byte-identical output)."""
    if not w.parallel:
        return [missing[i:i + batch] for i in range(0, len(missing), batch)], {}
    mine: dict[int, list[int]] = {}
    peers: dict[str, int] = {}
    for n in missing:
        b = n // batch
        if b % w.size == w.rank:
            mine.setdefault(b, []).append(n)
        else:
            peers[unique[n]] = b % w.size
    return list(mine.values()), peers


def batch_size(cache: StageCache, stage: str, unique: list[str], size: int | Callable[[], int], w: World) -> int:
    """A per-item stage's batch size, evaluated only when something is missing. In a launch every process
    must cut the same batches: a size measured per process (free GPU memory) may differ, so the first
    process to measure records it in the index (an atomic add) and all use that one."""
    if not callable(size):
        return size
    return agree(cache, f"batch/{stage}/{stable_hash(unique)}", size, w)


_AGREED: set[str] = set()  # index keys of this process's agreements, removed by rank 0 at the end


def agree(cache: StageCache, topic: str, value: Callable[[], int], w: World) -> int:
    """One integer for every process of a launch: the first process to evaluate ``value`` records it in
    the index (an atomic add) and all use that one. One process: ``value()``."""
    if not w.parallel:
        return int(value())
    key = f"_agree/{w.launch}/{topic}"
    _AGREED.add(key)
    agreed = cache.index.get(key)
    if agreed is None:
        cache.index.add(key, int(value()))
        agreed = cache.index.get(key)
    return int(agreed)


def wait_for(cache: StageCache, stage: str, owed: Mapping[str, int], w: World,
             progress: bool | str = False, what: str = "item(s)") -> None:
    """Return once every key of ``owed`` (key -> owning rank) is in the index of ``stage``.

    Each owner writes its keys in order, so only the head of each owner's queue is polled. Raises
    ParallelError when an owner that still owes keys has not beaten for VLCP_PEER_TIMEOUT seconds."""
    if not owed:
        return
    start_heartbeat(cache, w)
    timeout = peer_timeout()
    queues: dict[int, deque[str]] = {}
    for k, r in owed.items():
        queues.setdefault(r, deque()).append(k)
    now = time.monotonic()
    seen: dict[int, tuple[object, float]] = {r: (object(), now) for r in queues}  # last beat, when it changed
    from tqdm.auto import tqdm

    name = progress if isinstance(progress, str) else stage
    bar = tqdm(total=len(owed), desc=f"{name} (peers)", unit="item", disable=progress is False, leave=False)
    delay = 0.02
    try:
        while queues:
            for r in list(queues):
                q = queues[r]
                n0 = len(q)
                while q and cache.has(stage, q[0]):
                    q.popleft()
                bar.update(n0 - len(q))
                if not q:
                    del queues[r]
                    continue
                beat, since = seen[r]
                now_beat = cache.index.get(_alive_key(w, r))
                if now_beat != beat:
                    seen[r] = (now_beat, time.monotonic())
                elif time.monotonic() - since > timeout:
                    left = sum(len(x) for x in queues.values())
                    raise ParallelError(
                        f"stage {stage}: {left} of {len(owed)} {what} computed by other processes still missing; "
                        f"rank {r} gave no sign of life for {timeout:.0f}s (died?). Everything finished is "
                        f"cached: rerun to compute only the missing items (VLCP_PEER_TIMEOUT sets the wait)")
            if queues:
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
    finally:
        bar.close()


# -- per-process reports -------------------------------------------------------------------------------
def gather_reports(cache: StageCache, w: World, stages: dict) -> dict[int, dict] | None:
    """Every rank's stage reports, on rank 0 (None elsewhere): ranks > 0 leave theirs in the index,
    rank 0 waits for them (a barrier: OUT appears only once every process is done) and removes them."""
    start_heartbeat(cache, w)
    record = {"rank": w.rank, "world_size": w.size, "stages": stages}
    if not w.main:
        cache.index.set(f"_report/{w.launch}/{w.rank}", record)
        return None
    wait_for(cache, "_report", {f"{w.launch}/{r}": r for r in range(1, w.size)}, w, what="stage report(s)")
    out = {0: record}
    for r in range(1, w.size):
        out[r] = cache.index.pop(f"_report/{w.launch}/{r}")
    for key in _AGREED:  # every process is done: a later launch with the same id must measure afresh
        cache.index.pop(key, None)
    _AGREED.clear()
    return out


def check_writable(root: str | os.PathLike) -> None:
    """Refuse a cache directory this process cannot write, before any work: one line, nothing left behind.

    Every process of a launch writes the shared cache, so each one checks by creating (and removing) a
    probe file in the nearest existing folder of the path (``files.probe_write``)."""
    from pathlib import Path

    from vlcp.store.files import probe_write

    p = Path(root)
    probe = next((a for a in (p, *p.parents) if a.exists()), p)
    if not probe.is_dir():
        raise ParallelError(f"cache directory {root}: {probe} is not a folder")
    try:
        probe_write(probe)
    except OSError as exc:
        raise ParallelError(f"cache directory {root} is not writable by this process "
                            f"({probe}: {exc.strerror or exc})") from None


def local_device(device: str, cuda_count: int) -> str:
    """In a launch, plain ``cuda`` (what ``--device auto`` picks) means this process's own GPU,
    ``cuda:LOCAL_RANK``: torchrun and accelerate launch do not set CUDA_VISIBLE_DEVICES per process."""
    w = world()
    if not w.parallel or device != "cuda" or cuda_count < 1:
        return device
    return f"cuda:{w.local_rank % cuda_count}"
