"""The stage table of ``vlcp distill``: every stage, in order, with what it reads and what its key holds.

A stage is a function ``(run, step)`` that reads the configuration only through ``step.p`` (its
declared fields), builds its key with ``step.key(...)`` (declared ``params`` by value + the inputs it
names: upstream keys, content hashes, model identities) and hands compute functions to
``step.whole`` / ``step.items`` (the cache). ``selects`` are fields that choose *which* items exist
(each item's key says what it is); ``unkeyed`` fields cannot change a result (batch sizes).
Algorithm bodies live in their own modules; this file is the wiring. No torch import here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from vlcp import captions as captions_mod
from vlcp import clusters as clusters_mod
from vlcp import outliers as outliers_mod
from vlcp.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.distill import Run, Step

IMAGES_VERSION = 1


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[["Run", "Step"], None]
    version: int
    what: str  # for the README table
    per: str = "run"  # "image" (cached per item), "class" (per class) or "run" (one artefact)
    params: tuple[str, ...] = ()  # config fields in the key, by value
    selects: tuple[str, ...] = ()  # config fields that choose which items exist
    unkeyed: tuple[str, ...] = ()  # config fields that cannot change a result
    inputs: str = ""  # what else the key holds (for the README)
    models: tuple[str, ...] = ()  # models it uses (released after the last stage that does)
    enabled_by: str | None = None  # config flag that turns it on
    stored_as: tuple[str, ...] = ()  # cache stage(s) its items live under when shared with others (default: name)


# 1. images ------------------------------------------------------------------------------------------
def images(run: Run, step: Step) -> None:
    """Decode each file once (cached per content hash); drop the unreadable ones."""
    from vlcp.datasets import DatasetError, check_image

    ds = run.ds
    keys = [step.key(image=s.digest) for s in ds.samples]
    entries, rep = step.items(keys, lambda idx: ((check_image(ds.samples[i]), None) for i in idx), 64)
    ok = [e is None or e.meta["ok"] for e in entries]  # a dry run assumes unchecked images are fine
    skipped = [{"source": s.source, "error": e.meta["error"]} for s, e, k in zip(ds.samples, entries, ok) if not k]
    run.st.samples = [s for s, k in zip(ds.samples, ok) if k]
    run.st.by_class = [[] for _ in ds.classes]  # one pass: a scan per class is quadratic at 1000 classes
    for i, s in enumerate(run.st.samples):
        run.st.by_class[s.class_idx].append(i)
    rep.details = {**rep.details, "skipped": len(skipped)}
    run.manifest["skipped_images"] = skipped
    if skipped:
        run.warn(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['source']}: {skipped[0]['error']}")
    for c, idx in enumerate(run.st.by_class):
        if not idx:
            raise DatasetError(f"class {ds.classes[c].folder!r} has no usable images")
    run.manifest["images_per_class"] = {f: len(idx) for f, idx in zip(run.folders, run.st.by_class)}


# 2. captions ----------------------------------------------------------------------------------------
def captions(run: Run, step: Step) -> None:
    """LLaVA descriptions with the paper's prompt, greedy decoding, per image; or the authors' captions
    (``--captions-from``), keyed by the file's hash instead of the captioner."""
    from vlcp import models
    from vlcp.distill import DistillError

    p, st = step.p, run.st
    names = [run.ds.classes[s.class_idx].name for s in st.samples]
    imported, file_hash = _imported_captions(run, p.captions_from, p.missing_captions)
    made_by = dict(model=run.refs.captioner.identity, decoding="greedy")
    st.cap_keys = [step.key(image=s.digest, class_name=n, **({"imported": file_hash} if i in imported else made_by))
                   for i, (s, n) in enumerate(zip(st.samples, names))]

    def compute(idx):
        todo = [i for i in idx if i not in imported]
        made = {}
        if todo:
            model, processor = run.models["captioner"]()
            made = dict(zip(todo, captions_mod.caption_images(model, processor, [st.samples[i].load() for i in todo],
                                                              [names[i] for i in todo], p.caption_prompt,
                                                              p.caption_max_tokens)))
        for i in idx:
            text = imported[i] if i in imported else made[i]
            if not text.strip():
                raise DistillError(f"the captioner returned empty text for {st.samples[i].source}; try another "
                                   f"--caption-prompt or --captioner")
            yield {"caption": text}, None

    # unset: from GPU memory, asked only when captions are computed (a cached run imports no torch)
    batch = p.caption_batch_size or (lambda: models.auto_caption_batch(p.device))
    entries, _ = step.items(st.cap_keys, compute, batch, "captioner")
    st.captions = [e.meta["caption"] if e else None for e in entries]


