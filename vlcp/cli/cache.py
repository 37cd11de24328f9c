"""``vlcp cache`` (inspect, clear, merge the stage cache), ``vlcp captions export`` and ``vlcp datasets``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from vlcp.cli.common import (
    Ctx,
    StageChoice,
    check_data,
    check_model_paths,
    default,
    human,
    usage_error,
    user_errors,
)
from vlcp.cli.distill_options import CAPTION_MAX_TOKENS, CAPTION_MODE, CAPTION_SEED


@click.group()
def captions():
    """Share captions: export the cached ones in the reference .jsonl format."""


@captions.command("export")
@click.option("--data", required=True, help="Dataset name or ImageFolder path.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .jsonl to write (also Hugging Face imagefolder metadata: file_name, text).")
@click.option("--tiny", is_flag=True, help="The captions of the tiny captioner.")
@click.option("--captioner", help="[default: llava-hf/llava-1.5-7b-hf]")
@click.option("--caption-prompt", default=default("caption_prompt"), help="[default: the paper's prompt]")
@click.option(*CAPTION_MODE[0], **{**CAPTION_MODE[1], "help": "The --caption-mode the captions were made with."})
@click.option(*CAPTION_SEED[0], **{**CAPTION_SEED[1], "help": "--caption-mode reference: the --caption-seed the "
                                                               "captions were made with."})
@click.option(*CAPTION_MAX_TOKENS[0], **CAPTION_MAX_TOKENS[1])
@click.option("--captions-from", type=click.Path(exists=True, dir_okay=False),
              help="The captions a distillation imported with this file (they are cached under its hash).")
@click.option("--classes", help="Comma-separated subset of classes.")
@click.option("--max-per-class", type=click.IntRange(min=1))
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.pass_obj
def captions_export(obj: Ctx, data, out, tiny, captioner, caption_prompt, caption_mode, caption_seed,
                    caption_max_tokens, captions_from, classes, max_per_class, force):
    """Write the cached captions of a dataset, one {"file_name", "text"} object per line (nothing is computed:
    run `vlcp distill ... --until captions` first)."""
    check_data(data)
    check_model_paths(captioner=captioner)
    from vlcp.data.caption_files import write_jsonl
    from vlcp.pipeline.config import DistillConfig
    from vlcp.pipeline.loop import cached_captions

    if out.exists() and not force:
        raise click.UsageError(f"{out} exists; pass --force to replace it")
    cfg = DistillConfig(data=data, ipc=1, out=out.parent / ".unused", data_dir=obj.data_dir, device=obj.device,
                        tiny=tiny, captioner=captioner, caption_prompt=caption_prompt, caption_mode=caption_mode,
                        caption_seed=caption_seed, caption_max_tokens=caption_max_tokens, max_per_class=max_per_class,
                        progress=False, captions_from=captions_from, missing_captions="caption",
                        classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None)
    with user_errors():
        rows = cached_captions(cfg, obj.cache())
    have = [{"file_name": f, "text": t} for f, t in rows if t is not None]
    if not have:
        raise click.ClickException(f"no cached captions for {data} with these settings; run `vlcp distill --data "
                                   f"{data} ... --until captions` first")
    write_jsonl(out, have)
    if not obj.quiet:
        missing = len(rows) - len(have)
        click.echo(f"wrote {out}: {len(have)} captions" + (f" ({missing} images not captioned yet)" if missing else ""))


@click.group()
def cache():
    """Inspect or clear the stage cache."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def cache_info(obj: Ctx, as_json):
    """Entries and bytes per stage."""
    stats = obj.cache().stats() if Path(obj.cache_dir).is_dir() else {}  # a look creates no folder
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"cache: {obj.cache_dir.resolve()}")
    if not stats:
        click.echo("(empty)")
    for stage, s in sorted(stats.items()):
        click.echo(f"{stage:<16} {s['entries']:>8} entries {human(s['bytes']):>10}")


@cache.command("clear")
@click.option("--stage", type=StageChoice(("detector_checkpoint", "finetune_checkpoint", "teacher", "baseline_features",
                                           "matching", "matching_checkpoint", "matching_real", "matching_masks",
                                           "models")),
              help="Only this stage (default: everything). A stage whose items are shared with other stages "
                   "(e.g. candidate_scores: detector_scores) clears the shared items, and says so.")
@click.option("--yes", "-y", is_flag=True, help="Clear the whole cache without asking (no --stage).")
@click.pass_obj
def cache_clear(obj: Ctx, stage, yes):
    """Remove cached artefacts (all, or one stage's). Clearing everything asks first (it may hold hours of
    captions and fine-tuning); without a terminal to ask, it needs --yes."""
    from vlcp.pipeline.table import STAGE_NAMES, STAGES

    if stage is None and not yes:
        import sys

        if not sys.stdin.isatty():
            raise usage_error(f"clearing the whole cache {obj.cache_dir} needs --yes (or --stage STAGE for one stage)")
        click.confirm(f"Remove every cached artefact in {obj.cache_dir}?", abort=True)

    stored = STAGES[STAGE_NAMES.index(stage)].stored_as if stage in STAGE_NAMES else ()
    cache = obj.cache()
    for name in stored or (stage,):
        n = cache.clear(name)
        shared = f" (where {stage} keeps its items, shared with other stages)" if stored else ""
        click.echo(f"removed {n} entr{'y' if n == 1 else 'ies'}" + (f" of stage {name}{shared}" if name else ""))


@cache.command("merge")
@click.argument("src", type=click.Path(path_type=Path))
@click.pass_obj
def cache_merge(obj: Ctx, src):
    """Copy every artefact of the cache directory SRC that this cache lacks (docs/cache.md, "Many processes, one cache")."""
    from vlcp.store.merge import CacheMergeError, merge

    try:
        rep = merge(obj.cache(), src)
    except CacheMergeError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"merged {rep.copied} entr{'y' if rep.copied == 1 else 'ies'} ({human(rep.bytes)}) from {src}; "
               f"{rep.present} already here" + (f"; {rep.corrupt} corrupt, skipped" if rep.corrupt else ""))


@click.command()
@click.pass_obj
def datasets(obj: Ctx):
    """Known dataset names, where they are (or would be) stored, and whether they are present."""
    from vlcp.data.datasets import KNOWN, is_present, location

    for name, spec in KNOWN.items():
        loc = location(spec, obj.data_dir)
        where = "embedded in scikit-learn" if loc is None else str(loc)
        status = "present" if is_present(spec, obj.data_dir) else ("missing: " + (spec.url or "see description"))
        click.echo(f"{name:<14} {status}\n{'':<14} {where}\n{'':<14} {spec.description}")
