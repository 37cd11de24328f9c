"""``vlcp publish OUT REPO_ID``: a distilled set to a Hugging Face dataset repository, with its card.

The card (``OUT/README.md``, ``vlcp.report.card``) is rewritten first, naming REPO_ID in its loading example;
then huggingface_hub creates the repository (``exist_ok``) and uploads OUT in one commit, leaving out the
per-process reports (``ranks/``) and anything hidden. ``hf upload REPO_ID OUT . --repo-type dataset`` does
the same upload by hand (without the card refresh or the exclusions).
"""
from __future__ import annotations

from pathlib import Path

import click

from vlcp.cli.common import Ctx, usage_error

# What stays out of the upload (huggingface_hub's fnmatch patterns, where "*" also crosses "/"): the per-rank
# stage reports of a multi-process run, hidden files and folders at any depth (temporary files, .cache).
IGNORE_PATTERNS = ["ranks/*", ".*", "*/.*"]


@click.command("publish")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--revision", help="Branch to commit to, created if missing [default: main].")
@click.option("--token", envvar="HF_TOKEN", show_envvar=True,
              help="Hugging Face token with write access [default: the one `hf auth login` stored].")
@click.pass_obj
def publish_cmd(obj: Ctx, out: Path, repo_id: str, private: bool, revision: str | None, token: str | None):
    """Upload the distilled set OUT to the Hugging Face dataset repository REPO_ID (user/name), with its
    dataset card OUT/README.md (rewritten first unless you edited it and removed its vlcp marker line)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise usage_error(f"REPO_ID {repo_id!r} is not a Hugging Face repository id (user/name): {exc}") from None
    from vlcp.report.card import CardError, build, read_manifest

    try:
        read_manifest(out)
        card = build(out, repo_id)
    except CardError as exc:
        raise usage_error(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"could not write {out / 'README.md'}: {exc}") from None
    if not obj.quiet:
        click.echo(f"card: {card}" if card else f"card: {out / 'README.md'} (edited by hand: left as it is)")
    url = upload(out, repo_id, private=private, revision=revision, token=token)
    if not obj.quiet:
        click.echo(f"uploaded {len(upload_files(out))} files to {url}")


def upload_files(out: Path) -> list[str]:
    """The files of OUT the upload sends (relative, '/'-separated), selected as ``upload_folder`` selects them."""
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS))


def upload(out: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
           token: str | None = None) -> str:
    """Create the dataset repository (if missing) and upload OUT in one commit; returns the repository URL.
    Any failure on the way (offline mode, the network, authentication, permissions) is one line, exit code 1."""
    from huggingface_hub import HfApi

    from vlcp import __version__

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=out, repo_type="dataset", revision=revision,
                          ignore_patterns=IGNORE_PATTERNS, commit_message=f"vlcp {__version__}: upload {out.name}")
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's, httpx's and OS errors alike: one line, no traceback
        raise click.ClickException(f"upload to {repo_id} failed: {exc.__class__.__name__}: {exc}") from None
    return str(url)
