"""``vlcp distill``: the VLCP method (Algorithm 1) as a loop over the stage table in ``vlcp/pipeline/table.py``.

``distill()`` starts a ``Run`` (config, cache, dataset, model references, reports, manifest, typed
state), runs every enabled stage in order, stops after ``--until`` and writes the output folder.
Each stage declares its key parameters in the table; ``Step`` builds its keys from that declaration
and is the only way a stage reads the configuration, so an input that is read is always keyed.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from vlcp import __version__
from vlcp.data.datasets import load_dataset
from vlcp.pipeline.config import DistillConfig
from vlcp.pipeline.run import DistillError, Refs, Run, Step
from vlcp.pipeline.stages.finetune import finetuned_pipe
from vlcp.pipeline.table import STAGE_NAMES, STAGES
from vlcp.store.cache import StageCache, stable_hash
from vlcp.store.runner import Lazy, PlanStop

log = logging.getLogger("vlcp")

MAX_RESTARTS = 100  # corrupt entries found one by one (each read restarts the run) before vlcp says to clear


def distill(cfg: DistillConfig, cache: StageCache, dry_run: bool = False) -> dict:
    """Run (or plan) the enabled stages up to ``cfg.until``; return the manifest (written to OUT unless dry)."""
    from vlcp.store import arrays, parallel
    from vlcp.store.cache import CorruptEntry

    t_start = time.perf_counter()
    alone = not parallel.world().parallel
    seen: set[tuple[str, str]] = set()
    try:
        while True:  # a blob found corrupt when first read is dropped; the rerun recomputes it, then finds the next
            run = start(cfg, cache, dry_run)
            try:
                _run_stages(run)
                run.manifest["stages"] = {r.name: r.manifest() for r in run.reports}
                run.manifest["seconds"] = round(time.perf_counter() - t_start, 3)
                run.manifest["cache_corrupt_entries_recomputed"] = cache.corrupt
                if alone and not dry_run:
                    publish(run)  # the first read of the synthetic images: a corrupt one is recomputed too
                break
            except CorruptEntry as exc:
                if (exc.stage, exc.key) in seen or not exc.stage:
                    raise DistillError(f"cache entry {exc.stage}/{exc.key[:12]} is corrupt again right after it was "
                                       f"recomputed ({exc.reason}): the disk or another process writing this cache "
                                       f"is at fault, not the entry") from None
                if len(seen) == MAX_RESTARTS:  # each restart re-reads the index: a damaged cache is cleared faster
                    raise DistillError(f"{MAX_RESTARTS} corrupt cache entries found and recomputed, and more "
                                       f"remain ({exc}): the cache is damaged; `vlcp cache clear --stage "
                                       f"{exc.stage}` (or the whole cache) recomputes them in one run") from None
                seen.add((exc.stage, exc.key))  # (the cache logged it when it dropped the entry)
        if not alone and not dry_run:
            publish(run)  # after the other processes have ended: a corrupt image here needs a rerun
    finally:
        arrays.forget()
    return run.manifest


def _run_stages(run: Run) -> None:
    """The loop: every enabled stage up to --until, models released after their last stage."""
    enabled = [s for s in STAGES if s.enabled_by is None or getattr(run.cfg, s.enabled_by)]
    last = STAGE_NAMES.index(run.cfg.until or "output")
    todo = [s for s in enabled if STAGE_NAMES.index(s.name) <= last]
    run.todo = [s.name for s in todo]
    try:
        for i, stage in enumerate(todo):
            stage.run(run, Step(run, stage))
            run.release_unused(stage, todo[i + 1:])
    except PlanStop as stop:
        if stop.report is not None:
            run.reports.append(stop.report)
        run.manifest["plan_unknown_after"] = run.reports[-1].name if run.reports else None
    finally:
        for m in run.models.values():
            m.release()


def start(cfg: DistillConfig, cache: StageCache, dry_run: bool = False) -> Run:
    """Validate, apply the dataset defaults, load the dataset's index and resolve the models."""
    from vlcp.models import loading as models
    from vlcp.models.clip import load_clip
    from vlcp.models.segment import load_segmenter

    cfg.validate()
    cfg.warnings.clear()
    defaults_row = cfg.fill_defaults()
    ds = load_dataset(cfg.data, cfg.data_dir, "train", cfg.classes, cfg.max_per_class,
                      digest=lambda p: memo_digest(cache, p))
    if cfg.tiny:
        from vlcp.models.tiny import tiny_models

        sd_dir, llava_dir, llm_dir = tiny_models(cache.root / "models")
        cfg.captioner, cfg.diffusion = str(llava_dir), str(sd_dir)
        if cfg.text_strategy == "llm":
            cfg.text_llm = cfg.text_llm or str(llm_dir)
    cfg.captioner = cfg.captioner or models.DEFAULT_CAPTIONER
    cfg.diffusion = cfg.diffusion or models.DEFAULT_DIFFUSION
    if cfg.text_strategy == "llm" and not cfg.text_llm:
        raise DistillError("--text-strategy llm needs --text-llm MODEL (a causal language model: hub id or dir)")
    refs = Refs(models.resolve(cfg.captioner, cache),
                models.resolve(cfg.diffusion, cache, probe_file="model_index.json"),
                models.resolve(cfg.text_llm, cache) if cfg.text_strategy == "llm" else None)
    if cfg.sas or cfg.min_caption_match:
        from vlcp.models.clip import resolve_clip

        refs.clip = resolve_clip(cfg.clip, cfg.tiny, cache)
    if cfg.object_masks or cfg.min_foreground:
        from vlcp.models.segment import resolve_segmenter

        refs.segmenter = resolve_segmenter(cfg.segmenter, cfg.tiny, cache)
    resolution = cfg.resolution or models.native_resolution(refs.diffusion)
    manifest = {
        "vlcp_version": __version__, "tiny": cfg.tiny, "parameters": cfg.params(),
        "defaults_source": defaults_row["source"], "dataset": ds.identity(),
        "classes": [{"folder": c.folder, "name": c.name} for c in ds.classes],
        "models": {"captioner": refs.captioner.manifest(), "diffusion": refs.diffusion.manifest(),
                   **({"text_llm": refs.text_llm.manifest()} if refs.text_llm else {}),
                   **({"clip": refs.clip.manifest()} if refs.clip else {}),
                   **({"segmenter": refs.segmenter.manifest()} if refs.segmenter else {})},
        "resolution": resolution,
        "stages": {}, "warnings": cfg.warnings,
    }
    run = Run(cfg, cache, ds, refs, resolution, dry_run, manifest)
    run.models = {
        "captioner": Lazy(lambda: models.load_captioner(refs.captioner, cfg.device)),
        "vae": Lazy(lambda: models.load_vae(refs.diffusion, cfg.device)),
        "llm": Lazy(lambda: models.load_text_llm(refs.text_llm, cfg.device)),
        "pipe": Lazy(lambda: models.load_img2img(refs.diffusion, cfg.device)),
        "synth": Lazy(lambda: finetuned_pipe(run)),
        "clip": Lazy(lambda: load_clip(refs.clip, cfg.device)),
        "segmenter": Lazy(lambda: load_segmenter(refs.segmenter, cfg.device)),
    }
    return run