def _imported_captions(run: Run, path: str | None, missing_policy: str) -> tuple[dict[int, str], str | None]:
    """(sample index -> caption from the file, the file's hash); missing images are an error unless
    ``--missing-captions caption``."""
    if not path:
        return {}, None
    from pathlib import Path

    from vlcp import caption_files
    from vlcp.cache import file_digest
    from vlcp.distill import DistillError

    st = run.st
    rel = [f"{run.ds.classes[s.class_idx].folder}/{Path(s.source).name}" for s in st.samples]
    found, missing = caption_files.match_captions(rel, caption_files.read_reference_jsonl(path))
    if missing and missing_policy == "error":
        raise DistillError(f"{len(missing)} of {len(rel)} images have no caption in {path}, e.g. "
                           f"{', '.join(missing[:3])}; pass --missing-captions caption to caption them with the "
                           f"captioner")
    if missing:
        run.warn(f"{len(missing)} of {len(rel)} images have no caption in {path}: the captioner describes them")
    run.manifest["imported_captions"] = {"file": str(path), "matched": len(found), "captioned": len(missing)}
    return found, file_digest(path)


# 3. latents -----------------------------------------------------------------------------------------
def latents(run: Run, step: Step) -> None:
    """VAE encoding (posterior mean x scaling factor) at the model's resolution, per image."""
    from vlcp import latents as latents_mod

    p, st = step.p, run.st
    st.lat_keys = [step.key(image=s.digest, vae=run.refs.diffusion.identity, resolution=run.resolution)
                   for s in st.samples]

    def compute(idx):
        z = latents_mod.encode_images(run.models["vae"](), [st.samples[i].load() for i in idx], run.resolution,
                                      p.crop)
        return (({}, {"latent": zi}) for zi in z)

    # not retained: the stages that use latents read them back one class at a time (Entry.read)
    st.lat_entries, _ = step.items(st.lat_keys, compute, p.latent_batch_size, "vae", retain=False)


# 4. outliers ----------------------------------------------------------------------------------------
def outliers(run: Run, step: Step) -> None:
    """LOF per class; a class keeps at least IPC images (the least outlying outliers come back)."""
    p, st = step.p, run.st
    from vlcp import mask_stages as ms

    run.need("outliers", st.lat_entries)
    st.out_key = step.key(latents={f: stable_hash([st.lat_keys[i] for i in st.by_class[c]])
                                   for c, f in enumerate(run.folders)}, n_neighbors=outliers_mod.N_NEIGHBORS,
                          **ms.key_part(run, p.object_masks))
    entry, rep = step.whole(st.out_key, lambda: outliers_mod.per_class(  # foreground-weighted with --object-masks
        ((f, ms.features(run, st.by_class[c], c, p.object_masks)) for c, f in enumerate(run.folders)),
        p.contamination, p.ipc))  # a generator: one class's latents in memory at a time
    rep.details = {**rep.details, "removed_per_class": {f: m["removed"] for f, m in entry.meta.items()}}
    run.manifest["outliers"] = entry.meta
    for f, m in entry.meta.items():
        if m["restored"]:
            run.warn(f"class {f}: LOF would leave fewer than IPC={p.ipc} inliers; kept {m['restored']} of "
                     f"the least outlying outliers")
    st.inliers = [[st.by_class[c][j] for j in np.flatnonzero(entry.tensors[f"mask/{f}"])]
                  for c, f in enumerate(run.folders)]


