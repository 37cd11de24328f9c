"""``vlcp distill``: build a DistillConfig from the options (and --config), run the stages, print a summary."""
from __future__ import annotations

from pathlib import Path

import click

from vlcp.cli.common import Ctx, check_data, check_model_paths, table, user_errors
from vlcp.cli.distill_options import distill_options, say_where_curves_went


@click.command()
@distill_options
@click.pass_obj
def distill(obj: Ctx, **kw):
    """Distill a dataset into IPC synthetic images per class with the VLCP method.

    Runs the stages of `vlcp.pipeline.table.STAGES` in order (docs/stages.md): images, captions,
    latents, outliers, clusters, text_prototypes, prompts, finetune, synthesis, the refinement stages
    with --refine, output. Defaults of --contamination/--beta/--top-k/--image-size depend on the
    dataset (docs/stages.md, "Per-dataset defaults").

    Options can also come from a file: `--config run.yaml` (or .toml; keys are option names), a shipped
    config such as `--config imagenette-ipc10` (see --list-configs), or `--config OUT/manifest.json` to
    rerun the distillation that made OUT (into OUT unless --out is given; --force is never taken from it).
    Options given on the command line win over the file.
    """
    dry_run = kw.pop("dry_run")
    check_data(kw["data"])  # cheap checks first: a typo costs no torch import
    check_model_paths(**{k: kw[k] for k in ("captioner", "diffusion", "text_llm", "clip", "segmenter")})
    from vlcp.pipeline.config import DistillConfig

    raw = kw.pop("classes")
    classes = [c.strip() for c in raw.split(",") if c.strip()] if raw else None
    cfg = DistillConfig(data_dir=obj.data_dir, device=obj.device, classes=classes, progress=not obj.quiet, **kw)
    run_distill(obj, cfg, dry_run)


def run_distill(obj: Ctx, cfg, dry_run: bool = False, command: str = "distill") -> None:
    """Validate, check --out, run (or plan) the stages, print the summary: shared by distill and refine.
    ``cfg.log_dir``: TensorBoard curves of what this run trains, in ``log_dir/<command>-<OUT name>-<time>``."""
    from vlcp.store.output import OutputError, check_out
    from vlcp.store.parallel import world

    out_problem = None
    with user_errors():
        cfg.validate()
        try:
            check_out(Path(cfg.out), cfg.force)
        except OutputError as exc:
            if not dry_run:
                raise
            out_problem = str(exc)  # a plan is still worth printing; the real run would stop at once
    if cfg.tiny and not obj.quiet:
        click.echo("--tiny: tiny random models (built offline, cached); captions and images are noise, "
                   "for tests and demos only.", err=True)
    if dry_run and not obj.quiet and world().main:
        _needs(cfg)  # first: a plan can stop at a model that is not downloaded yet
    missing = _not_downloaded(cfg)
    if dry_run and missing:  # the plan lists the images, and a dry run downloads nothing
        if not obj.quiet:
            click.echo(f"plan: not made, {missing}")
        return
    from vlcp.pipeline.loop import distill as run
    from vlcp.store import scalars

    curves_to = None if dry_run else cfg.log_dir  # a plan trains nothing
    with user_errors(), scalars.logging_to(curves_to, scalars.run_name(command, cfg.out)) as curves:
        manifest = run(cfg, obj.cache(), dry_run=dry_run)
    if not obj.quiet and world().main:  # in a multi-process launch rank 0 speaks for all (OUT/ranks/ has each)
        _summary(manifest, dry_run)
        if dry_run:
            if out_problem:
                click.echo(f"the real run would stop before any work: {out_problem}", err=True)
            return
        made = "train/<class>/*.png, train/metadata.jsonl, README.md, " if "output" in manifest["stages"] else ""
        click.echo(f"wrote {cfg.out}/ ({made}manifest.json{', preview.png' if made else ''})")
        report = Path(cfg.out) / "report.html"
        if report.is_file():
            click.echo(f"report: {report}")
    say_where_curves_went(curves, obj.quiet)


def _not_downloaded(cfg) -> str | None:
    """Why the images cannot be listed without a download (None: they can)."""
    from vlcp.data.datasets import KNOWN, is_present, location

    spec = KNOWN.get(cfg.data)
    if spec is None or is_present(spec, Path(cfg.data_dir)):
        return None
    how = "a run downloads it first" if spec.url else "see vlcp datasets"
    return f"{cfg.data} is not in {location(spec, Path(cfg.data_dir))} yet ({how})"


def _needs(cfg) -> None:
    """Downloads, GPU memory and time of the real run (vlcp.cli.needs), for the stages it runs."""
    from vlcp.cli.needs import count_images, needs
    from vlcp.pipeline.table import STAGE_NAMES

    stages = STAGE_NAMES[:STAGE_NAMES.index(cfg.until) + 1] if cfg.until else STAGE_NAMES
    for line in needs(cfg, *count_images(cfg), stages):
        click.echo(line)


def _summary(manifest: dict, dry_run: bool) -> None:
    rows = [("stage", "status", "computed", "cached", "model", "seconds")]
    for name, r in manifest["stages"].items():
        status = ("hit" if r["cached"] else "would compute" if dry_run else "computed")
        rows.append((name, status, str(r["items_computed"]), str(r["items_cached"]),
                     "loaded" if r["model_loaded"] else "-", f"{r['seconds']:.2f}"))
    table(rows)
    if dry_run and manifest.get("plan_unknown_after"):
        click.echo(f"later stages: not planned, they depend on what {manifest['plan_unknown_after']} computes")
    for w in manifest.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    if not dry_run:
        click.echo(f"total {manifest['seconds']:.2f}s")
