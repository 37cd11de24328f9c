"""``vlcp cache merge SRC``: fold another cache directory into this one.

The multi-node path that needs no shared SQLite index: each node distils its own classes
(``--classes``) into a cache on its local disk, the caches are merged, and one node runs the whole
dataset, finding every per-item artefact (captions, latents: keyed by image content, not by the class
subset) already there. Keys are content hashes, so an entry present in both is the same artefact and
is kept as is; each copied blob is checked against its checksum first and written atomically before its
index record, so an interrupted merge leaves nothing half-written and can simply be run again.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vlcp.store.cache import INDEX_DIR, StageCache, atomic_write_bytes


class CacheMergeError(Exception):
    """SRC is not a cache directory, or is this cache: one line, nothing merged."""


@dataclass
class MergeReport:
    copied: int = 0
    present: int = 0
    corrupt: int = 0
    bytes: int = 0


def merge(dst: StageCache, src_dir: str | Path) -> MergeReport:
    """Copy every artefact of ``src_dir`` that ``dst`` lacks (process-local ``_`` records are left out)."""
    src_dir = Path(src_dir)
    if not (src_dir / INDEX_DIR).is_dir():
        raise CacheMergeError(f"{src_dir} is not a vlcp cache directory (no {INDEX_DIR}/ folder)")
    if src_dir.resolve() == dst.root.resolve():
        raise CacheMergeError(f"{src_dir} is this cache itself")
    src = StageCache(src_dir)
    rep = MergeReport()
    try:
        for k in src.index.iterkeys():
            if k.startswith("_"):  # heartbeats, rank reports, memoised file digests (path-specific)
                continue
            if k in dst.index:
                rep.present += 1
                continue
            stage, key = k.split("/", 1)
            rec = src._index_get(stage, key)  # an unreadable record is dropped there, not copied
            if rec is None:
                continue
            if rec.get("blob"):
                data = _blob(src, stage, rec)
                if data is None:
                    rep.corrupt += 1
                    continue
                atomic_write_bytes(dst._blob_path(stage, rec["blob"]), data)
            dst.index.set(k, rec)
            rep.copied += 1
            rep.bytes += int(rec.get("bytes", 0))
    finally:
        src.close()
    return rep


def _blob(src: StageCache, stage: str, rec: dict) -> bytes | None:
    """The blob's bytes if they match the recorded checksum, else None (skipped, never copied)."""
    try:
        data = src._blob_path(stage, rec["blob"]).read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == rec.get("blob_sha") else None
