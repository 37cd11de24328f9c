"""Arrays that stay in the cache until used: a run's prototype latents, synthetic images, SAS pool and
refinement candidates.

Held in lists, ImageNet-1K at IPC 10 and 512 px would keep 7.8 GB of synthetic images (more with a
pool) and 640 MiB of centres for the whole run. An ``Arrays`` holds references instead (cache entry,
tensor name, row) and reads one array when it is used, so memory is one batch whatever the number of
classes. The content hash that downstream keys name an array by comes from the entry's meta when its
producer recorded it (``hashes``), so a fully cached rerun reads no image or centre to build its keys.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def array_hash(a: np.ndarray) -> str:
    """Content hash of an array (dtype and shape included): synthesis keys name their prototype by it,
    and the detector, CLIP and foreground caches name an image by it."""
    import hashlib

    a = np.ascontiguousarray(a)
    return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()[:32]


_last: list = [(None, None)]  # (entry, its tensors): consecutive rows of one entry read its blob once


def _tensors(entry) -> dict[str, np.ndarray]:
    if entry.loaded:
        return entry.tensors
    held, tensors = _last[0]  # one tuple: read and replaced whole, never half of another pair
    if held is entry:
        return tensors
    _last[0] = (None, None)  # never two blobs in memory at once
    tensors = entry.read()
    _last[0] = (entry, tensors)
    return tensors


def forget() -> None:
    """Drop the blob kept for consecutive reads (at the end of a run: it would outlive its cache)."""
    _last[0] = (None, None)


@dataclass(frozen=True, eq=False)
class Ref:
    """One array: held (``value``) or row ``row`` (None: the whole tensor) of tensor ``name`` of a cache
    entry, read (checksum-verified) on each use."""
    entry: Any = None  # cache.Entry
    name: str = ""
    row: int | None = None
    value: np.ndarray | None = None
    _hash: list = field(default_factory=list, repr=False)  # a digest computed from a read, kept

    def get(self) -> np.ndarray:
        if self.value is not None:
            return self.value
        t = _tensors(self.entry)[self.name]
        return t if self.row is None else t[self.row]

    def digest(self) -> str:
        """``array_hash`` of the array: recorded by its producer (one hash for a whole tensor, a list for
        rows), or computed from one read and kept (entries cached before hashes were recorded)."""
        if self.value is None:
            h = self.entry.meta.get("hashes", {}).get(self.name)
            if self.row is None and isinstance(h, str):
                return h
            if self.row is not None and isinstance(h, list) and self.row < len(h):
                return h[self.row]
        if not self._hash:
            self._hash.append(array_hash(self.get()))
        return self._hash[0]


class Arrays(Sequence):
    """A list of arrays by reference: ``a[i]`` reads one, ``a.refs[i]`` is the reference (swap references,
    not arrays), ``pick``/``+`` build new lists without reading anything."""

    def __init__(self, refs: Iterable[Ref] = ()):
        self.refs: list[Ref] = list(refs)

    @classmethod
    def held(cls, arrays: Iterable[np.ndarray]) -> "Arrays":
        return cls(Ref(value=a) for a in arrays)

    @classmethod
    def stored(cls, entries: Iterable, name: str) -> "Arrays":
        """Tensor ``name`` of each entry."""
        return cls(Ref(e, name) for e in entries)

    @classmethod
    def rows(cls, pairs: Iterable[tuple[Any, int]], name: str) -> "Arrays":
        """Row ``j`` of tensor ``name`` of entry ``e`` for each (e, j)."""
        return cls(Ref(e, name, j) for e, j in pairs)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Arrays(self.refs[i])
        return self.refs[i].get()

    def __iter__(self) -> Iterator[np.ndarray]:
        return (r.get() for r in self.refs)

    def __add__(self, other: "Arrays") -> "Arrays":
        return Arrays(self.refs + other.refs)

    def pick(self, idx: Iterable[int]) -> "Arrays":
        return Arrays(self.refs[i] for i in idx)

    def digest(self, i: int) -> str:
        return self.refs[i].digest()

    def digests(self) -> list[str]:
        return [r.digest() for r in self.refs]


def digests(arrays: Sequence[np.ndarray]) -> list[str]:
    """Content hashes of a list of arrays or of an ``Arrays`` (recorded hashes read no blob)."""
    return arrays.digests() if isinstance(arrays, Arrays) else [array_hash(a) for a in arrays]