# 5. clusters ----------------------------------------------------------------------------------------
def clusters(run: Run, step: Step) -> None:
    """K-Means per class (k = IPC, n_init 10, --seed); the centres are the image prototypes. One entry per
    class, not kept in memory: the peak is one class's latents whatever the number of classes."""
    from vlcp import mask_stages as ms
    from vlcp.arrays import array_hash
    from vlcp.distill import DistillError

    p, st = step.p, run.st
    keys = [step.key(outliers=st.out_key, folder=f) for f in run.folders]
    st.cl_key = step.key(outliers=st.out_key)  # all classes' clusters (what text prototypes are keyed by)

    def compute(idx):
        for c in idx:
            f, rows = run.folders[c], st.inliers[c]
            try:
                centres, members, dup = clusters_mod.class_clusters(ms.features(run, rows, c, p.object_masks), rows,
                                                                    p.ipc, p.seed, p.allow_duplicates)
            except clusters_mod.TooFewImages:
                raise DistillError(f"class {f!r} ({run.ds.classes[c].name}) has {len(rows)} usable images, fewer "
                                   f"than --ipc {p.ipc}; lower --ipc or pass --allow-duplicates") from None
            if p.object_masks:
                centres = ms.unmasked_centres(run, members)
            yield ({"members": members, "sizes": [len(m) for m in members], "duplicated": dup,
                    "hashes": {"centres": [array_hash(z) for z in centres]}}, {"centres": centres})

    entries, _ = step.items(keys, compute, 1, retain=False)
    run.need("text_prototypes", entries)
    st.clusters = dict(zip(run.folders, entries))
    ms.record_clusters(run)
    for f, e in st.clusters.items():
        if e.meta["duplicated"]:
            run.warn(f"class {f}: fewer images than --ipc; prototypes repeat (--allow-duplicates)")


# 6. text prototypes ---------------------------------------------------------------------------------
def text_prototypes(run: Run, step: Step) -> None:
    """Algorithm 2 per class: non-representative words N, top-k words R_w, the best member caption."""
    from vlcp import text_prototypes as tp

    p, st = step.p, run.st
    run.need("text_prototypes", st.captions)
    st.tp_key = step.key(clusters=st.cl_key, names=[c.name for c in run.ds.classes], captions={
        f: stable_hash([[st.cap_keys[i], st.samples[i].source] for i in st.inliers[c]])
        for c, f in enumerate(run.folders)})

    def compute():
        meta = {}
        for c, f in enumerate(run.folders):
            rows = st.inliers[c]
            pos = {g: j for j, g in enumerate(rows)}
            members = [[pos[g] for g in m] for m in st.clusters[f].meta["members"]]
            recs = tp.class_prototypes([st.captions[g] for g in rows], members, run.ds.classes[c].name, p.beta,
                                       p.top_k, clean_captions=p.clean_captions)
            for r, m in zip(recs, members):
                r["member"] = st.samples[rows[r["member"]]].source if r["member"] is not None else None
                r["cluster_size"] = len(m)
            meta[f] = recs
        return meta, {}

    entry, _ = step.whole(st.tp_key, compute)
    st.text = entry.meta
    run.files["prototypes.json"] = {"beta": p.beta, "top_k": p.top_k, "classes": {
        f: {"name": run.ds.classes[c].name, "clusters": st.text[f]} for c, f in enumerate(run.folders)}}
    run.manifest["text_prototypes"] = {f: [{k: r[k] for k in ("caption", "score", "fallback", "representative_words",
                                                                "non_representative")} for r in recs]
                                       for f, recs in st.text.items()}


# 7. prompts -----------------------------------------------------------------------------------------
def prompts(run: Run, step: Step) -> None:
    """The text that conditions synthesis, by --text-strategy (paper, Table 5)."""
    from vlcp import prompts as prompts_mod

    p, st = step.p, run.st
    llm = run.refs.text_llm
    st.pr_key = step.key(text_prototypes=st.tp_key, llm=llm.identity if llm else None)

    def compute():
        out = {}
        for c, f in enumerate(run.folders):
            recs, name = st.text[f], run.ds.classes[c].name
            if p.text_strategy == "llm":
                model, tok = run.models["llm"]()
                out[f] = prompts_mod.llm_sentences(model, tok, [prompts_mod.llm_request(name, r) for r in recs])
            else:
                out[f] = [prompts_mod.simple_prompt(p.text_strategy, name, r) for r in recs]
        return out, {}

    entry, _ = step.whole(st.pr_key, compute, "llm")
    st.prompts = entry.meta
    for f in run.folders:
        for r, text in zip(run.files["prototypes.json"]["classes"][f]["clusters"], st.prompts[f]):
            r["prompt"] = text


