"""Content-addressed stage cache.

Every stage artefact lives under a key that is the hash of everything that can change it (stage
name, the stage's code version, parameters, input identities, model identity), in the spirit of
joblib.Memory and DVC's run-cache. The index (diskcache, SQLite: safe for concurrent processes)
maps ``stage/key`` to a record holding the JSON metadata inline and, for tensors, the name of an
immutable safetensors blob whose file name carries its own checksum. Blobs are written to a temp
file and renamed, so a killed writer never leaves a half-written entry behind; a blob whose bytes no
longer match its checksum is reported, dropped and recomputed.

Lookups are cheap: ``has`` reads the index only, and ``get`` checks the index record, its metadata
checksum and the blob's size (one ``stat``) but reads no blob; ``Entry.tensors`` reads and verifies
the blob on first access (``StageCache.blob_reads`` counts those reads). A blob found corrupt then
raises ``CorruptEntry`` after its index record was dropped, so rerunning the stage recomputes it;
``get(..., verify=True)`` reads eagerly and returns None instead.

Tensors are numpy arrays here (``safetensors.numpy``): reading the cache never imports torch.

The index holds no pickles (``json_disk``): its records are JSON, and reading it never runs code, even
from a cache directory someone else wrote. Records of caches written by earlier versions (pickled
dicts) stay readable through a loader that builds plain data only and refuses everything else.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlcp.store.files import new_file
from vlcp.store.index_codec import json_disk

log = logging.getLogger("vlcp")

INDEX_DIR = "index"
BLOB_DIR = "blobs"
MODELS_DIR = "models"


# json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str), without building an encoder per
# call (a cached rerun hashes a few keys per image: the encoder's set-up was a third of the cost)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, n: int = 32) -> str:
    """Hash a JSON-able object independently of dict order and whitespace."""
    return hashlib.sha256(_CANONICAL.encode(obj).encode()).hexdigest()[:n]


KEY_LAYOUT = 2  # 2: keys built from the stage table; caches of layout 1 (earlier 0.1 code) are recomputed


def stage_key(stage: str, version: int, **parts: Any) -> str:
    """The key of one artefact: stage name + code version + everything else that changes it."""
    return stable_hash({"stage": stage, "version": version, **parts})


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class CorruptEntry(Exception):
    """A cache entry whose bytes are not what was stored; its index record is already dropped."""

    def __init__(self, reason: str, stage: str = "", key: str = ""):
        super().__init__(f"cache entry {stage}/{key[:12]} is corrupt ({reason}); rerun to recompute it"
                         if stage else reason)
        self.reason, self.stage, self.key = reason, stage, key


class Entry:
    """A cached artefact: ``meta`` at once, ``tensors`` read (and checksum-verified) on first access.

    Reading lazily is what makes a fully cached rerun cheap: a stage whose items are all cached only
    needs to know they are there. ``tensors`` raises ``CorruptEntry`` if the blob turns out corrupt.
    """

    __slots__ = ("meta", "_tensors", "_load")

    def __init__(self, meta: dict, tensors: dict[str, np.ndarray] | None = None,
                 load: Callable[[], dict[str, np.ndarray]] | None = None):
        self.meta = meta
        self._tensors = tensors if tensors is not None or load is not None else {}
        self._load = load

    @property
    def loaded(self) -> bool:
        """Whether the tensors are in memory (always true for an entry without a blob)."""
        return self._tensors is not None

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        """The tensors, read on first access and kept (use ``read`` where they should not stay)."""
        if self._tensors is None:
            self._tensors = self._load()
            self._load = None
        return self._tensors

    def read(self) -> dict[str, np.ndarray]:
        """The tensors without keeping them on the entry: each call reads (and verifies) the blob again
        unless they are already in memory. Per-class stages read this way, so one class's latents at a
        time are in memory however many classes the dataset has."""
        return self._tensors if self._tensors is not None else self._load()

    def __repr__(self) -> str:
        return f"Entry(meta={self.meta!r}, loaded={self.loaded})"


class StageCache:
    """One cache directory: ``index/`` (diskcache), ``blobs/<stage>/``, ``models/`` (tiny models)."""

    def __init__(self, root: str | os.PathLike):
        import diskcache

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Tens of thousands of small records: keep them all in SQLite, never as loose files.
        self.index = diskcache.Cache(str(self.root / INDEX_DIR), disk=json_disk(), disk_min_file_size=1 << 30,
                                     size_limit=1 << 62, cull_limit=0, eviction_policy="none")
        self.corrupt = 0
        self.blob_reads = 0  # blobs read from disk by this process (a cached rerun should read none)
        self._blobs = str(self.root / BLOB_DIR)

    # -- records -----------------------------------------------------------------------------
    def _blob_path(self, stage: str, name: str) -> Path:
        return Path(self._blob_str(stage, name))

    def _blob_str(self, stage: str, name: str) -> str:
        """The blob's path as a string: building it with pathlib cost more than the lookup's SQL."""
        return f"{self._blobs}{os.sep}{stage}{os.sep}{name[:2]}{os.sep}{name}"

    def has(self, stage: str, key: str) -> bool:
        """Whether an entry is recorded: the index only, no blob is touched."""
        return f"{stage}/{key}" in self.index

    def get(self, stage: str, key: str, verify: bool = False) -> Entry | None:
        """The entry, or None when missing or corrupt (a corrupt one is dropped with a warning).

        The blob is not read here (only its size is checked): ``Entry.tensors`` reads it on first
        access. With ``verify`` the blob is read and checked now, and a corrupt one gives None.
        """
        rec = self._index_get(stage, key)
        if rec is None:
            return None
        try:
            entry = self._entry(stage, key, rec)
            if verify:
                entry.tensors  # read and verify now
            return entry
        except CorruptEntry as exc:
            if not exc.stage:  # the blob reader has already dropped and counted it
                self._drop(stage, key, rec, exc.reason)
        except (KeyError, TypeError, ValueError) as exc:
            self._drop(stage, key, rec, f"unreadable index record: {exc!r}")
        return None

    def get_many(self, stage: str, keys: list[str], chunk: int = 500) -> list[Entry | None]:
        """``get`` for many keys of one stage (a per-item stage's lookup): one SQL query per ``chunk``
        keys instead of one per key; missing, corrupt or unreadable entries give None (and corrupt
        ones are dropped, as in ``get``). No blob is read; index records are decoded a chunk at a time."""
        out: list[Entry | None] = []
        for start in range(0, len(keys), chunk):
            part = keys[start:start + chunk]
            recs = self._records(stage, part)
            for key in part:
                rec = recs.get(key)
                out.append(None if rec is None else self._checked_entry(stage, key, rec))
        return out

    def _checked_entry(self, stage: str, key: str, rec: Any) -> Entry | None:
        """The entry of an index record, or None after dropping a corrupt or unreadable record."""
        try:
            return self._entry(stage, key, rec)
        except CorruptEntry as exc:
            self._drop(stage, key, rec, exc.reason)
        except (KeyError, TypeError, ValueError) as exc:
            self._drop(stage, key, rec, f"unreadable index record: {exc!r}")
        return None

    def _records(self, stage: str, keys: list[str]) -> dict[str, Any]:
        """Index records of ``stage/key`` for the keys present, in one SQL query.

        Reads diskcache's table directly (the schema of diskcache 5: string keys stored raw, values
        decoded by its Disk); any other diskcache falls back to one ``get`` per key."""
        sql, disk = getattr(self.index, "_sql", None), getattr(self.index, "_disk", None)
        if sql is None or disk is None or diskcache_major() != 5:
            recs = ((k, self.index.get(f"{stage}/{k}")) for k in keys)
            return {k: r for k, r in recs if r is not None}
        prefix, out = f"{stage}/", {}
        marks = ",".join("?" * len(keys))
        rows = sql(f"SELECT key, mode, filename, value FROM Cache WHERE raw = 1 AND key IN ({marks}) "
                   "AND (expire_time IS NULL OR expire_time > ?)", (*(prefix + k for k in keys), time.time())).fetchall()
        for db_key, mode, filename, value in rows:
            try:
                out[db_key[len(prefix):]] = disk.fetch(mode, filename, value, False)
            except OSError:  # removed meanwhile: missing
                pass
            except ValueError as exc:  # not a record vlcp writes (e.g. a pickle of an object): never decoded
                self._unreadable(stage, db_key[len(prefix):], exc)
        return out

    def _index_get(self, stage: str, key: str) -> Any:
        """The index value of ``stage/key``, or None when missing or unreadable (then dropped)."""
        try:
            return self.index.get(f"{stage}/{key}")
        except ValueError as exc:
            self._unreadable(stage, key, exc)
            return None

    def _unreadable(self, stage: str, key: str, exc: Exception) -> None:
        self._count_corrupt(stage, key, exc)
        self.index.delete(f"{stage}/{key}")  # delete, unlike pop, does not decode the value

    def _count_corrupt(self, stage: str, key: str, reason) -> None:
        log.warning("cache entry %s/%s is corrupt (%s); recomputing it", stage, key[:12], reason)
        self.corrupt += 1

    def _entry(self, stage: str, key: str, rec: dict) -> Entry:
        meta_text = rec["meta"]
        if hashlib.sha256(meta_text.encode()).hexdigest() != rec["meta_sha"]:
            raise CorruptEntry("metadata checksum mismatch")
        meta = json.loads(meta_text)
        if not rec.get("blob"):
            return Entry(meta, {})
        path = self._blob_str(stage, rec["blob"])
        size = rec["bytes"] - len(meta_text)  # ASCII JSON: characters are bytes
        try:
            st_size = os.stat(path).st_size
        except OSError as exc:
            raise CorruptEntry(f"blob {rec['blob']} unreadable: {exc.strerror or exc}") from None
        if st_size != size:
            raise CorruptEntry(f"blob {rec['blob']} has {st_size} bytes, expected {size}")
        return Entry(meta, load=partial(self._read_blob, stage, key, rec["blob"], rec["blob_sha"]))

    def _read_blob(self, stage: str, key: str, name: str, sha: str) -> dict[str, np.ndarray]:
        """Read and verify one blob; on any fault drop the record and raise CorruptEntry.

        A lazy entry holds only these four strings (a partial), not its index record: a million cached
        latents cost about 0.6 KB each in memory until they are read."""
        from safetensors.numpy import load

        self.blob_reads += 1
        try:
            data = Path(self._blob_str(stage, name)).read_bytes()
        except OSError as exc:
            reason = f"blob {name} unreadable: {exc.strerror or exc}"
        else:
            if hashlib.sha256(data).hexdigest() == sha:
                return load(data)
            reason = f"checksum mismatch in {name}"
        self._drop(stage, key, None, reason, blob=name)
        raise CorruptEntry(reason, stage, key)

    def _drop(self, stage: str, key: str, rec: dict | None, reason: str, blob: str | None = None) -> None:
        """Warn, count, and remove the index record, unless a writer has replaced it meanwhile (the record
        is no longer ``rec``, or no longer names ``blob``: blob names carry their checksum)."""
        self._count_corrupt(stage, key, reason)
        k = f"{stage}/{key}"
        cur = self._index_get(stage, key)
        if cur is not None and (cur == rec if blob is None else isinstance(cur, dict) and cur.get("blob") == blob):
            self.index.delete(k)

    def put(self, stage: str, key: str, meta: dict, tensors: dict[str, np.ndarray] | None = None,
            retain: bool = True) -> Entry:
        """Store an entry; the returned entry keeps ``tensors`` unless ``retain`` is False (then it reads
        them back from the blob when used: a stage computing a million latents must not hold them)."""
        return self.put_many(stage, [(key, meta, tensors)], retain)[0]

    def put_many(self, stage: str, items: list[tuple[str, dict, dict[str, np.ndarray] | None]],
                 retain: bool = True) -> list[Entry]:
        """Store a batch of (key, meta, tensors): every blob first, then the records in one index
        transaction (one SQLite commit per batch, not per item: processes sharing the index wait less)."""
        recs = [self._record(stage, key, meta, tensors) for key, meta, tensors in items]
        if len(recs) == 1:
            self.index.set(f"{stage}/{items[0][0]}", recs[0])
        else:
            with self.index.transact():
                for (key, _, _), rec in zip(items, recs):
                    self.index.set(f"{stage}/{key}", rec)
        out = []
        for (key, _, tensors), rec in zip(items, recs):
            meta = json.loads(rec["meta"])  # what a later hit returns (sorted keys, lists): cold = cached output
            if tensors and not retain:
                out.append(Entry(meta, load=partial(self._read_blob, stage, key, rec["blob"], rec["blob_sha"])))
            else:
                out.append(Entry(meta, dict(tensors or {})))
        return out

    def _record(self, stage: str, key: str, meta: dict, tensors: dict[str, np.ndarray] | None) -> dict[str, Any]:
        """The index record of an entry, its blob (if any) already written atomically."""
        meta_text = json.dumps(meta, sort_keys=True)
        rec: dict[str, Any] = {"meta": meta_text, "meta_sha": hashlib.sha256(meta_text.encode()).hexdigest(),
                               "stage": stage, "bytes": len(meta_text), "created": time.time()}
        if tensors:
            from safetensors.numpy import save

            data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
            sha = hashlib.sha256(data).hexdigest()
            name = f"{key}-{sha[:16]}.safetensors"  # immutable: a concurrent writer gets its own file
            atomic_write_bytes(Path(self._blob_str(stage, name)), data)
            rec.update(blob=name, blob_sha=sha, bytes=rec["bytes"] + len(data))
        return rec

    # -- housekeeping ------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for k in self.index.iterkeys():
            stage = k.split("/", 1)[0]
            if stage.startswith("_"):  # memoised helper values, not artefacts
                continue
            rec = self._index_get(stage, k.split("/", 1)[1])
            if rec is None:
                continue
            s = out.setdefault(stage, {"entries": 0, "bytes": 0})
            s["entries"] += 1
            s["bytes"] += int(rec.get("bytes", 0))
        models = self.root / MODELS_DIR
        if models.exists():
            n = sum(f.stat().st_size for f in models.rglob("*") if f.is_file())
            out["models"] = {"entries": sum(1 for _ in models.iterdir()), "bytes": n}
        return out

    def clear(self, stage: str | None = None) -> int:
        """Remove one stage's entries (or everything); return how many entries went."""
        removed = 0
        for k in list(self.index.iterkeys()):
            if stage is None or k.split("/", 1)[0] == stage:
                removed += self.index.delete(k)
        if stage is None:
            shutil.rmtree(self.root / BLOB_DIR, ignore_errors=True)
            shutil.rmtree(self.root / MODELS_DIR, ignore_errors=True)
        elif stage == "models":
            removed += len(list((self.root / MODELS_DIR).glob("*"))) if (self.root / MODELS_DIR).exists() else 0
            shutil.rmtree(self.root / MODELS_DIR, ignore_errors=True)
        else:
            shutil.rmtree(self.root / BLOB_DIR / stage, ignore_errors=True)
        return removed

    def memo(self, name: str, key: str, compute) -> Any:
        """Small JSON values memoised in the index (e.g. directory hashes keyed by file mtimes)."""
        k = f"_memo/{name}/{key}"
        val = self.index.get(k)
        if val is None:
            val = compute()
            self.index.set(k, val)
        return val

    def close(self) -> None:
        self.index.close()



def diskcache_major() -> int:
    """The major version of diskcache (its SQL schema is read directly by ``StageCache.get_many``)."""
    import diskcache

    return int(diskcache.__version__.split(".")[0])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_file(path.parent, ".tmp-", path.suffix)  # mode from the umask: blobs and OUT are shared
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode())
