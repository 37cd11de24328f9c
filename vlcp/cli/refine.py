"""``vlcp refine`` (detector-guided refinement of a distilled folder), ``vlcp report`` (the HTML page) and
``vlcp select`` (post-sampling of any image pool)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from vlcp.cli.common import Ctx, check_data, check_model_paths, user_errors
from vlcp.cli.distill import run_distill
from vlcp.cli.distill_options import SEED, refine_options, say_where_curves_went


@click.command("refine")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, help="The real dataset the folder distils (the detector trains on it).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@refine_options
@click.pass_obj
def refine_cmd(obj: Ctx, folder: Path, data: str, out: Path, **opts):
    """Detector-guided refinement of a distilled ImageFolder.

    On a vlcp distill output (its manifest.json has the run's parameters) this reruns that distillation with
    --refine, so candidates come from the cached prototypes. On any other folder (D4M, Minimax..., or a vlcp
    baseline or select output, which has no prototypes) only detection is possible: every image is judged and
    OUT/report.json lists the defective ones.
    """
    check_data(data)
    from vlcp.pipeline.config import DistillConfig
    from vlcp.store import scalars

    params = _manifest_params(folder)
    if params is not None and params.get("data") != data:
        raise click.BadParameter(f"{folder} was distilled from {params.get('data')}, not {data}", param_hint="--data")
    common = dict(refine=True, out=out, data_dir=obj.data_dir, device=obj.device, progress=not obj.quiet, **opts)
    if params is not None:
        if not obj.quiet:
            click.echo(f"{folder} is a vlcp distillation: rerunning it with --refine (cached stages are reused)")
        run_distill(obj, DistillConfig.from_params(params, until=None, **common), command="refine")
        return
    if not obj.quiet:
        click.echo(f"{folder} is not a vlcp distill output: detection only, no candidates can be generated; "
                   f"writing {out}/report.json")
    from vlcp.pipeline import refine_folder

    cfg = DistillConfig(data=data, ipc=1, **common)
    with user_errors():
        cfg.validate()
        from vlcp.store.output import DETECTION_MARKS, OUTPUT_MARKS, check_out

        check_out(out, cfg.force, marks=DETECTION_MARKS + OUTPUT_MARKS)
        with scalars.logging_to(cfg.log_dir, scalars.run_name("refine", out)) as curves:
            report = refine_folder.detect_only(folder, cfg, obj.cache())
    say_where_curves_went(curves, obj.quiet)
    if not obj.quiet:
        for name, st in report["per_class"].items():
            click.echo(f"{name:<20} {st['defective']:>4} of {st['images']:>4} defective, "
                       f"mean confidence {st['confidence']:.3f}")


def _manifest_params(folder: Path) -> dict | None:
    """The parameters of a vlcp distillation folder; None for a foreign folder (no manifest.json)."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return None
    try:
        m = json.loads(manifest.read_text())
        params = m.get("parameters")
    except (OSError, ValueError, AttributeError) as exc:
        raise click.UsageError(f"{manifest} is unreadable ({exc.__class__.__name__}: {exc}); restore it, or move "
                               f"it away to treat {folder} as a foreign folder (detection only)") from None
    if "baseline" in m or m.get("command") == "select":  # vlcp's, but no distillation to rerun: detection only
        return None
    if not isinstance(params, dict) or "data" not in params or "ipc" not in params:
        raise click.UsageError(f"{manifest} has no distillation parameters; move it away to treat {folder} as a "
                               f"foreign folder (detection only)")
    return params


@click.command("report")
@click.argument("out", type=click.Path(path_type=Path))
@click.pass_obj
def report_cmd(obj: Ctx, out: Path):
    """Rebuild OUT/report.html (and the dataset card OUT/README.md) from the files in OUT (manifest,
    prototypes, images, loss, evaluations).

    One page, no network, no script: open it from disk, or zip the folder and move it. A card you edited
    by hand (its first line removed) is left alone.
    """
    from vlcp.report.card import refresh
    from vlcp.report.html import ReportError, build

    try:
        path = build(out)
    except ReportError as exc:  # not a vlcp folder: bad input, exit code 2, one line
        err = click.ClickException(str(exc))
        err.exit_code = 2
        raise err from None
    card = refresh(out)
    if not obj.quiet:
        click.echo(f"wrote {path}" + (f" and {card}" if card else ""))


@click.command("select")
@click.argument("pool", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, help="The dataset the pool is for (its classes and names).")
@click.option("--ipc", type=click.IntRange(min=1), required=True, help="Images kept per class.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: the kept images in OUT/train (an ImageFolder, with metadata.jsonl).")
@click.option("--clip", "clip_model", help="CLIP model (hub id or dir). [default: openai/clip-vit-base-patch32; "
                                           "a tiny random one with --tiny]")
@click.option("--tiny", is_flag=True, help="A tiny random CLIP built offline: for tests and demos, scores are noise.")
@click.option("--clip-prompt", default="a photo of a {name}.", show_default=True,
              help="Class text anchor; {name} is the class name.")
@click.option("--anchor", type=click.Choice(["prompt", "centroid"]), default="prompt", show_default=True,
              help="Relevance/margin anchor per class: its --clip-prompt, or the CLIP centroid of its real "
                   "training images (embedded once, cached).")
@click.option("--max-per-class", type=click.IntRange(min=1), help="--anchor centroid: the first N real images "
                                                                  "per class. [default: all]")
@click.option("--sas-keep", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Stage 1: share of each class's pool kept by quality (at least IPC).")
@click.option("--sas-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Stage 1 quality: alpha z(relevance) + (1 - alpha) z(margin).")
@click.option("--sas-lambda", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Stage 2: lambda z(quality) + (1 - lambda) diversity.")
@click.option("--select", "mode", type=click.Choice(["random", "relevance", "sas"]), default="sas", show_default=True,
              help="random: seeded random-from-pool control; relevance: top IPC by CLIP relevance; sas: both stages.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of --select random.")
@click.option("--clip-batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--allow-duplicates", is_flag=True, help="A class with fewer pool images than IPC reuses them.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.pass_obj
def select_cmd(obj: Ctx, pool: Path, data, ipc, out, clip_model, tiny, clip_prompt, anchor, max_per_class, sas_keep,
               sas_alpha, sas_lambda, mode, seed, clip_batch_size, allow_duplicates, force):
    """Keep IPC images per class from an image pool POOL (an ImageFolder, e.g. made by Minimax or D4M),
    scored in CLIP space: vlcp's formulation of SAS (Li et al., arXiv 2605.18012) from its abstract, not the
    authors' method (docs/method.md, "Semantic-aware post-sampling").

    Stage 1 drops candidates CLIP places nearer another class and keeps the top --sas-keep share by
    relevance and margin; stage 2 picks IPC greedily by quality vs diversity. CLIP embeddings are
    cached: changing only the selection knobs computes none. The --sas-* defaults are vlcp's
    proposals; none comes from the paper.
    """
    check_data(data)
    check_model_paths(clip=clip_model)
    from vlcp.baselines import select as ps
    from vlcp.method.sas import SasError, SasParams

    params = SasParams(ipc, keep=sas_keep, alpha=sas_alpha, lam=sas_lambda, mode=mode, seed=seed)
    cfg = ps.SelectConfig(pool, data, ipc, out, data_dir=obj.data_dir, clip_model=clip_model, tiny=tiny,
                          prompt=clip_prompt, anchor=anchor, max_per_class=max_per_class,
                          params=params, allow_duplicates=allow_duplicates, force=force, device=obj.device,
                          batch_size=clip_batch_size, progress=not obj.quiet)
    if tiny and not clip_model and not obj.quiet:
        click.echo("--tiny: a tiny random CLIP (built offline, cached); its scores are noise, for tests and demos only.",
                   err=True)
    with user_errors():
        try:
            manifest = ps.run(cfg, obj.cache())
        except (ps.SelectError, SasError) as exc:
            raise click.ClickException(str(exc)) from None
    if obj.quiet:
        return
    for w in manifest["warnings"]:
        click.echo(f"warning: {w}", err=True)
    for stage, r in manifest["stages"].items():
        click.echo(f"{stage}: {r['items_computed']} computed, {r['items_cached']} cached"
                   f"{', model loaded' if r['model_loaded'] else ''}")
    n_pool = sum(c["usable"] for c in manifest["classes"].values())
    click.echo(f"--select {mode}: kept {ipc} per class of {n_pool} pool images in {len(manifest['classes'])} "
               f"classes (vlcp's formulation of SAS from its abstract)")
    click.echo(f"wrote {out}/ (train/<class id>/, train/metadata.jsonl, manifest.json, preview.png, preview_pool.png)")
