"""``vlcp publish OUT REPO_ID``: a distilled set to a Hugging Face dataset repository, with its card.

The card (``OUT/README.md``, ``vlcp.report.card``) is rewritten first, naming REPO_ID in its loading example;
then huggingface_hub creates the repository (``exist_ok``) and commits OUT in one commit, leaving out the
per-process reports (``ranks/``) and anything hidden. The JSON files go as public copies: every string value
that is an absolute local path (``/…``, ``~…``, ``C:\\…``; the card's ``public`` decides) is sent as the card
shows it, ``…/<last part>``; the files on disk keep their full paths. ``hf upload REPO_ID OUT . --repo-type
dataset`` does the upload by hand (without the card refresh, the exclusions or the hidden paths).
"""
from __future__ import annotations

import json
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
    """Upload the set OUT that vlcp distill wrote to the Hugging Face dataset repository REPO_ID (user/name), with its
    dataset card OUT/README.md (rebuilt for REPO_ID unless you edited it and removed its vlcp marker line; the
    new card is written into OUT once the upload succeeded). The JSON files go with their absolute local paths
    shown as .../name, as the card shows them; nothing else in OUT changes."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise usage_error(f"REPO_ID {repo_id!r} is not a Hugging Face repository id (user/name): {exc}") from None
    from vlcp.report.card import CARD, CardError, is_vlcp_card, read_manifest, render

    try:
        read_manifest(out)
        card = render(out, repo_id) if is_vlcp_card(out / CARD) else None
    except CardError as exc:
        raise usage_error(str(exc)) from None
    url, ops = upload(out, repo_id, private=private, revision=revision, token=token, card=card)
    if card is not None:  # after the upload: a failed one leaves OUT's card as it was
        from vlcp.store.cache import atomic_write_text

        try:
            atomic_write_text(out / CARD, card)
        except OSError as exc:
            raise click.ClickException(f"uploaded to {url}, but could not write {out / CARD}: {exc}") from None
    if not obj.quiet:
        click.echo(f"card: {out / CARD}" if card is not None else f"card: {out / CARD} (edited by hand: left as it "
                                                                    f"is)")
        hidden = sum(isinstance(op.path_or_fileobj, bytes) and op.path_in_repo.endswith(".json") for op in ops)
        click.echo(f"uploaded {len(ops)} files to {url} (local paths hidden in {hidden} JSON files)")


def upload_files(out: Path) -> list[str]:
    """The files of OUT the upload sends (relative, '/'-separated), selected as ``upload_folder`` selects them."""
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS))


def public_json(path: Path) -> bytes | None:
    """The public copy of the JSON file ``path`` (its values with local paths hidden, written as
    ``vlcp.store.output.write_json`` writes, so a vlcp file changes only where a path was), or None when it
    names no local path (then the file goes as it is). A file that is not JSON cannot be checked: ValueError."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc.__class__.__name__}: {exc}): cannot check it for "
                         f"local paths; fix or remove it before publishing") from None
    from vlcp.report.card import public_values
    from vlcp.store.output import json_text

    hidden = public_values(value)
    return None if hidden == value else json_text(hidden).encode()


def commit_operations(out: Path, card: str | None = None) -> list:
    """What the upload commits (huggingface_hub ``CommitOperationAdd``s, in ``upload_files`` order): a JSON file
    (``*.json``) that names a local path as its public copy (bytes), every other file from its path on disk.
    Nothing on disk changes: ``vlcp`` still reads the manifest's full paths (e.g. ``data_dir``)."""
    from huggingface_hub import CommitOperationAdd

    ops = []
    files = upload_files(out)
    if card is not None and "README.md" not in files:
        files = sorted([*files, "README.md"])
    for rel in files:
        path = Path(out) / rel
        copy = public_json(path) if rel.lower().endswith(".json") else None
        if rel == "README.md" and card is not None:  # the card built for this upload, not yet on disk
            copy = card.encode("utf-8")
        ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=path if copy is None else copy))
    return ops


def upload(out: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
           token: str | None = None, card: str | None = None) -> tuple[str, list]:
    """Create the dataset repository (if missing) and commit ``commit_operations(out)`` in one commit; returns
    the repository URL and the operations. Any failure on the way (a JSON file that is not JSON, offline mode,
    the network, authentication, permissions) is one line, exit code 1."""
    from huggingface_hub import HfApi

    from vlcp import __version__

    try:
        ops = commit_operations(out, card)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        api.create_commit(repo_id, ops, repo_type="dataset", revision=revision,
                          commit_message=f"vlcp {__version__}: upload {out.name}")
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's, httpx's and OS errors alike: one line, no traceback
        raise click.ClickException(f"upload to {repo_id} failed: {exc.__class__.__name__}: {exc}") from None
    return str(url), ops
