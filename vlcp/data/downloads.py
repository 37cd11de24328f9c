"""Dataset downloads: fetched to a temporary file, checked against a published checksum, then renamed and
extracted, so an interrupted download is never mistaken for a dataset."""
from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from vlcp.data.errors import DatasetError


def _checksum_ok(path: Path, checksum: str | None) -> bool:
    if not checksum:
        return True
    algo, want = checksum.split(":", 1)
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest() == want


def download(url: str, dest: Path, checksum: str | None, hint: str = "") -> Path:
    """Fetch url to dest (checksum-verified); offline, fail naming the URL and where to put the file."""
    if dest.exists():
        if _checksum_ok(dest, checksum):
            return dest
        raise DatasetError(f"{dest} exists but its checksum is not {checksum}: delete it or replace it with "
                           f"a good copy of {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        extra = f" ({hint})" if hint else ""
        raise DatasetError(f"could not download {url} ({getattr(exc, 'reason', exc)}). Fetch it on a machine with "
                           f"network and put it at {dest}{extra}, then rerun.") from None
    if not _checksum_ok(part, checksum):
        part.unlink(missing_ok=True)
        raise DatasetError(f"download of {url} does not match checksum {checksum}; try again")
    os.replace(part, dest)
    return dest


def extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")  # "data" filter: no absolute paths, links out, devices