# 8. finetune ----------------------------------------------------------------------------------------
def finetune(run: Run, step: Step) -> None:
    """Fine-tune the UNet (or a LoRA adapter) on all (latent, caption) pairs with Eq. 1 (Algorithm 1, step 3)."""
    from vlcp import finetune as ft
    from vlcp import text_prototypes as tp

    p, st = step.p, run.st
    fp = ft.FinetuneParams(p.finetune_method, p.finetune_epochs, p.finetune_batch_size, p.finetune_lr,
                           p.finetune_max_steps, p.finetune_lora_rank, p.gradient_checkpointing,
                           p.finetune_checkpoint_every, p.seed, p.finetune_ema, p.finetune_ema_decay,
                           p.finetune_max_grad_norm, p.finetune_accumulation, p.finetune_flip)
    st.ft_key = step.key(captions=stable_hash(st.cap_keys), latents=stable_hash(st.lat_keys),
                         model=run.refs.diffusion.identity)

    texts = [tp.clean_caption(t) if p.clean_captions else t for t in st.captions]

    def compute(fp=fp):
        from vlcp import models

        st.trained_now = True
        full_fp32 = p.finetune_method == "full" and models.half_precision(models.torch_device(p.device))
        master = models.load_unet(run.refs.diffusion, p.device) if full_fp32 else None  # fp32 master weights
        rows = ft.Rows(lambda i: st.lat_entries[i].read()["latent"], len(st.samples))  # read per micro-batch
        weights, meta = ft.train(run.models["pipe"](), rows, texts,
                                 fp, run.cache, st.ft_key, run.cfg.progress, master_unet=master)
        return meta, weights

    together = _train_together(run, st.ft_key, fp, compute)  # a multi-process launch: every process trains
    st.ft_entry, rep = step.whole(st.ft_key, together or compute, "pipe")
    if st.trained_now:  # the final weights are stored: the resumable checkpoint (~14 GB for SD) can go
        ft.drop_checkpoint(run.cache, st.ft_key)
    rep.details = {**rep.details, **{k: st.ft_entry.meta[k] for k in ("steps", "resumed_from", "first_loss",
                                                                      "last_loss") if k in st.ft_entry.meta}}
    run.manifest["finetune"] = {k: v for k, v in st.ft_entry.meta.items() if k != "losses"}
    losses = st.ft_entry.meta["losses"]
    run.writers.append(lambda tmp: ft.loss_plot(losses, tmp / "finetune_loss.png", tmp / "finetune_loss.csv"))


def _train_together(run: Run, key: str, fp, compute):
    """In a multi-process launch with the weights not cached yet, every process joins one data-parallel
    training (``vlcp/ddp.py``) instead of waiting for rank 0; returns what rank 0 then stores (a
    function for ``step.whole``), or None when there is nothing to train together."""
    from dataclasses import replace

    from vlcp import ddp, models, parallel

    w = parallel.world()
    if not w.parallel or run.dry:
        return None
    # one decision for all: a process must not join a training the others skip (the weights could land
    # in the shared cache between two processes' checks)
    if not parallel.agree(run.cache, f"finetune/{key}", lambda: int(run.cache.get("finetune", key) is None), w):
        return None
    run.models["pipe"]()  # every process on its own device (parallel.local_device) before joining
    shard = ddp.join(w.rank, w.size, models.torch_device(run.cfg.device))
    try:
        result = compute(replace(fp, shard=shard))
    except BaseException:
        ddp.leave(shard, finished=False)
        raise
    ddp.leave(shard)
    return lambda: result


def finetuned_pipe(run: Run):
    """The img2img pipeline with the fine-tuned weights (already in place if trained in this run)."""
    from vlcp import finetune as ft

    pipe = run.models["pipe"]()
    st = run.st
    if st.ft_entry is not None and not st.trained_now:
        ft.apply_weights(pipe.unet, run.cfg.finetune_method, st.ft_entry.tensors, run.cfg.finetune_lora_rank)
    return pipe


