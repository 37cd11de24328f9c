"""Stage ``finetune`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from vlcp.report.plots import write_loss_files
from vlcp.store.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def finetune(run: Run, step: Step) -> None:
    """Fine-tune the UNet (or a LoRA adapter) on all (latent, caption) pairs with Eq. 1 (Algorithm 1, step 3)."""
    from vlcp.method import finetune as ft
    from vlcp.method import micro_batch as mb
    from vlcp.method import text_prototypes as tp

    p, st = step.p, run.st
    fp = ft.FinetuneParams(p.finetune_method, p.finetune_epochs, p.finetune_batch_size, p.finetune_lr,
                           p.finetune_max_steps, p.finetune_lora_rank, p.gradient_checkpointing,
                           p.finetune_checkpoint_every, p.seed, p.finetune_ema, p.finetune_ema_decay,
                           p.finetune_max_grad_norm, p.finetune_accumulation, p.finetune_flip,
                           precision=p.finetune_precision)
    pairs = p.finetune_data == "center-crop-pairs"  # else the prototype latents, their mirror for a flip
    data_keys = st.train_keys if pairs else st.lat_keys
    precision = {} if p.finetune_precision == "fp16" else {"precision": p.finetune_precision}  # fp16: keys as before
    st.ft_key = step.key(captions=stable_hash(st.cap_keys), latents=stable_hash(data_keys),
                         model=run.refs.diffusion.identity, **precision)

    texts = [tp.clean_caption(t) if p.clean_captions else t for t in st.captions]

    def compute(fp=fp):
        from dataclasses import replace

        from vlcp.models import loading as models

        st.trained_now = True  # how the passes run: known once the device is (resolving auto imports torch)
        fp = replace(fp, speed=mb.speed_for(_device_type(p.device), p.finetune_micro_batch, p.finetune_compile,
                                            p.finetune_channels_last))
        full_fp32 = p.finetune_method == "full" and models.half_precision(models.torch_device(p.device))
        master = models.load_unet(run.refs.diffusion, p.device) if full_fp32 else None  # fp32 master weights
        if pairs:  # read per micro-batch
            rows = ft.Rows(lambda i: st.train_entries[i].read()["pair"], len(st.samples), ndim=5)
        else:
            rows = ft.Rows(lambda i: st.lat_entries[i].read()["latent"], len(st.samples))
        weights, meta = ft.train(run.models["pipe"](), rows, texts,
                                 fp, run.cache, st.ft_key, run.cfg.progress, master_unet=master)
        meta.update(data=p.finetune_data, resolution=st.train_resolution if pairs else run.resolution)
        return meta, weights

    together = _train_together(run, st.ft_key, fp, compute)  # a multi-process launch: every process trains
    st.ft_entry, rep = step.whole(st.ft_key, together or compute, "pipe")
    if st.trained_now:  # the final weights are stored: the resumable checkpoint (~14 GB for SD) can go
        ft.drop_checkpoint(run.cache, st.ft_key)
    rep.details = {**rep.details, **{k: st.ft_entry.meta[k] for k in ("steps", "resumed_from", "first_loss",
                                                                      "last_loss") if k in st.ft_entry.meta}}
    run.manifest["finetune"] = {k: v for k, v in st.ft_entry.meta.items() if k != "losses"}
    losses = st.ft_entry.meta["losses"]
    run.writers.append(lambda tmp: write_loss_files(losses, tmp / "finetune_loss.png", tmp / "finetune_loss.csv"))


def _device_type(device: str) -> str:
    """``cuda``, ``cpu`` or ``mps`` for the configured ``--device`` (``auto`` resolved), without loading a model."""
    if device != "auto" and ":" not in device:
        return device
    from vlcp.models import loading as models

    return models.torch_device(device).split(":")[0]


def _train_together(run: Run, key: str, fp, compute):
    """In a multi-process launch with the weights not cached yet, every process joins one data-parallel
    training (``vlcp/store/ddp.py``) instead of waiting for rank 0; returns what rank 0 then stores (a
    function for ``step.whole``), or None when there is nothing to train together."""
    from dataclasses import replace

    from vlcp.models import loading as models
    from vlcp.store import ddp, parallel

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
    from vlcp.method import finetune as ft

    pipe = run.models["pipe"]()
    st = run.st
    if st.ft_entry is not None and not st.trained_now:
        ft.apply_weights(pipe.unet, run.cfg.finetune_method, st.ft_entry.tensors, run.cfg.finetune_lora_rank)
    return pipe
