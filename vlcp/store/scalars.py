"""Training curves for TensorBoard: ``with scalars.logging_to(log_dir): ... scalars.add(tag, value, step)``.

Loops deep in method/, evaluation/ and baselines/ call ``add`` without knowing whether anyone listens;
only the command that got ``--log-dir`` opens a writer, so nothing is threaded through signatures and a
run without ``--log-dir`` never imports tensorboard. One event-file folder per ``logging_to`` call, named
by the caller (``LOG_DIR/<run name>``), as diffusers' training scripts lay them out.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path

_writer: contextvars.ContextVar = contextvars.ContextVar("vlcp_scalar_writer", default=None)
_prefix: contextvars.ContextVar[str] = contextvars.ContextVar("vlcp_scalar_prefix", default="")


class ScalarLogError(Exception):
    pass


@contextlib.contextmanager
def logging_to(log_dir: Path | None, run_name: str = "") -> Iterator[None]:
    """Send ``add`` calls inside this block to TensorBoard event files in ``log_dir/run_name`` (no-op for None)."""
    if log_dir is None:
        yield
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch.utils.tensorboard needs the tensorboard package
        raise ScalarLogError("--log-dir needs TensorBoard: pip install 'vlcp[tensorboard]' (or tensorboard)") from e
    folder = Path(log_dir) / run_name if run_name else Path(log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(folder))
    token = _writer.set(writer)
    try:
        yield
    finally:
        _writer.reset(token)
        writer.close()


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """Prefix the tags of ``add`` calls inside this block (``finetune/loss``, ``evaluate/<protocol>/loss``)."""
    token = _prefix.set(f"{_prefix.get()}{name}/")
    try:
        yield
    finally:
        _prefix.reset(token)


def active() -> bool:
    return _writer.get() is not None


def add(tag: str, value: float, step: int) -> None:
    """One point of a curve; does nothing unless a ``logging_to`` block is open."""
    writer = _writer.get()
    if writer is not None:
        writer.add_scalar(_prefix.get() + tag, float(value), int(step))
