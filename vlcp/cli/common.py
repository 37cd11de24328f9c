"""What every command module shares: the context object, the one map from the package's errors to exit
codes, option helpers and table printing. Light on purpose: ``vlcp --help`` imports it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click


class StageChoice(click.Choice):
    """The stage names of ``vlcp.pipeline.table.STAGES`` (plus ``extra``), read when first needed so that
    ``vlcp --help`` does not import the stage table."""

    def __init__(self, extra: tuple[str, ...] = ()):
        self._extra = list(extra)
        super().__init__([])

    @property
    def choices(self):
        from vlcp.pipeline.table import STAGE_NAMES

        return STAGE_NAMES + self._extra

    @choices.setter
    def choices(self, value):
        pass


@dataclass
class Ctx:
    cache_dir: Path
    data_dir: Path
    device: str
    verbose: int
    quiet: bool

    def __post_init__(self):
        from vlcp.store.files import keep

        keep("the cache folder (--cache-dir)", self.cache_dir)  # never inside an output that --force replaces
        keep("the data folder (--data-dir)", self.data_dir)

    def cache(self):
        from vlcp.store.cache import StageCache
        from vlcp.store.parallel import check_writable

        check_writable(self.cache_dir)  # one line before any work, not an SQLite traceback mid-run
        return StageCache(self.cache_dir)


# The one exit-code rule of every command (``vlcp --help`` and the README state it; tests/test_exit_codes.py).
USAGE = 2  # the command line is wrong: an unknown option, a bad value, a path that does not exist or does not fit
FAILED = 1  # the run failed: a download, a model, a corrupt cache entry, data found unusable while read
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_CODES = ("Exit codes: 0 done; 2 usage (an unknown option, a bad value, a path that does not exist or "
              "does not fit, such as a non-empty --out); 1 a failure while running (a download, a model, "
              "the data, the disk); 130 interrupted (Ctrl-C).")


def usage_error(message: str) -> click.ClickException:
    """A one-line ``Error: message`` that exits with 2 (no usage banner: the message names the option)."""
    err = click.ClickException(message)
    err.exit_code = USAGE
    return err


class user_errors:
    """Turn the package's own error types into one-line Click errors: bad input exits with 2, a failure
    while computing with 1. The one place that decides exit codes for every command."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        from vlcp.data.caption_files import CaptionFileError
        from vlcp.data.datasets import DatasetError
        from vlcp.evaluation.protocols import EvalError
        from vlcp.models.loading import ModelError
        from vlcp.pipeline.config import ConfigError
        from vlcp.pipeline.run import DistillError
        from vlcp.store.cache import CorruptEntry
        from vlcp.store.output import OutputError
        from vlcp.store.scalars import ScalarLogError

        if isinstance(exc, ConfigError):  # a parameter out of range: exit code 2, naming the option
            raise click.BadParameter(exc.message, param_hint=exc.param) from None
        if isinstance(exc, (EvalError, OutputError)):  # a folder that does not fit: bad input, exit code 2 (one
            raise usage_error(str(exc)) from None  # line: the message names the folder, a usage banner adds nothing)
        if isinstance(exc, (DatasetError, DistillError, ModelError, CaptionFileError, CorruptEntry, ScalarLogError)):
            raise click.ClickException(str(exc)) from None  # found while running: exit code 1
        if isinstance(exc, OSError) and exc.strerror:  # the disk: full, read-only, a folder gone; exit code 1
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror} (errno {exc.errno})") from None
        return False


def check_data(data: str | None) -> None:
    """``--data``: a known name or an existing folder, checked before any heavy import (exit code 2)."""
    if data is None:
        return
    from vlcp.data.datasets import DatasetError
    from vlcp.data.datasets import check_data as check

    try:
        check(data)
    except DatasetError as exc:
        raise usage_error(str(exc)) from None


def check_model_paths(**models: str | None) -> None:
    """Model options given as a local directory (``./x``, ``/x``, ``~/x``, ``a/b/c``) that does not exist: exit
    code 2 before anything is loaded. Hub ids (``org/name``, ``org/name@rev``) are resolved while running."""
    for option, name in models.items():
        if not name or "@" in name:
            continue
        if (name.startswith((".", "/", "~")) or name.count("/") > 1) and not Path(name).expanduser().exists():
            raise usage_error(f"--{option.replace('_', '-')} {name}: model directory does not exist")


# torch's device types (c10/core/DeviceType.h), and vlcp's auto: anything else is a typo, found without torch
DEVICE_TYPES = ("auto", "cpu", "cuda", "mps", "xpu", "hip", "meta", "hpu", "mtia", "xla", "lazy", "vulkan", "ve",
                "ipu", "maia", "fpga", "mkldnn", "opengl", "opencl", "ideep", "privateuseone")


def check_device(device: str) -> None:
    """``--device``: a device type with an optional index (``cuda:1``); whether it exists is checked when used."""
    kind, _, index = device.partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()) or (kind == "auto" and index):
        raise usage_error(f"--device {device}: not a device (use auto, cpu, cuda, cuda:N or mps)")


def default(name: str):
    """The DistillConfig default of a distill option (what the help shows)."""
    from vlcp.pipeline.config import default

    return default(name)


def choice(name: str) -> click.Choice:
    """The allowed values of a distill option, from config.CHOICES (what validate checks)."""
    from vlcp.pipeline.config import CHOICES

    return click.Choice(CHOICES[name])


def options(*decorators):
    """Several click options as one decorator (shared by commands that take the same options)."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


def table(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
