"""Training curves for TensorBoard: ``with scalars.logging_to(log_dir, run): ... scalars.add(tag, value, step)``.

Loops deep in method/, evaluation/ and baselines/ call ``add`` without knowing whether anyone listens;
only the command that got ``--log-dir`` opens a block, so nothing is threaded through signatures and a
run without ``--log-dir`` never imports tensorboard. One event-file folder per block, ``LOG_DIR/<run>``
(``run_name``: command, output name, start time), as diffusers' training scripts lay them out.

The writer is made at the first ``add``: a run whose stages all come from the cache trains nothing and
leaves no (empty) run folder in TensorBoard's list. Whether TensorBoard is installed and LOG_DIR can be
written is checked when the block opens, before any work. In a multi-process launch only rank 0 writes
(every process computes the same losses; one folder, one curve).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_log: contextvars.ContextVar = contextvars.ContextVar("vlcp_scalar_log", default=None)
_prefix: contextvars.ContextVar[str] = contextvars.ContextVar("vlcp_scalar_prefix", default="")


class ScalarLogError(Exception):
    """--log-dir cannot be used (TensorBoard not installed, a folder that cannot be written): exit code 1."""


@dataclass
class Log:
    """One open ``logging_to`` block: where its event files go, the writer once something was added."""
    root: Path
    run: str
    writer: Any = None
    folder: Path | None = None  # LOG_DIR/<run>, set when the first scalar is written

    def open(self):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = _new_folder(self.root, self.run)
        self.writer = SummaryWriter(log_dir=str(self.folder))
        return self.writer


def run_name(command: str, target: str | os.PathLike | None = None, now: float | None = None) -> str:
    """``<command>-<name of OUT (or of what it reads)>-<YYYYmmdd-HHMMSS>``: the name says what the run made,
    the start time keeps two runs into one OUT apart (TensorBoard draws a folder's event files as one curve)."""
    name = Path(target).resolve().name if target is not None and str(target) else ""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return "-".join(p for p in (command, name.replace(os.sep, "_"), stamp) if p)


def _new_folder(root: Path, run: str) -> Path:
    """``root/run``, or ``root/run-2``, ``-3``... when a run of the same second has it: never shared."""
    for i in range(1, 1000):
        folder = root / (run if i == 1 else f"{run}-{i}")
        try:
            folder.mkdir(0o777)
            return folder
        except FileExistsError:
            continue
    raise ScalarLogError(f"--log-dir {root}: no free run folder named {run}-N")


@contextlib.contextmanager
def logging_to(log_dir: str | os.PathLike | None, run: str = "") -> Iterator[Log | None]:
    """Send ``add`` calls inside this block to TensorBoard event files in ``log_dir/run`` (no-op for None);
    yields the ``Log`` (its ``folder`` is None while nothing was added), or None when nothing is logged."""
    if log_dir is None:
        yield None
        return
    from vlcp.store.parallel import world

    if not world().main:  # the other processes of a launch compute the same scalars
        yield None
        return
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError as e:
        raise ScalarLogError(f"--log-dir needs TensorBoard ({e}): pip install 'vlcp[tensorboard]' "
                             "(or pip install tensorboard)") from None
    root = Path(log_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScalarLogError(f"--log-dir {root}: cannot create it ({e.strerror or e})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ScalarLogError(f"--log-dir {root}: not writable")
    log = Log(root, run or run_name("run"))
    token = _log.set(log)
    try:
        yield log
    finally:
        _log.reset(token)
        if log.writer is not None:
            log.writer.close()


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """Prefix the tags of ``add`` calls inside this block (``evaluate/<protocol>-<model>/run0/loss``)."""
    token = _prefix.set(f"{_prefix.get()}{name}/" if name else _prefix.get())
    try:
        yield
    finally:
        _prefix.reset(token)


def active() -> bool:
    """Whether ``add`` writes anything (a caller may skip work that only logging needs)."""
    return _log.get() is not None


def add(tag: str, value: float, step: int) -> None:
    """One point of a curve; does nothing unless a ``logging_to`` block is open. ``value`` must already be
    a Python number the loop computed (a tensor here would cost a device sync per call)."""
    log = _log.get()
    if log is None:
        return
    writer = log.writer or log.open()
    writer.add_scalar(_prefix.get() + tag, float(value), int(step))