# 9. synthesis ---------------------------------------------------------------------------------------
def synthesis(run: Run, step: Step) -> None:
    """img2img from each prototype latent with its prompt, per image (one seed per image). Neither the
    centres nor the images stay in memory (``vlcp.arrays``): they are read from the cache when used."""
    from vlcp import synthesis as syn
    from vlcp.arrays import Arrays

    p, st = step.p, run.st
    st.items = [(c, j) for c in range(len(run.folders)) for j in range(p.ipc)]
    st.syn_latents = Arrays.rows(((st.clusters[run.folders[c]], j) for c, j in st.items), "centres")
    st.texts = [st.prompts[run.folders[c]][j] for c, j in st.items]
    st.seeds = [syn.image_seed(p.seed, run.folders[c], j) for c, j in st.items]
    model = run.refs.diffusion.identity
    st.synth_params = p
    st.synth_key = lambda latent, prompt, seed: step.key(latent=latent, prompt=prompt, image_seed=seed,
                                                         finetune=st.ft_key, model=model)
    st.syn_keys = [st.synth_key(z, t, s) for z, t, s in zip(st.syn_latents.digests(), st.texts, st.seeds)]
    entries, _ = step.items(st.syn_keys, lambda idx: generate(run, idx, st.syn_latents, st.texts, st.seeds),
                            p.synthesis_batch_size, "synth", retain=False)
    run.need("output", entries)
    st.images = Arrays.stored(entries, "image")


def generate(run: Run, idx: list[int], lat, texts: list[str], seeds: list[int]):
    """(meta, tensors) per generated image: shared by synthesis and refinement candidates. The meta
    records the image's content hash (``vlcp.arrays``): the stages that key images by content need not
    read it."""
    from vlcp import synthesis as syn
    from vlcp.arrays import array_hash

    p = run.st.synth_params  # the synthesis stage's keyed parameters: every key of these images holds them
    imgs = syn.sample(run.models["synth"](), np.stack([lat[i] for i in idx]), [texts[i] for i in idx],
                      [seeds[i] for i in idx], syn.Sampling(p.negative_prompt, p.strength, p.guidance_scale, p.steps,
                                                            p.long_prompts))
    return (({"prompt": texts[i], "seed": seeds[i], "hashes": {"image": array_hash(im)}}, {"image": im})
            for i, im in zip(idx, imgs))


SYNTHESIS_PARAMS = ("negative_prompt", "strength", "guidance_scale", "steps", "long_prompts", "seed")


# last. output ---------------------------------------------------------------------------------------
def output(run: Run, step: Step) -> None:
    """The ImageFolder, the contact sheets: rebuilt from the cache on every run (cheap, never stale)."""
    from vlcp import output as out
    from vlcp.runner import StageReport

    p, st, classes = step.p, run.st, run.ds.classes
    images: dict[int, list[int]] = {}  # class -> indices into st.images: each image is read when written
    for i, (c, _) in enumerate(st.items):
        images.setdefault(c, []).append(i)
    by_class = {c: st.images.pick(idx) for c, idx in images.items()}
    replaced = sorted(st.replaced)
    pairs = ((st.replaced[i].get(), st.images[i], classes[st.items[i][0]].name) for i in replaced)

    def write(tmp):
        sheet = out.ContactSheet(classes, max((len(v) for v in by_class.values()), default=1))
        out.save_images(tmp, classes, by_class, p.image_size, sheet)  # each image read once, for both
        sheet.image.save(tmp / "preview.png")
        if replaced:
            out.before_after_sheet(pairs, len(replaced)).save(tmp / "preview_refined.png")

    run.writers.append(write)
    run.reports.append(StageReport("output", step.key(images=st.syn_keys), False, len(st.items), 0, False, 0.0))


