"""The cache index's value codec: records are JSON, never pickles, so reading a (possibly tampered) index
never runs code; plain-data pickles of earlier vlcp versions are read with every global refused."""
from __future__ import annotations

import json
import pickle
from typing import Any


class _PlainData(pickle.Unpickler):
    """Reads the pickled records of earlier vlcp versions (dicts, lists, strings, numbers): every global a
    pickle names is refused, so no object is built and no code runs (the Python docs' "restricting
    globals"); anything else in the index is not vlcp's and is dropped as unreadable."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: the index holds plain data only")


def _plain(data: bytes) -> Any:
    """An index value: JSON (what vlcp writes), or a legacy pickle of plain data. ValueError otherwise."""
    import io

    if data[:1] != b"\x80":  # every pickle vlcp wrote (protocol >= 2) starts with PROTO
        return json.loads(data)
    try:
        return _PlainData(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, KeyError) as exc:
        raise ValueError(f"unreadable index value: {exc}") from None


def json_disk():
    """diskcache's value codec with JSON instead of pickle: str, bytes, int and float are stored raw as
    diskcache does; any other value (our records: dicts) as JSON text in the slot diskcache keeps for
    pickles; a key or value that only a pickle could hold raises ValueError instead of being unpickled."""
    import sqlite3

    import diskcache
    from diskcache.core import MODE_PICKLE, UNKNOWN

    class JsonDisk(diskcache.Disk):
        def store(self, value, read, key=UNKNOWN):
            if read or type(value) in (str, bytes, int, float):
                return super().store(value, read, key)
            return 0, MODE_PICKLE, None, sqlite3.Binary(json.dumps(value).encode())

        def fetch(self, mode, filename, value, read):
            if mode != MODE_PICKLE:
                return super().fetch(mode, filename, value, read)
            if value is None:
                raise ValueError("index value in a separate file: not written by vlcp")
            return _plain(bytes(value))

        def get(self, key, raw):
            if not raw:
                raise ValueError("pickled index key: not written by vlcp")
            return super().get(key, raw)

    return JsonDisk
