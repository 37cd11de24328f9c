"""``vlcp distill``: the VLCP method (Algorithm 1) as a loop over the stage table in ``vlcp/stages.py``.

``distill()`` starts a ``Run`` (config, cache, dataset, model references, reports, manifest, typed
state), runs every enabled stage in order, stops after ``--until`` and writes the output folder.
Each stage declares its key parameters in the table; ``Step`` builds its keys from that declaration
and is the only way a stage reads the configuration, so an input that is read is always keyed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vlcp import __version__
from vlcp.arrays import Arrays
from vlcp.cache import StageCache, stable_hash, stage_key
from vlcp.config import DistillConfig
from vlcp.datasets import Dataset, Sample, load_dataset
from vlcp.runner import ItemOpts, Lazy, PlanStop, StageReport, run_items, run_stage
from vlcp.stages import STAGE_NAMES, STAGES, Stage, finetuned_pipe

log = logging.getLogger("vlcp")

KEY_LAYOUT = 2  # 2: keys built from the stage table (vlcp 0.2); caches of 0.1 are recomputed


class DistillError(Exception):
    """A runtime problem with a clear cause (too few images, empty caption...): exit code 1."""


@dataclass
class Refs:
    """Resolved model references (identities are part of the keys)."""
    captioner: Any
    diffusion: Any
    text_llm: Any = None
    clip: Any = None
    segmenter: Any = None


@dataclass
class State:
    """What the stages hand to each other: values, and the keys that identify them."""
    samples: list[Sample] = field(default_factory=list)
    by_class: list[list[int]] = field(default_factory=list)
    cap_keys: list[str] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    lat_keys: list[str] = field(default_factory=list)
    lat_entries: list = field(default_factory=list)
    out_key: str = ""
    inliers: list[list[int]] = field(default_factory=list)
    cl_key: str = ""
    clusters: dict = field(default_factory=dict)  # class folder -> Entry: meta = members, tensors = centres
    tp_key: str = ""
    text: dict = field(default_factory=dict)  # class folder -> records of Algorithm 2
    pr_key: str = ""
    prompts: dict = field(default_factory=dict)  # class folder -> prompt per cluster
    ft_key: str | None = None
    ft_entry: Any = None
    trained_now: bool = False
    items: list[tuple[int, int]] = field(default_factory=list)  # (class, cluster) per synthetic image
    syn_latents: Arrays = field(default_factory=Arrays)  # prototype latent per synthetic image (centre rows)
    texts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    syn_keys: list[str] = field(default_factory=list)
    synth_key: Callable[..., str] | None = None  # (latent, prompt, seed) -> key, shared by candidates
    synth_params: Any = None  # the synthesis stage's Params: what every synthesis key holds
    images: Arrays = field(default_factory=Arrays)  # the synthetic set (after refinement), read when used
    detector: Any = None  # refine.Detector
    scores: list[dict] = field(default_factory=list)
    defective: list[int] = field(default_factory=list)
    cand: list[tuple[int, int]] = field(default_factory=list)  # (image, candidate index)
    n_candidates: int = 0
    cand_keys: list[str] = field(default_factory=list)
    cand_images: Arrays = field(default_factory=Arrays)
    cand_scores: list[dict] = field(default_factory=list)
    replaced: dict[int, Any] = field(default_factory=dict)  # image -> its arrays.Ref before refinement
    pool: list[tuple[int, int]] = field(default_factory=list)  # (synthetic image, candidate) per pool image
    pool_images: Arrays = field(default_factory=Arrays)
    pool_keys: list[str] = field(default_factory=list)
    pool_seeds: list[int] = field(default_factory=list)
    clip_keys: list[str] = field(default_factory=list)
    pool_emb: Any = None
    anchors: Any = None  # [classes, d] CLIP anchors
    own_anchors: Any = None  # [synthetic images, d] prototype-prompt anchors (--sas-anchor prototype)
    anchor_key: str = ""
    mask_keys: list[str] = field(default_factory=list)  # object masks (vlcp/mask_stages.py)
    mask_entries: list = field(default_factory=list)
    mask_fallback: set[int] = field(default_factory=set)  # classes whose masks are all empty
    foreground: list[float] = field(default_factory=list)  # per synthetic image
    fg_key: str = ""
    cand_foreground: list[float] = field(default_factory=list)  # per refinement candidate
    cand_fg_key: str = ""
    caption_match: list[float] = field(default_factory=list)  # CLIP cosine with its prompt, per synthetic image
    class_match: list[float] = field(default_factory=list)  # ... with its class prompt
    match_key: str = ""
    cand_caption_match: list[float] = field(default_factory=list)
    cand_match_key: str = ""


@dataclass
class Run:
    cfg: DistillConfig
    cache: StageCache
    ds: Dataset
    refs: Refs
    resolution: int
    dry: bool
    manifest: dict
    models: dict[str, Lazy] = field(default_factory=dict)
    reports: list[StageReport] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)  # JSON files written next to manifest.json
    writers: list[Callable[[Path], None]] = field(default_factory=list)  # images, sheets, plots
    st: State = field(default_factory=State)

    @property
    def folders(self) -> list[str]:
        return [c.folder for c in self.ds.classes]

    def warn(self, msg: str) -> None:
        log.warning(msg)
        self.cfg.warnings.append(msg)

    def need(self, stage: str, values: list) -> None:
        """In a dry run, the plan ends where a stage needs values that are not cached yet."""
        if self.dry and any(v is None for v in values):
            raise PlanStop(None)

    def release_unused(self, done: Stage, later: list[Stage]) -> None:
        """Free every model no later stage uses (a 7B captioner must not sit in memory during training)."""
        still = {m for s in later for m in s.models}
        for name in done.models:
            if name not in still and name in self.models:
                self.models[name].release()


class Params:
    """The configuration as one stage may read it: its declared fields only."""

    def __init__(self, cfg: DistillConfig, stage: Stage):
        self._cfg, self._stage = cfg, stage
        self._allowed = set(stage.params) | set(stage.selects) | set(stage.unkeyed)

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self._allowed:
            raise AttributeError(f"stage {self._stage.name!r} reads {name!r} but does not declare it "
                                 f"(add it to params, selects or unkeyed in vlcp/stages.py)")
        return getattr(self._cfg, name)


@dataclass
class Step:
    """One stage within one run: its parameters, its keys and its cache calls."""
    run: Run
    stage: Stage

    @property
    def p(self) -> Params:
        return Params(self.run.cfg, self.stage)

    def key(self, **inputs) -> str:
        """The stage's key: its declared parameters by value, plus the given inputs (upstream keys,
        content hashes, model identities)."""
        return stage_key(self.stage.name, self.stage.version, layout=KEY_LAYOUT,
                         params={n: getattr(self.run.cfg, n) for n in self.stage.params}, **inputs)

    def whole(self, key: str, compute: Callable[[], tuple[dict, dict]], model: str | None = None,
              name: str | None = None):
        entry, rep = run_stage(self.run.cache, name or self.stage.name, key, compute,
                               self.run.models.get(model) if model else None, dry=self.run.dry)
        self.run.reports.append(rep)
        return entry, rep

    def items(self, keys: list[str], compute, batch_size: int | Callable[[], int], model: str | None = None,
              cache_stage: str | None = None, retain: bool = True):
        """A per-item stage (``run_items``); ``retain=False`` when the computed tensors must not stay in
        memory (latents: read back one class at a time by the stages that use them)."""
        opts = ItemOpts(self.run.dry, retain, "class" if self.stage.per == "class" else "img")
        entries, rep = run_items(self.run.cache, cache_stage or self.stage.name, keys, compute, batch_size,
                                 self.run.models.get(model) if model else None,
                                 self.run.cfg.progress and self.stage.name, opts)
        rep.name = self.stage.name
        self.run.reports.append(rep)
        return entries, rep


def distill(cfg: DistillConfig, cache: StageCache, dry_run: bool = False) -> dict:
    """Run (or plan) the enabled stages up to ``cfg.until``; return the manifest (written to OUT unless dry)."""
    from vlcp import arrays, parallel
    from vlcp.cache import CorruptEntry

    t_start = time.perf_counter()
    alone = not parallel.world().parallel
    try:
        for attempt in range(3):  # a blob found corrupt when first read is dropped; the rerun recomputes it
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
                if attempt == 2:
                    raise DistillError(str(exc)) from None
                log.warning("%s: recomputing it", exc)
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
    from vlcp import models
    from vlcp.clip import load_clip
    from vlcp.segment import load_segmenter

    cfg.validate()
    cfg.warnings.clear()
    defaults_row = cfg.fill_defaults()
    ds = load_dataset(cfg.data, cfg.data_dir, "train", cfg.classes, cfg.max_per_class,
                      digest=lambda p: memo_digest(cache, p))
    if cfg.tiny:
        from vlcp.tiny import tiny_models

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
        from vlcp.clip import resolve_clip

        refs.clip = resolve_clip(cfg.clip, cfg.tiny, cache)
    if cfg.object_masks or cfg.min_foreground:
        from vlcp.segment import resolve_segmenter

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

    from vlcp.cache import file_digest

    st = os.stat(path)
    return cache.memo("file-digest", stable_hash([os.path.abspath(path), st.st_size, st.st_mtime_ns]),
                      lambda: file_digest(path))


def publish(run: Run) -> None:
    """OUT, written to a temporary folder and renamed into place: images, sheets, JSON files, manifest,
    report.html. In a multi-process launch only rank 0 writes OUT, once every process is done, with each
    process's stage reports in OUT/ranks/<rank>.json (vlcp/parallel.py)."""
    from vlcp import output, parallel

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
        from vlcp.report import build as build_report

        build_report(tmp)  # OUT/report.html: relative links, so it survives the rename and a zip

    output.publish(Path(run.cfg.out), write)


def cached_captions(cfg: DistillConfig, cache: StageCache) -> list[tuple[str, str | None]]:
    """(``<class folder>/<file>``, caption or None when not cached) per usable image, computing nothing:
    what ``vlcp captions export`` writes."""
    run = start(cfg, cache, dry_run=True)
    for stage in STAGES[:2]:  # images, captions: a dry run reads the cache and never loads a model
        stage.run(run, Step(run, stage))
    return [(f"{run.ds.classes[s.class_idx].folder}/{Path(s.source).name}", c)
            for s, c in zip(run.st.samples, run.st.captions)]