def _stages() -> list[Stage]:
    from vlcp import caption_match as cm
    from vlcp import mask_stages as ms
    from vlcp import refine_stages as rs
    from vlcp import sas_stages

    from vlcp import finetune as ft
    from vlcp import prompts as prompts_mod

    cap_v, lat_v, ft_v = captions_mod.VERSION, 1, ft.VERSION
    return [
        Stage("images", images, IMAGES_VERSION, "decodes every image once; unreadable files are skipped and listed "
              "in the manifest", "image", inputs="image content hash"),
        Stage("captions", captions, cap_v, "LLaVA description with the paper's prompt, greedy decoding", "image",
              ("caption_prompt", "caption_max_tokens"), selects=("captions_from", "missing_captions"),
              unkeyed=("caption_batch_size", "device"),
              inputs="image hash, class name, captioner id@commit (or the `--captions-from` file's hash)",
              models=("captioner",)),
        Stage("latents", latents, lat_v, "VAE encoding at the model's resolution (512 for SD v1.5), x "
              "`scaling_factor`", "image", ("crop",), unkeyed=("latent_batch_size",),
              inputs="image hash, VAE id@commit, resolution", models=("vae",)),
        *ms.mask_stages(),
        Stage("outliers", outliers, outliers_mod.VERSION, "LOF per class (`n_neighbors=10`, `--contamination`)",
              params=("contamination", "ipc", "object_masks"), inputs="latent keys per class (and mask keys "
              "with `--object-masks`)"),
        Stage("clusters", clusters, clusters_mod.VERSION, "K-Means per class (`k = IPC`, `n_init=10`, `--seed`); "
              "centres = image prototypes", "class", params=("ipc", "seed", "allow_duplicates", "object_masks"),
              inputs="outliers key, class folder"),
        Stage("text_prototypes", text_prototypes, 2, "Algorithm 2: non-representative words N (Eq. 2), top-k "
              "words R_w (Eq. 3), best caption (Eq. 4-5)", params=("beta", "top_k", "clean_captions"),
              inputs="clusters key, caption keys and files of the inliers, class names"),
        Stage("prompts", prompts, prompts_mod.VERSION, "the conditioning text per cluster, by `--text-strategy`",
              params=("text_strategy",), inputs="text prototypes key, LLM id@commit", models=("llm",)),
        Stage("finetune", finetune, ft_v, "fine-tunes the UNet (or a LoRA adapter) on all (latent, caption) pairs "
              "with Eq. 1 (Algorithm 1, step 3)",
              params=("finetune_method", "finetune_epochs", "finetune_batch_size", "finetune_lr",
                      "finetune_max_steps", "finetune_lora_rank", "finetune_ema", "finetune_ema_decay",
                      "finetune_max_grad_norm", "finetune_accumulation", "finetune_flip", "clean_captions", "seed"),
              unkeyed=("finetune_checkpoint_every", "gradient_checkpointing", "device"),
              inputs="caption and latent keys, diffusion id@commit", models=("pipe",), enabled_by="finetune"),
        Stage("synthesis", synthesis, 1, "img2img from each prototype latent (noised to `--strength`, denoised "
              "with its prompt) by the fine-tuned model", "image", SYNTHESIS_PARAMS, selects=("ipc",),
              unkeyed=("synthesis_batch_size",), inputs="prototype latent hash, prompt, image seed, finetune key, "
              "diffusion id@commit", models=("pipe", "synth")),
        *sas_stages.STAGES,
        *rs.STAGES[:2], *ms.foreground_stages(), *cm.image_stages(), *rs.POOL_STAGES, *rs.STAGES[2:4],
        *ms.candidate_foreground_stages(), *cm.candidate_stages(), *rs.STAGES[4:],
        Stage("output", output, 1, "`OUT/<class id>/<index>.png`, `manifest.json`, `prototypes.json`, "
              "`preview.png` (rebuilt from the cache on every run)", params=("image_size",),
              inputs="synthetic image keys"),
    ]


STAGES: list[Stage] = _stages()
STAGE_NAMES: list[str] = [s.name for s in STAGES]


def _flag(enabled_by: str) -> str:
    both = {"sas": "`--post-sample sas`", "sas_foreground": "`--post-sample sas` and `--min-foreground`",
            "sas_refine": "`--post-sample sas` and `--refine`",
            "refine_foreground": "`--refine` and `--min-foreground`"}
    return both.get(enabled_by) or f"`--{enabled_by.replace('_', '-')}`"


def markdown_table() -> str:
    """The README's "What a run does" table, from STAGES (a test keeps the README equal to it)."""
    rows = ["| stage | what it computes | cached per | key holds | runs with |", "|---|---|---|---|---|"]
    for s in STAGES:
        flags = [f"`--{n.replace('_', '-')}`" for n in s.params]
        key = ", ".join(flags + ([s.inputs] if s.inputs else [])) or "-"
        per = {"image": "item", "class": "class", "run": "run"}[s.per]
        rows.append(f"| `{s.name}` | {s.what} | {per} | {key} | "
                    f"{_flag(s.enabled_by) if s.enabled_by else 'always'} |")
    return "\n".join(rows) + "\n"
