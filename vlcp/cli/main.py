"""The ``vlcp`` command group: global options, logging, and the commands of the sibling modules.

Heavy libraries (torch, diffusers, transformers) are imported only inside commands that compute
something, so ``--help``, ``--version`` and fully cached runs start fast, and cheap arguments (paths,
dataset names, the device) are checked before any of them. Exit codes follow one rule
(``vlcp.cli.common.EXIT_CODES``): 2 for usage, 1 for a failure while running (``user_errors`` maps the
package's errors), 130 for Ctrl-C (``VlcpGroup``).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from vlcp import __version__
from vlcp.cli.cache import cache, captions, datasets
from vlcp.cli.common import EXIT_CODES, INTERRUPTED, Ctx, check_device
from vlcp.cli.ddranking import ddranking
from vlcp.cli.distill import distill
from vlcp.cli.evaluate import baseline, evaluate
from vlcp.cli.export import export_cmd
from vlcp.cli.publish import publish_cmd
from vlcp.cli.refine import refine_cmd, report_cmd, select_cmd
from vlcp.cli.relabel import relabel_cmd
from vlcp.cli.threads import calm_threads

log = logging.getLogger("vlcp")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    log.setLevel(level)
    if not verbose:  # library chatter ("Loading weights", deprecation notes) is not for our users
        for name in ("diffusers", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)


class VlcpGroup(click.Group):
    """Ctrl-C in any command exits with 130, as a shell reports SIGINT (Click's own abort exits with 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\nAborted!", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None


@click.group(cls=VlcpGroup, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vlcp")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("cache"),
              envvar="VLCP_CACHE_DIR", show_default=True, show_envvar=True, help="Where stage artefacts are cached.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("data"),
              envvar="VLCP_DATA_DIR", show_default=True, show_envvar=True,
              help="Where named datasets are (or get downloaded).")
@click.option("--device", default="auto", envvar="VLCP_DEVICE", show_default=True, show_envvar=True,
              help="auto (cuda, then mps, then cpu), or a torch device such as cuda:1.")
@click.option("-v", "--verbose", count=True, help="More logging (library messages too).")
@click.option("-q", "--quiet", is_flag=True, envvar="VLCP_QUIET", help="Only errors; no progress bars or summary.")
@click.pass_context
def cli(ctx, cache_dir, data_dir, device, verbose, quiet):
    """vlcp: dataset distillation with diffusion models and vision-language category prototypes (VLCP, ICCV 2025).

    Every stage is cached by the hash of its inputs, so changing one parameter recomputes only what it
    affects. Start with `vlcp distill --data digits --ipc 10 --tiny --out out/digits-ipc10` (offline, CPU).
    """
    check_device(device)
    _setup_logging(verbose, quiet)
    ctx.obj = Ctx(cache_dir, data_dir, device, verbose, quiet)


for command in (distill, evaluate, ddranking, baseline, relabel_cmd, refine_cmd, report_cmd, select_cmd, publish_cmd,
                export_cmd, captions, cache, datasets):
    cli.add_command(command)


def main():
    calm_threads()  # before torch is first imported (by a command)
    cli(prog_name="vlcp")
