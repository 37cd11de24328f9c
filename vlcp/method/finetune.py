"""Stage ``finetune``: adapt the diffusion model to the dataset's (image, caption) pairs (Algorithm 1, step 3).

The standard text-to-image denoising loss (Eq. 1) with the model's own DDPM noise schedule, trained
from the cached latents (the VAE encoder never runs again). ``full`` trains the whole UNet (as the
paper, batch 8, 8 epochs); ``lora`` trains a LoRA adapter through diffusers + peft for one consumer GPU.

The recipe defaults follow the reference (diffusers' ``train_text_to_image.py`` as its scripts call
it): EMA weights (decay 0.9999 with diffusers' ``(1 + s) / (10 + s)`` warm-up; the EMA weights are
the result), gradients clipped to norm 1, 4 micro-batches accumulated per optimizer step, random
horizontal flips, constant learning rate, fp16 autocast on CUDA (gradient checkpointing there only when
the pass does not fit without it: vlcp/method/micro_batch.py, which also fuses micro-batches). What
differs because training reads cached latents: the reference centre-crops and flips *pixels* and
encodes a fresh VAE sample every step; here a flipped sample uses the cached latent of the mirrored crop
when the caller supplies pairs (a 5-D ``latents`` array, ``[:, 1]`` the mirror: the pipeline's default,
stage ``training_latents``), else the latent itself is mirrored (``--finetune-data prototype-latents``:
the VAE is convolutional, so this approximates the flipped image's latent); ``meta["flip"]`` says which.

Precision: full fine-tuning trains fp32 master weights (``master_unet``, loaded in fp32 by the caller,
as diffusers' scripts do; not fp16-rounded weights upcast). LoRA keeps the frozen base in the
pipeline's half precision and only the adapter in fp32. fp16 runs through an AMP GradScaler whose
state is checkpointed, so a resumed run skips exactly the steps an uninterrupted one would.

Resumable: every ``checkpoint_every`` optimizer steps the weights, the optimizer, EMA and scaler
state and the loss history replace the previous checkpoint in the cache; ``drop_checkpoint``
deletes it once the caller has stored the final weights. The data order, the flips and the noise of
micro-batch m depend only on (seed, m), so a resumed run computes exactly what an uninterrupted one
would.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from vlcp.method.micro_batch import Plan, TrainSpeed, draws, predict, prepare
from vlcp.store import checkpoint, ddp, scalars
from vlcp.store.cache import StageCache
from vlcp.store.tensors import numpy_to_state, state_to_numpy

VERSION = 2  # 2: EMA, clipping, accumulation, flips (the reference recipe)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
CHECKPOINT_STAGE = "finetune_checkpoint"


@dataclass
class FinetuneParams:
    method: str = "full"  # full | lora
    epochs: int = 8
    batch_size: int = 8  # per micro-batch
    lr: float | None = None  # default: 1e-5 full, 1e-4 lora
    max_steps: int | None = None  # optimizer steps
    lora_rank: int = 4
    gradient_checkpointing: bool | None = None  # None: on CUDA only when needed to fit (plan), off elsewhere
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (UNet + AdamW + EMA: ~14 GB each)
    seed: int = 0
    ema: bool = True  # reference: --use_ema
    ema_decay: float = 0.9999  # diffusers EMAModel's default
    max_grad_norm: float | None = 1.0  # reference: --max_grad_norm 1; None: no clipping
    accumulation: int = 4  # reference: --gradient_accumulation_steps 4 (batch 8 x 4 = 32 per step)
    flip: bool = True  # reference: --random_flip
    shard: ddp.Shard = ddp.ALONE  # data-parallel: this process's share of every micro-batch (not in the key)
    speed: TrainSpeed = TrainSpeed()  # how passes run (vlcp/method/micro_batch.py): memory and time, not in the key
    precision: str = "fp16"  # autocast: fp16 as the reference (on CUDA), or bf16 (any device; changes results)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.method == "full" else 1e-4)

    def micro_batches(self, n: int) -> int:
        return self.epochs * math.ceil(n / self.batch_size)

    def total_steps(self, n: int) -> int:
        """Optimizer steps: every ``accumulation`` micro-batches, the last one possibly shorter."""
        steps = math.ceil(self.micro_batches(n) / self.accumulation)
        return min(steps, self.max_steps) if self.max_steps else steps

    def uses_gradient_checkpointing(self, device_type: str) -> bool:
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return device_type == "cuda"

    def key_parts(self) -> dict:
        d = asdict(self)
        d.pop("checkpoint_every")  # changes when we save, not what we learn
        d.pop("shard")  # how many processes share the work, not what is learned
        d.pop("speed")  # how the update is split into passes and run, not what it is
        if self.precision == "fp16":
            d.pop("precision")  # the default: keys made before the option stay valid
        d.pop("gradient_checkpointing")
        d["lr"] = self.learning_rate()
        if not self.ema:
            d.pop("ema_decay")
        return d


class Rows:
    """Training latents read a micro-batch at a time (``read(i)``: latent i), so fine-tuning on ImageNet
    (1.28 M latents, ~84 GB at 512 px) never holds them all: ``rows[idx]`` stacks only the rows asked for."""
    def __init__(self, read, n: int, ndim: int = 4):
        self.read, self.n, self.ndim = read, n, ndim  # ndim 5: (N, 2, C, H, W) encoded flip pairs

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx) -> np.ndarray:
        return np.stack([self.read(int(i)) for i in np.atleast_1d(idx)])


def add_lora(unet, rank: int) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def trained_weights(unet, method: str) -> dict:
    if method == "lora":
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(unet)
    else:
        sd = unet.state_dict()
    return state_to_numpy(sd)


def apply_weights(unet, method: str, weights: dict, rank: int) -> None:
    """Put fine-tuned weights (full UNet or LoRA adapter) into a freshly loaded pipeline's UNet."""
    sd = numpy_to_state(weights)
    if method == "lora":
        from peft import set_peft_model_state_dict

        add_lora(unet, rank)
        set_peft_model_state_dict(unet, sd)
    else:
        unet.load_state_dict(sd)


