"""``vlcp distill``: the VLCP method (Algorithm 1) as a chain of cached stages.

images -> captions -> latents -> outliers -> clusters -> text_prototypes -> synthesis -> output

Per-image stages (images, captions, latents, synthesis) are cached per item; the others are one
artefact each, keyed by their upstream keys and their own parameters, so a rerun that changes only
``--ipc`` recomputes from ``outliers`` on and never touches a captioner or a VAE.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vlcp import __version__, captions, clusters, finetune, latents, outliers, prompts, synthesis, text_prototypes
from vlcp.cache import StageCache, stable_hash, stage_key
from vlcp.datasets import DatasetError, check_image, load_dataset
from vlcp.defaults import defaults_for
from vlcp.runner import Lazy, PlanStop, StageReport, run_items, run_stage

log = logging.getLogger("vlcp")

STAGES = ["images", "captions", "latents", "outliers", "clusters", "text_prototypes", "prompts", "finetune",
          "synthesis", "detector", "detector_scores", "candidates", "candidate_scores", "refinement", "output"]
IMAGES_VERSION = 1


class DistillError(Exception):
    """A runtime problem with a clear cause (too few images, empty caption...): exit code 1."""


@dataclass
class DistillConfig:
    data: str
    ipc: int
    out: Path
    data_dir: Path = Path("data")
    device: str = "auto"
    tiny: bool = False
    seed: int = 0
    until: str | None = None
    classes: list[str] | None = None
    max_per_class: int | None = None
    captioner: str | None = None
    diffusion: str | None = None
    caption_prompt: str = captions.PROMPT
    caption_batch_size: int | None = None  # 8 (a 7B captioner on one GPU); 32 with --tiny
    caption_max_tokens: int | None = None  # 256; 32 with --tiny
    resolution: int | None = None
    crop: str = "none"
    latent_batch_size: int = 16
    contamination: float | None = None
    beta: float | None = None
    top_k: int | None = None
    allow_duplicates: bool = False
    strength: float = 0.7
    guidance_scale: float = 10.0
    steps: int = 50
    negative_prompt: str = synthesis.NEGATIVE_PROMPT
    synthesis_batch_size: int = 8
    image_size: int | None = None
    text_strategy: str = "dcs"
    text_llm: str | None = None
    finetune: bool = True
    finetune_method: str = "full"
    finetune_epochs: int | None = None  # 8 as the paper; 1 with --tiny
    finetune_batch_size: int = 8
    finetune_lr: float | None = None
    finetune_max_steps: int | None = None
    finetune_lora_rank: int = 4
    finetune_checkpoint_every: int = 200
    gradient_checkpointing: bool = False
    refine: bool = False
    refine_candidates: int = 20
    refine_top_k: int = 2
    refine_beta: float | None = None
    detector: str | None = None  # None: train one; or a safetensors file of --detector-arch weights
    detector_arch: str | None = None  # resnet18, or resnet18-modified for <= 32 px data
    detector_epochs: int = 300
    force: bool = False
    progress: bool = True
    warnings: list[str] = field(default_factory=list)

    def fill_defaults(self) -> dict:
        """Dataset defaults for the options left unset; returns the table row used."""
        row = defaults_for(self.data)
        for name in ("contamination", "beta", "top_k", "image_size"):
            if getattr(self, name) is None:
                setattr(self, name, row[name])
        if self.caption_batch_size is None:
            self.caption_batch_size = 32 if self.tiny else 8
        if self.caption_max_tokens is None:
            self.caption_max_tokens = 32 if self.tiny else 256
        if self.finetune_epochs is None:
            self.finetune_epochs = 1 if self.tiny else 8
        if self.refine_beta is None:
            from vlcp.refine import default_beta

            self.refine_beta = default_beta(self.data)
        return row

    def finetune_params(self) -> finetune.FinetuneParams:
        return finetune.FinetuneParams(self.finetune_method, self.finetune_epochs, self.finetune_batch_size,
                                       self.finetune_lr, self.finetune_max_steps, self.finetune_lora_rank,
                                       self.gradient_checkpointing, self.finetune_checkpoint_every, self.seed)

    def params(self) -> dict:
        d = asdict(self)
        for k in ("out", "data_dir", "warnings", "progress"):
            d.pop(k)
        d["out"], d["data_dir"] = str(self.out), str(self.data_dir)
        return d


def _warn(cfg: DistillConfig, msg: str) -> None:
    log.warning(msg)
    cfg.warnings.append(msg)


def distill(cfg: DistillConfig, cache: StageCache, dry_run: bool = False) -> dict:
    """Run (or plan) the stages up to ``cfg.until``; return the manifest (written to OUT unless dry_run)."""
    from vlcp import models

    t_start = time.perf_counter()
    defaults_row = cfg.fill_defaults()
    ds = load_dataset(cfg.data, cfg.data_dir, "train", cfg.classes, cfg.max_per_class,
                      digest=lambda p: _memo_digest(cache, p))
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
    cap_ref = models.resolve(cfg.captioner, cache)
    sd_ref = models.resolve(cfg.diffusion, cache, probe_file="model_index.json")
    llm_ref = models.resolve(cfg.text_llm, cache) if cfg.text_strategy == "llm" else None
    resolution = cfg.resolution or models.native_resolution(sd_ref)
    stop_after = cfg.until or "output"
    reports: list[StageReport] = []
    manifest = {
        "vlcp_version": __version__, "tiny": cfg.tiny, "parameters": cfg.params(),
        "defaults_source": defaults_row["source"], "dataset": ds.identity(),
        "classes": [{"folder": c.folder, "name": c.name} for c in ds.classes],
        "models": {"captioner": cap_ref.manifest(), "diffusion": sd_ref.manifest(),
                   **({"text_llm": llm_ref.manifest()} if llm_ref else {})}, "resolution": resolution,
        "stages": {}, "warnings": cfg.warnings,
    }
    dry = dry_run

    def done(name: str) -> bool:
        return STAGES.index(name) >= STAGES.index(stop_after)

    def finish(extra_files=None) -> dict:
        manifest["stages"] = {r.name: r.manifest() for r in reports}
        manifest["seconds"] = round(time.perf_counter() - t_start, 3)
        manifest["cache_corrupt_entries_recomputed"] = cache.corrupt
        if not dry:
            _publish(cfg, manifest, extra_files or {})
        return manifest

    def need(stage: str, values: list) -> None:
        """In a dry run, stop planning where a stage needs values that are not cached yet."""
        if dry and any(v is None for v in values):
            raise PlanStop(StageReport(stage, "", False, -1, 0, False, 0.0))

    try:
        return _run(cfg, cache, ds, cap_ref, sd_ref, llm_ref, resolution, reports, manifest, dry, done, finish, need)
    except PlanStop as stop:
        if stop.report.items_computed >= 0:
            reports.append(stop.report)
        planned = [r.name for r in reports]
        manifest["stages"] = {r.name: r.manifest() for r in reports}
        manifest["plan_unknown_after"] = planned[-1] if planned else None
        manifest["seconds"] = round(time.perf_counter() - t_start, 3)
        return manifest


def _run(cfg, cache, ds, cap_ref, sd_ref, llm_ref, resolution, reports, manifest, dry, done, finish, need) -> dict:
    from vlcp import models

    # 1. images: decode each file once (cached), drop the unreadable ones
    keys = [stage_key("images", IMAGES_VERSION, image=s.digest) for s in ds.samples]
    entries, rep = run_items(cache, "images", keys, lambda idx: ((check_image(ds.samples[i]), None) for i in idx),
                             64, progress=cfg.progress, desc="checking images", dry=dry)
    ok = [e is None or e.meta["ok"] for e in entries]  # a dry run assumes unchecked images are fine
    skipped = [{"source": s.source, "error": e.meta["error"]} for s, e, k in zip(ds.samples, entries, ok) if not k]
    samples = [s for s, k in zip(ds.samples, ok) if k]
    rep.details = {"skipped": len(skipped)}
    reports.append(rep)
    manifest["skipped_images"] = skipped
    if skipped:
        _warn(cfg, f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['source']}: {skipped[0]['error']}")
    by_class = [[i for i, s in enumerate(samples) if s.class_idx == c] for c in range(len(ds.classes))]
    for c, idx in enumerate(by_class):
        if not idx:
            raise DatasetError(f"class {ds.classes[c].folder!r} has no usable images")
    manifest["images_per_class"] = {ds.classes[c].folder: len(idx) for c, idx in enumerate(by_class)}
    if done("images"):
        return finish()

    # 2. captions (per image)
    names = [ds.classes[s.class_idx].name for s in samples]
    cap_keys = [stage_key("captions", captions.VERSION, image=s.digest, prompt=cfg.caption_prompt, class_name=n,
                          model=cap_ref.identity, max_new_tokens=cfg.caption_max_tokens, decoding="greedy")
                for s, n in zip(samples, names)]
    captioner = Lazy(lambda: models.load_captioner(cap_ref, cfg.device))

    def compute_captions(idx):
        model, processor = captioner()
        texts = captions.caption_images(model, processor, [samples[i].load() for i in idx], [names[i] for i in idx],
                                        cfg.caption_prompt, cfg.caption_max_tokens)
        for i, text in zip(idx, texts):
            if not text.strip():
                raise DistillError(f"the captioner returned empty text for {samples[i].source}; try another "
                                   f"--caption-prompt or --captioner")
            yield {"caption": text}, None

    cap_entries, rep = run_items(cache, "captions", cap_keys, compute_captions, cfg.caption_batch_size, captioner,
                                 cfg.progress, dry=dry)
    reports.append(rep)
    caps = [e.meta["caption"] if e else None for e in cap_entries]
    if done("captions"):
        return finish()

    # 3. latents (per image)
    lat_keys = [stage_key("latents", latents.VERSION, image=s.digest, vae=sd_ref.identity, resolution=resolution,
                          crop=cfg.crop) for s in samples]
    vae = Lazy(lambda: models.load_vae(sd_ref, cfg.device))

    def compute_latents(idx):
        z = latents.encode_images(vae(), [samples[i].load() for i in idx], resolution, cfg.crop)
        return (({}, {"latent": zi}) for zi in z)

    lat_entries, rep = run_items(cache, "latents", lat_keys, compute_latents, cfg.latent_batch_size, vae, cfg.progress,
                                 dry=dry)
    reports.append(rep)
    if done("latents"):
        return finish()
    need("outliers", lat_entries)
    lat = np.stack([e.tensors["latent"] for e in lat_entries])

    # 4. outliers (per class LOF)
    folders = [c.folder for c in ds.classes]
    out_key = stage_key("outliers", outliers.VERSION, latents={f: stable_hash([lat_keys[i] for i in by_class[c]])
                                                               for c, f in enumerate(folders)},
                        contamination=cfg.contamination, n_neighbors=outliers.N_NEIGHBORS, min_keep=cfg.ipc)

    def compute_outliers():
        meta, tensors = {}, {}
        for c, f in enumerate(folders):
            mask, restored = outliers.inlier_mask(lat[by_class[c]], cfg.contamination, cfg.ipc)
            tensors[f"mask/{f}"] = mask.astype(np.uint8)
            meta[f] = {"images": len(mask), "removed": int((~mask).sum()), "restored": restored}
        return meta, tensors

    out_entry, rep = run_stage(cache, "outliers", out_key, compute_outliers, dry=dry)
    rep.details = {"removed_per_class": {f: m["removed"] for f, m in out_entry.meta.items()}}
    reports.append(rep)
    manifest["outliers"] = out_entry.meta
    for f, m in out_entry.meta.items():
        if m["restored"]:
            _warn(cfg, f"class {f}: LOF would leave fewer than IPC={cfg.ipc} inliers; kept {m['restored']} of "
                       f"the least outlying outliers")
    inliers = [[by_class[c][j] for j in np.flatnonzero(out_entry.tensors[f"mask/{f}"])] for c, f in enumerate(folders)]
    if done("outliers"):
        return finish()

    # 5. clusters (per class K-Means)
    cl_key = stage_key("clusters", clusters.VERSION, outliers=out_key, ipc=cfg.ipc, seed=cfg.seed,
                       allow_duplicates=cfg.allow_duplicates)

    def compute_clusters():
        meta, tensors = {}, {}
        for c, f in enumerate(folders):
            rows = inliers[c]
            try:
                centres, labels, dup = clusters.kmeans(lat[rows], cfg.ipc, cfg.seed, cfg.allow_duplicates)
            except clusters.TooFewImages:
                raise DistillError(f"class {f!r} ({ds.classes[c].name}) has {len(rows)} usable images, fewer than "
                                   f"--ipc {cfg.ipc}; lower --ipc or pass --allow-duplicates") from None
            if dup:
                members = [[rows[j % len(rows)]] for j in range(cfg.ipc)]
            else:
                members = [[rows[j] for j in m] for m in clusters.members_by_distance(lat[rows], centres, labels)]
            tensors[f"centres/{f}"] = centres
            meta[f] = {"members": members, "sizes": [len(m) for m in members], "duplicated": dup}
        return meta, tensors

    cl_entry, rep = run_stage(cache, "clusters", cl_key, compute_clusters, dry=dry)
    reports.append(rep)
    for f, m in cl_entry.meta.items():
        if m["duplicated"]:
            _warn(cfg, f"class {f}: fewer images than --ipc; prototypes repeat (--allow-duplicates)")
    if done("clusters"):
        return finish()

    # 6. text prototypes (Algorithm 2)
    tp_key = stage_key("text_prototypes", text_prototypes.VERSION, clusters=cl_key, beta=cfg.beta, top_k=cfg.top_k,
                       captions={f: stable_hash([cap_keys[i] for i in inliers[c]]) for c, f in enumerate(folders)},
                       names=[c.name for c in ds.classes])

    def compute_text():
        meta = {}
        for c, f in enumerate(folders):
            rows = inliers[c]
            pos = {g: j for j, g in enumerate(rows)}
            members = [[pos[g] for g in m] for m in cl_entry.meta[f]["members"]]
            recs = text_prototypes.class_prototypes([caps[g] for g in rows], members, ds.classes[c].name, cfg.beta,
                                                    cfg.top_k)
            for r, m in zip(recs, cl_entry.meta[f]["members"]):
                r["member"] = samples[rows[r["member"]]].source if r["member"] is not None else None
                r["cluster_size"] = len(m)
            meta[f] = recs
        return meta, {}

    need("text_prototypes", caps)
    tp_entry, rep = run_stage(cache, "text_prototypes", tp_key, compute_text, dry=dry)
    reports.append(rep)
    prototypes = {"beta": cfg.beta, "top_k": cfg.top_k, "classes": {
        f: {"name": ds.classes[c].name, "clusters": tp_entry.meta[f]} for c, f in enumerate(folders)}}
    manifest["text_prototypes"] = {f: [{"caption": r["caption"], "score": r["score"], "fallback": r["fallback"],
                                        "representative_words": r["representative_words"],
                                        "non_representative": r["non_representative"]} for r in recs]
                                   for f, recs in tp_entry.meta.items()}
    if done("text_prototypes"):
        return finish({"prototypes.json": prototypes})

    # 7. prompts: the text that conditions synthesis (--text-strategy)
    pr_key = stage_key("prompts", prompts.VERSION, text_prototypes=tp_key, strategy=cfg.text_strategy,
                       llm=llm_ref.identity if llm_ref else None)
    llm = Lazy(lambda: models.load_text_llm(llm_ref, cfg.device))

    def compute_prompts():
        out = {}
        for c, f in enumerate(folders):
            recs, name = tp_entry.meta[f], ds.classes[c].name
            if cfg.text_strategy == "llm":
                model, tok = llm()
                out[f] = prompts.llm_sentences(model, tok, [prompts.llm_request(name, r) for r in recs])
            else:
                out[f] = [prompts.simple_prompt(cfg.text_strategy, name, r) for r in recs]
        return out, {}

    pr_entry, rep = run_stage(cache, "prompts", pr_key, compute_prompts, llm, dry=dry)
    reports.append(rep)
    for f in folders:
        for r, text in zip(prototypes["classes"][f]["clusters"], pr_entry.meta[f]):
            r["prompt"] = text
    if done("prompts"):
        return finish({"prototypes.json": prototypes})

    # 8. finetune the diffusion model on (image, caption) pairs (Algorithm 1, step 3)
    pipe = Lazy(lambda: models.load_img2img(sd_ref, cfg.device))
    ft_key, ft_entry, trained_now = None, None, []
    if cfg.finetune:
        fp = cfg.finetune_params()
        ft_key = stage_key("finetune", finetune.VERSION, captions=stable_hash(cap_keys), latents=stable_hash(lat_keys),
                           model=sd_ref.identity, params=fp.key_parts())

        def compute_finetune():
            trained_now.append(True)
            weights, meta = finetune.train(pipe(), lat, caps, fp, cache, ft_key, cfg.progress)
            return meta, weights

        ft_entry, rep = run_stage(cache, "finetune", ft_key, compute_finetune, pipe, dry=dry)
        rep.details = {k: ft_entry.meta[k] for k in ("steps", "resumed_from", "first_loss", "last_loss")}
        reports.append(rep)
        manifest["finetune"] = {k: v for k, v in ft_entry.meta.items() if k != "losses"}
    if done("finetune"):
        return finish({"prototypes.json": prototypes, **_loss_files(ft_entry)})

    def finetuned_pipe():
        p = pipe()
        if ft_entry is not None and not trained_now:  # trained in this run: the UNet already holds the weights
            finetune.apply_weights(p.unet, cfg.finetune_method, ft_entry.tensors, cfg.finetune_lora_rank)
        return p

    # 9. synthesis (per image)
    items = [(c, j) for c in range(len(folders)) for j in range(cfg.ipc)]
    syn_latents = [cl_entry.tensors[f"centres/{folders[c]}"][j] for c, j in items]
    texts = [pr_entry.meta[folders[c]][j] for c, j in items]
    seeds = [synthesis.image_seed(cfg.seed, folders[c], j) for c, j in items]
    syn_keys = [_synthesis_key(cfg, sd_ref, ft_key, z, p, s) for z, p, s in zip(syn_latents, texts, seeds)]
    synth_model = Lazy(finetuned_pipe)

    def compute_synthesis(idx):
        imgs = synthesis.generate(synth_model(), np.stack([syn_latents[i] for i in idx]), [texts[i] for i in idx],
                                  [seeds[i] for i in idx], cfg.negative_prompt, cfg.strength, cfg.guidance_scale,
                                  cfg.steps)
        return (({"prompt": texts[i], "seed": seeds[i]}, {"image": im}) for i, im in zip(idx, imgs))

    syn_entries, rep = run_items(cache, "synthesis", syn_keys, compute_synthesis, cfg.synthesis_batch_size,
                                 synth_model, cfg.progress, dry=dry)
    reports.append(rep)
    need("output", syn_entries)
    flat = [e.tensors["image"] for e in syn_entries]
    if done("synthesis"):
        return finish({"prototypes.json": prototypes, **_loss_files(ft_entry)})
    replaced: dict[int, np.ndarray] = {}
    if cfg.refine:
        refined, summary = _refinement(cfg, cache, ds, items, flat, syn_latents, texts, seeds, synth_model, ft_key,
                                       sd_ref, reports, dry, done, need)
        if refined is None:
            return finish({"prototypes.json": prototypes, **_loss_files(ft_entry)})
        replaced = {i: flat[i] for i in summary["replacements"]}
        flat = refined
        manifest["refinement"] = summary
        for f in folders:
            prototypes["classes"][f]["refinement"] = summary["per_class"][f]
        if done("refinement"):
            return finish({"prototypes.json": prototypes, **_loss_files(ft_entry)})
    images: dict[int, list[np.ndarray]] = {}
    for (c, _), im in zip(items, flat):
        images.setdefault(c, []).append(im)

    # 8. output: the ImageFolder (rebuilt from the cache on every run: cheap, never stale)
    t0 = time.perf_counter()
    from vlcp import output

    def build(tmp: Path):
        output.save_images(tmp, ds.classes, images, cfg.image_size)
        output.contact_sheet(ds.classes, images).save(tmp / "preview.png")
        if replaced:
            output.before_after_sheet([(replaced[i], flat[i], ds.classes[items[i][0]].name) for i in sorted(replaced)]
                                      ).save(tmp / "preview_refined.png")

    reports.append(StageReport("output", stable_hash(syn_keys + [str(cfg.image_size)]), False, len(items), 0, False,
                               round(time.perf_counter() - t0, 3)))
    return finish({"prototypes.json": prototypes, "_build": build, **_loss_files(ft_entry)})


def _refinement(cfg, cache, ds, items, flat, syn_latents, texts, seeds, synth_model, ft_key, sd_ref, reports, dry,
                done, need):
    """Detector-guided refinement after synthesis; returns (images, summary), or (None, None) when --until
    stops at one of its stages."""
    from vlcp import refine

    folders = [c.folder for c in ds.classes]
    p, det_key, det_entry, rep, dev = refine.detector_stage(cache, ds, cfg.data, cfg.data_dir, cfg.classes,
                                                             cfg.detector_arch, cfg.detector_epochs, cfg.detector,
                                                             cfg.seed, cfg.device, cfg.progress, dry)
    reports.append(rep)
    if done("detector"):
        return None, None
    detector = Lazy(lambda: refine.detector_from_state(det_entry.tensors, p, len(folders), dev(),
                                                       [c.name for c in ds.classes]))

    def score(stage_name, imgs):
        keys = [stage_key("detector_scores", refine.SCORES_VERSION, detector=det_key, image=_array_hash(im))
                for im in imgs]

        def compute(idx):
            res = refine.scores_of(detector(), [imgs[i] for i in idx], p, dev())
            return (({"pred": r["pred"], "probs": r["probs"]}, {"feature": r["feature"]}) for r in res)

        entries, r = run_items(cache, "detector_scores", keys, compute, 64, detector, cfg.progress,
                               desc=stage_name, dry=dry)
        r.name = stage_name
        reports.append(r)
        need(stage_name, entries)
        return [{"pred": e.meta["pred"], "probs": e.meta["probs"], "feature": e.tensors["feature"]} for e in entries]

    scores = score("detector_scores", flat)
    if done("detector_scores"):
        return None, None
    targets = [c for c, _ in items]
    defective = [i for i in range(len(items))
                 if refine.is_defective(scores[i]["pred"], scores[i]["probs"][targets[i]], targets[i], cfg.refine_beta)]
    cand = [(i, j) for i in defective for j in range(cfg.refine_candidates)]
    cand_seeds = [refine.candidate_seed(seeds[i], j) for i, j in cand]
    cand_keys = [_synthesis_key(cfg, sd_ref, ft_key, syn_latents[i], texts[i], s) for (i, _), s in zip(cand, cand_seeds)]

    def compute_candidates(idx):
        imgs = synthesis.generate(synth_model(), np.stack([syn_latents[cand[k][0]] for k in idx]),
                                  [texts[cand[k][0]] for k in idx], [cand_seeds[k] for k in idx],
                                  cfg.negative_prompt, cfg.strength, cfg.guidance_scale, cfg.steps)
        return (({"of": cand[k][0], "candidate": cand[k][1]}, {"image": im}) for k, im in zip(idx, imgs))

    cand_entries, rep = run_items(cache, "candidates", cand_keys, compute_candidates, cfg.synthesis_batch_size,
                                  synth_model, cfg.progress, dry=dry)
    reports.append(rep)
    if done("candidates"):
        return None, None
    need("candidate_scores", cand_entries)
    cand_imgs = [e.tensors["image"] for e in cand_entries]
    cand_scores = score("candidate_scores", cand_imgs)
    if done("candidate_scores"):
        return None, None
    by_image: dict[int, list] = {}
    by_image_imgs: dict[int, list] = {}
    for (i, _), sc, im in zip(cand, cand_scores, cand_imgs):
        by_image.setdefault(i, []).append(sc)
        by_image_imgs.setdefault(i, []).append(im)
    t0 = time.perf_counter()
    summary = refine.select(folders, targets, scores, by_image, cfg.refine_beta, cfg.refine_top_k)
    reports.append(StageReport("refinement", stable_hash([det_key, cand_keys, cfg.refine_beta, cfg.refine_top_k]),
                               False, len(defective), 0, False, round(time.perf_counter() - t0, 3)))
    out = list(flat)
    for i, d in summary["replacements"].items():
        out[i] = by_image_imgs[i][d["candidate"]]
        d["class"], d["cluster"] = folders[items[i][0]], items[i][1]
    summary.update(beta=cfg.refine_beta, top_k=cfg.refine_top_k, candidates=cfg.refine_candidates,
                   detector=det_entry.meta)
    return out, summary


def _loss_files(ft_entry) -> dict:
    """The fine-tuning loss curve, drawn when the output folder is written."""
    if ft_entry is None:
        return {}
    return {"_plots": lambda tmp: finetune.loss_plot(ft_entry.meta["losses"], tmp / "finetune_loss.png",
                                                     tmp / "finetune_loss.csv")}


def _synthesis_key(cfg: DistillConfig, sd_ref, ft_key, latent: np.ndarray, prompt: str, seed: int) -> str:
    return stage_key("synthesis", synthesis.VERSION, latent=_array_hash(latent), prompt=prompt, finetune=ft_key, negative_prompt=cfg.negative_prompt, strength=cfg.strength, guidance_scale=cfg.guidance_scale,
        steps=cfg.steps, model=sd_ref.identity, seed=seed)


def _array_hash(a: np.ndarray) -> str:
    import hashlib

    a = np.ascontiguousarray(a)
    return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()[:32]


def _memo_digest(cache: StageCache, path: str) -> str:
    """File content hash, memoised on (path, size, mtime) so reruns do not reread every image."""
    import os

    from vlcp.cache import file_digest

    st = os.stat(path)
    return cache.memo("file-digest", stable_hash([os.path.abspath(path), st.st_size, st.st_mtime_ns]),
                      lambda: file_digest(path))


def _publish(cfg: DistillConfig, manifest: dict, files: dict) -> None:
    from vlcp import output

    build = files.pop("_build", None)
    plots = files.pop("_plots", None)

    def write(tmp: Path):
        if build:
            build(tmp)
        if plots:
            plots(tmp)
        for name, obj in files.items():
            output.write_json(tmp / name, obj)
        output.write_json(tmp / "manifest.json", manifest)

    output.publish(Path(cfg.out), write)
