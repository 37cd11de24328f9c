"""One run of ``vlcp distill``: its configuration, cache, dataset, models and the state stages hand on.

``Step`` is the only way a stage reads the configuration: it builds the stage's keys from the fields the
stage table declares, so an input that is read is always keyed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vlcp.pipeline.stage import Stage
from vlcp.store.arrays import Arrays
from vlcp.store.cache import KEY_LAYOUT, StageCache, stage_key
from vlcp.store.runner import (
    ItemOpts,
    Lazy,
    PlanStop,
    StageReport,
    run_items,
    run_stage,
)

if TYPE_CHECKING:
    from vlcp.data.datasets import Dataset, Sample
    from vlcp.pipeline.config import DistillConfig

log = logging.getLogger("vlcp")


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
    train_resolution: int = 0  # side of the fine-tuning crops (stage training_latents)
    train_keys: list[str] = field(default_factory=list)
    train_entries: list = field(default_factory=list)  # per image: (2, C, h, w) latents of the crop and its mirror
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
    mask_keys: list[str] = field(default_factory=list)  # object masks (vlcp/pipeline/stages/masks.py)
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
    todo: list[str] = field(default_factory=list)  # the stages this run goes through (the loop sets it)

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
                                 f"(add it to params, selects or unkeyed in vlcp/pipeline/table.py)")
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