def memo_digest(cache: StageCache, path: str) -> str:
    """File content hash, memoised on (path, size, mtime) so reruns do not reread every image."""
    import os

    from vlcp.store.cache import file_digest

    st = os.stat(path)
    return cache.memo("file-digest", stable_hash([os.path.abspath(path), st.st_size, st.st_mtime_ns]),
                      lambda: file_digest(path))


def publish(run: Run) -> None:
    """OUT, written to a temporary folder and renamed into place: images, sheets, JSON files, manifest,
    report.html. In a multi-process launch only rank 0 writes OUT, once every process is done, with each
    process's stage reports in OUT/ranks/<rank>.json (vlcp/store/parallel.py)."""
    from vlcp.store import output, parallel

    w = parallel.world()
    if w.parallel:
        reports = parallel.gather_reports(run.cache, w, run.manifest["stages"])
        if reports is None:
            return
        run.manifest["parallel"] = {"world_size": w.size}
        run.files.update({f"ranks/{r}.json": rep for r, rep in reports.items()})

    def write(tmp: Path):
        for writer in run.writers:
            writer(tmp)
        for name, obj in run.files.items():
            output.write_json(tmp / name, obj)
        output.write_json(tmp / "manifest.json", run.manifest)
        from vlcp.report.html import build as build_report

        build_report(tmp)  # OUT/report.html: relative links, so it survives the rename and a zip
        if any(r.name == "output" for r in run.reports):  # a set was written (not --until an earlier stage)
            from vlcp.report.card import build as build_card

            build_card(tmp)  # OUT/README.md: the Hugging Face dataset card (vlcp publish uploads OUT with it)

    output.publish(Path(run.cfg.out), write)


def cached_captions(cfg: DistillConfig, cache: StageCache) -> list[tuple[str, str | None]]:
    """(``<class folder>/<file>``, caption or None when not cached) per usable image, computing nothing:
    what ``vlcp captions export`` writes."""
    run = start(cfg, cache, dry_run=True)
    for stage in STAGES[:2]:  # images, captions: a dry run reads the cache and never loads a model
        stage.run(run, Step(run, stage))
    return [(f"{run.ds.classes[s.class_idx].folder}/{Path(s.source).name}", c)
            for s, c in zip(run.st.samples, run.st.captions)]