class EMA:
    """Exponential moving average of the trainable parameters, as diffusers' ``EMAModel`` computes it
    (no warm-up power: decay = min(decay, (1 + s) / (10 + s)), s = updates so far - 1; the first
    update copies). Kept in fp32 on the parameters' device."""

    def __init__(self, params: list, decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.last_decay = 0.0  # the decay of the latest update (TensorBoard's finetune/ema_decay)
        self.shadow = [q.detach().float().clone() for q in params]

    def step(self) -> None:
        import torch

        self.updates += 1
        s = self.updates - 1
        decay = self.last_decay = 0.0 if s <= 0 else min(self.decay, (1 + s) / (10 + s))
        with torch.no_grad():
            for sh, q in zip(self.shadow, self.params):
                sh.sub_((1 - decay) * (sh - q.detach().float()))

    def copy_to_params(self) -> None:
        import torch

        with torch.no_grad():
            for sh, q in zip(self.shadow, self.params):
                q.copy_(sh.to(q.dtype))

    def tensors(self) -> dict:
        return {f"ema/{i}": t for i, t in enumerate(self.shadow)}


@dataclass
class _State:
    """Everything one training run mutates."""
    pipe: Any
    unet: Any  # the UNet being trained (the pipeline's, or the fp32 master for full fine-tuning)
    params: list
    opt: Any
    scaler: Any
    ema: EMA | None
    sched: Any
    cuda: bool
    amp: Any = None  # autocast dtype (None: fp32)
    plan: Plan | None = None
    losses: list = field(default_factory=list)


def _setup(pipe, p: FinetuneParams, master_unet) -> _State:
    import torch
    from diffusers import DDPMScheduler

    unet = master_unet if (master_unet is not None and p.method == "full") else pipe.unet
    device = unet.device
    cuda = device.type == "cuda"
    pipe.text_encoder.requires_grad_(False)
    unet.requires_grad_(p.method == "full")
    if p.method == "lora":
        with torch.random.fork_rng(devices=[device] if cuda else []):
            torch.manual_seed(p.seed)  # the adapter's random init follows --seed, not the RNG's history
            add_lora(unet, p.lora_rank)
        if unet.dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            cast_training_params(unet, dtype=torch.float32)  # base stays half, adapter in fp32
    elif unet.dtype != torch.float32:
        unet.to(torch.float32)  # fallback without master_unet: fp16-rounded weights upcast (say so in meta)
    params = [q for q in unet.parameters() if q.requires_grad]
    ddp.same_start(params, p.shard)  # before the EMA copies them
    opt = torch.optim.AdamW(params, lr=p.learning_rate(), weight_decay=1e-2,
                            **({"fused": True} if p.speed.fused_optimizer else {}))
    amp = torch.bfloat16 if p.precision == "bf16" else torch.float16 if cuda else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # bf16 needs no loss scaling
    ema = EMA(params, p.ema_decay) if p.ema else None
    return _State(pipe, unet, params, opt, scaler, ema, DDPMScheduler.from_config(pipe.scheduler.config), cuda, amp)


def _micro_step(s: _State, latents: np.ndarray, captions: list[str], p: FinetuneParams, m: int, weight: float) -> float:
    """Forward and backward of this process's rows of micro-batch m; the loss is scaled by ``weight``
    (1 / micro-batches per step) times the rows' share of the micro-batch, so gradients summed across
    processes are those of the whole micro-batch; returns the share-weighted loss (summed likewise)."""
    import torch
    import torch.nn.functional as F

    d = draws(s, latents, captions, p, m)
    if d is None:  # more processes than rows: this one adds zero gradients
        return 0.0
    z, noise, t, texts, n = d
    share = len(texts) / n
    device = s.unet.device
    pred, target = predict(s, p, z.to(device, torch.float32), noise.to(device), t.to(device), texts)
    loss = F.mse_loss(pred.float(), target)  # Eq. 1
    s.scaler.scale(loss * (weight * share)).backward()
    return float(loss.detach()) * share


def _optimizer_step(s: _State, p: FinetuneParams) -> None:
    import torch

    ddp.sum_gradients(s.params, p.shard)
    if p.max_grad_norm is not None:
        s.scaler.unscale_(s.opt)
        torch.nn.utils.clip_grad_norm_(s.params, p.max_grad_norm)
    s.scaler.step(s.opt)
    s.scaler.update()
    s.opt.zero_grad(set_to_none=True)
    if s.ema is not None:
        s.ema.step()


def _save(s: _State, cache: StageCache, key: str, step: int) -> None:
    trainable = {k: v for k, v in s.unet.named_parameters() if v.requires_grad}
    checkpoint.save(cache, CHECKPOINT_STAGE, key, trainable, s.opt, {"step": step, "losses": s.losses},
                    s.scaler, s.ema.tensors() if s.ema else None)


def train(pipe, latents: np.ndarray | Rows, captions: list[str], p: FinetuneParams, cache: StageCache, ckpt_key: str,
          progress: bool = True, master_unet=None) -> tuple[dict, dict]:
    """Fine-tune ``pipe.unet`` in place; returns (trained weights, meta with the loss curve).

    ``master_unet``: for full fine-tuning on a half-precision pipeline, the UNet loaded in fp32
    (``models.load_unet``); the trained weights are copied into ``pipe.unet`` at the end. The
    checkpoint stays in the cache until ``drop_checkpoint`` (call it once the weights are stored).
    """
    from tqdm.auto import tqdm

    s = _setup(pipe, p, master_unet)
    total, n_micro, start = p.total_steps(len(latents)), p.micro_batches(len(latents)), 0
    ckpt = cache.get(CHECKPOINT_STAGE, ckpt_key)
    if ckpt is not None:
        saved = checkpoint.restore(ckpt, dict(s.unet.named_parameters()), s.opt, s.unet.device, s.scaler,
                                   s.ema.tensors() if s.ema else None)
        start, s.losses = saved["step"], saved["losses"]
        if s.ema:
            s.ema.updates = start
    prepare(s, p, latents)
    s.unet.train()
    bar = tqdm(range(start, total), desc="finetune", initial=start, total=total, leave=False, disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        micro = range(step * p.accumulation, min((step + 1) * p.accumulation, n_micro))
        mine = _gradients(s, latents, captions, p, micro)
        loss = ddp.sum_value(mine, p.shard)  # the whole micro-batches' mean, whatever the process count
        _optimizer_step(s, p)
        s.losses.append(round(loss, 6))
        bar.set_postfix(loss=f"{s.losses[-1]:.4f}")
        _curves(s, step + 1)
        if (step + 1) % p.checkpoint_every == 0 and step + 1 < total and p.shard.rank == 0:
            _save(s, cache, ckpt_key, step + 1)  # the weights are the same in every process: one writes
    bar.close()
    return _finish(s, p, pipe, start, total, time.perf_counter() - t0, latents.ndim == 5)


def _gradients(s: _State, latents, captions: list[str], p: FinetuneParams, micro: range) -> float:
    """The accumulated gradients of one optimizer step's micro-batches, ``s.plan.fuse`` of them per pass;
    returns this process's mean loss. A fused pass out of memory redoes the step at half the fuse (the draws
    depend on (seed, m) only, so the step is the same); a single micro-batch out of memory is the error."""
    import torch

    from vlcp.method.micro_batch import fused_micro_step

    while True:
        fuse = s.plan.fuse
        try:
            if fuse == 1:
                return sum(_micro_step(s, latents, captions, p, m, 1 / len(micro)) for m in micro) / len(micro)
            return sum(fused_micro_step(s, latents, captions, p, micro[i:i + fuse], 1 / len(micro))
                       for i in range(0, len(micro), fuse)) / len(micro)
        except torch.OutOfMemoryError:
            if fuse == 1:
                raise
        # past the handler, so the failed pass's frames and activations are freed before the retry
        s.opt.zero_grad(set_to_none=True)
        if s.cuda:
            torch.cuda.empty_cache()
        half = max(1, fuse // 2)
        s.plan = replace(s.plan, micro_batch=half * p.batch_size, fuse=half, halved=s.plan.halved + 1)


def _curves(s: _State, done: int) -> None:
    """TensorBoard points after optimizer step ``done`` (``--log-dir``): the loss as recorded, lr, EMA decay."""
    scalars.add("finetune/loss", s.losses[-1], done)
    scalars.add("finetune/lr", s.opt.param_groups[0]["lr"], done)
    if s.ema is not None:
        scalars.add("finetune/ema_decay", s.ema.last_decay, done)


def _finish(s: _State, p: FinetuneParams, pipe, start: int, total: int, seconds: float,
            encoded_flips: bool) -> tuple[dict, dict]:
    """EMA weights into the model, gradients and optimizer state freed, the pipeline back to its dtype."""
    import torch

    upcast = p.method == "full" and s.unet is pipe.unet and pipe.text_encoder.dtype != torch.float32

    if s.ema is not None:
        s.ema.copy_to_params()
    for q in s.params:
        q.grad = None
    s.opt.state.clear()
    s.unet.eval()
    if p.speed.compile and s.unet is pipe.unet:  # LoRA: the pipeline's own UNet goes on to synthesis uncompiled
        s.unet._compiled_call_impl = None  # what nn.Module.compile set (torch has no public undo)
    weights = trained_weights(s.unet, p.method)
    if s.unet is not pipe.unet:  # the fp32 master: its weights go into the pipeline's half-precision UNet
        pipe.unet.load_state_dict(s.unet.state_dict())
    pipe.unet.to(pipe.text_encoder.dtype)  # (LoRA adapter included) back to the pipeline's dtype for synthesis
    pipe.unet.requires_grad_(False)
    losses = s.losses
    meta = {"steps": total, "resumed_from": start, "losses": losses, "seconds": round(seconds, 2),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "params": p.key_parts(), "processes": p.shard.size,
            "trainable_parameters": sum(q.numel() for q in s.params),
            "flip": ("encoded" if encoded_flips else "latent-mirror") if p.flip else "off",
            "master_weights": "upcast from half precision" if upcast else "fp32",
            "passes": {**asdict(s.plan), **{k: v for k, v in asdict(p.speed).items() if k != "micro_batch"}}}
    s.ema = None
    s.opt = None
    if s.cuda:
        torch.cuda.empty_cache()
    return weights, meta


def drop_checkpoint(cache: StageCache, ckpt_key: str) -> bool:
    """Delete the fine-tuning checkpoint: call once the final weights are in the cache."""
    return checkpoint.drop(cache, CHECKPOINT_STAGE, ckpt_key)
