"""New files and folders whose modes follow the umask (0666 / 0777 less it), as ``open`` and ``mkdir`` give,
where ``tempfile`` would give 0600 / 0700: a lab shares OUT and the cache on a group folder. Imports nothing of vlcp."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

_KEPT: dict[str, Path] = {}


def keep(what: str, path: str | os.PathLike) -> None:
    """Register a folder that no output may be or contain (the cache, the data folder): ``--force`` replaces an
    output folder whole, and whatever lay in it would go with it."""
    _KEPT[what] = Path(path)


def kept() -> list[tuple[str, Path]]:
    """(what, folder) of every folder an output must leave alone: the current folder and those registered."""
    return [("the current folder", Path.cwd()), *_KEPT.items()]


def probe_write(path: str | os.PathLike) -> Path:
    """Create and remove a probe file in the nearest existing folder of ``path`` (returned); OSError if that
    folder takes no new file. Permission bits alone would miss root squashing and read-only mounts."""
    p = Path(path)
    folder = next((a for a in (p, *p.parents) if a.exists()), p)
    fd, probe = new_file(folder, ".vlcp-write-probe-")
    os.close(fd)
    os.unlink(probe)
    return folder


def new_file(folder: str | os.PathLike, prefix: str, suffix: str = "") -> tuple[int, str]:
    """(fd, path) of a new, unique file in ``folder``, opened for writing: ``tempfile.mkstemp`` with the mode
    ``open`` would give it (0666 less the umask) instead of 0600."""
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def new_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, unique folder in ``parent``: ``tempfile.mkdtemp`` with 0777 less the umask instead of 0700."""
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {parent}")
