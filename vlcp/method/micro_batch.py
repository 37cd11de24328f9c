"""How fine-tuning runs (issue 25): the micro-batch from memory, gradient checkpointing only when needed,
channels_last, fused AdamW, a compiled UNet; the recipe's effective batch and update are kept.

The reference updates once per 8 x 4 = 32 samples. SD's UNet normalises with GroupNorm (no batch
statistics), so one forward/backward of 32 samples gives the same update as 4 of 8 when memory allows.
To make it the *same* update and not just the same kind: a fused pass runs ``fuse`` consecutive recipe
micro-batches (``FinetuneParams.batch_size`` each) in one forward/backward, each drawing its samples,
flips, noise and timesteps from (seed, its recipe index m) with ``draws``, as ``finetune._micro_step`` does,
and each weighted as that micro-step would weight it; both run the UNet through ``predict``. Only memory use and float rounding change, so nothing
here is in the cache key.

On CUDA ``plan`` measures the peak of one pass (zeros in, no optimizer step, gradients dropped after):
first without gradient checkpointing, which is turned on only when the recipe's micro-batch does not fit
next to the optimizer state; then it takes the largest whole split that fits. A pass that still runs out of
memory is redone at half the size (``finetune._gradients``): the draws depend only on (seed, m), so the
step is the same.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vlcp.store.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.method.finetune import FinetuneParams, Rows, _State

HEADROOM = 0.85  # of the memory left for passes: allocator fragmentation, cuDNN workspaces, the text encoder


@dataclass(frozen=True)
class TrainSpeed:
    """How fine-tuning runs, never what it learns beyond float rounding: none of it is in the cache key."""
    micro_batch: int | None = None  # samples per forward/backward; None: from memory (fit_memory) or the recipe's
    fit_memory: bool = False  # CUDA: measure one pass, choose checkpointing and the micro-batch from it
    channels_last: bool = False  # UNet and latents in NHWC, the layout cuDNN's fast convolutions use
    fused_optimizer: bool = False  # AdamW's fused kernel: one launch for all parameters, not one per tensor
    compile: str | None = None  # torch.compile backend of the UNet being trained (None: eager)


def speed_for(device_type: str, micro_batch: int | None = None, compile_unet: bool = False,
              channels_last: bool = False) -> TrainSpeed:
    """What ``vlcp distill`` runs: on CUDA the memory fit and fused AdamW; inductor and channels_last when asked
    (channels_last is opt-in for training: CUDA's GroupNorm has no NHWC kernel, so every GroupNorm of the UNet
    converts layouts, forward and backward; whether it pays is for ``benchmarks/real_shapes.py --compare``)."""
    cuda = device_type == "cuda"
    return TrainSpeed(micro_batch, fit_memory=cuda, channels_last=channels_last, fused_optimizer=cuda,
                      compile="inductor" if compile_unet else None)


@dataclass(frozen=True)
class Plan:
    """What ``plan`` chose, recorded in the fine-tuning meta (``manifest.json``'s ``finetune.passes``)."""
    micro_batch: int  # samples per pass
    fuse: int  # recipe micro-batches per pass
    gradient_checkpointing: bool
    fits: int | None = None  # samples one pass may hold, as measured (None: not measured)
    halved: int = 0  # times a pass ran out of memory and the step was redone at half the size


def check_micro_batch(micro: int, batch_size: int, accumulation: int) -> None:
    """An explicit ``--finetune-micro-batch`` must be whole recipe micro-batches and divide the update."""
    effective = batch_size * accumulation
    if micro % batch_size or effective % micro:
        raise ValueError(f"must be a multiple of --finetune-batch-size ({batch_size}) that divides the update of "
                         f"{effective} samples (batch size x accumulation), got {micro}")


def plan(p: FinetuneParams, device_type: str, measure: Callable[[bool, int], float | None] | None = None,
         available: float = 0.0) -> Plan:
    """The passes of one optimizer step. ``measure(checkpointing, n)``: the peak bytes one pass of n samples
    adds (None: out of memory); ``available``: the bytes passes may use. Without ``measure`` (off CUDA, or
    not asked): the explicit micro-batch or the recipe's, checkpointing as configured (default on CUDA only)."""
    requested = p.speed.micro_batch
    if requested is not None:
        check_micro_batch(requested, p.batch_size, p.accumulation)
    if measure is None:
        micro = requested or p.batch_size
        return Plan(micro, micro // p.batch_size, p.uses_gradient_checkpointing(device_type))
    probe = requested or p.batch_size
    choices = [p.gradient_checkpointing] if p.gradient_checkpointing is not None else [False, True]
    for ckpt in choices:
        peak = measure(ckpt, probe)
        fits = 0 if peak is None else int(available * HEADROOM // (peak / probe))
        if fits >= probe:  # without checkpointing when the probed pass fits next to the optimizer state
            break
    micro = requested or micro_batch(p.batch_size * p.accumulation, p.batch_size, fits)[0]
    return Plan(micro, micro // p.batch_size, ckpt, fits)


def cuda_measure(s, p: FinetuneParams, shape: tuple) -> tuple[Callable[[bool, int], float | None], float]:
    """(measure, available) for ``plan`` on the training's own UNet: the peak one forward/backward of zeros with
    the real text-conditioning shape adds to the weights, the EMA and the gradients (per n samples of the whole
    micro-batches: in a data-parallel run this process's share of them); ``available`` is the free memory less
    the gradients and the AdamW state still to come."""
    import torch

    unet, dev = s.unet, s.unet.device

    def measure(ckpt: bool, n: int) -> float | None:
        set_checkpointing(unet, ckpt)
        for q in s.params:  # allocated before the baseline, as they are while micro-batches accumulate into them
            q.grad = torch.zeros_like(q)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        try:
            _probe_pass(s, p, shape, -(-n // p.shard.size))  # data-parallel: this process's rows of n
            torch.cuda.synchronize(dev)
            peak = max(torch.cuda.max_memory_allocated(dev) - before, 1)
        except torch.OutOfMemoryError:
            peak = None
        # past the handler: the failed pass's frames and the tensors they held are gone
        for q in s.params:
            q.grad = None
        torch.cuda.empty_cache()
        return peak

    free, _ = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    grads = sum(q.numel() * q.element_size() for q in s.params)
    adam = 0 if s.opt.state else 2 * sum(q.numel() * 4 for q in s.params)  # exp_avg, exp_avg_sq in fp32
    return measure, free - grads - adam


def prepare(s: _State, p: FinetuneParams, latents) -> None:
    """Layout, then the passes (``micro_batch.plan``: measured on CUDA in that layout), checkpointing and
    compilation. Runs after a checkpoint is restored: the optimizer state follows the weights' new layout."""
    import torch

    measure, available = None, 0.0
    s.unet.train()
    if p.speed.channels_last:
        s.unet.to(memory_format=torch.channels_last)
        match_layout(s.opt)
    if p.speed.fit_memory and s.cuda:
        shape = training_batch(latents, np.zeros(1, int), np.zeros(1, bool)).shape[1:]
        measure, available = cuda_measure(s, p, shape)
    s.plan = plan(p, s.unet.device.type, measure, available)
    set_checkpointing(s.unet, s.plan.gradient_checkpointing)
    if p.speed.compile:
        s.unet.compile(backend=p.speed.compile)


def match_layout(opt) -> None:
    """Each optimizer state tensor shaped like its parameter in the parameter's memory layout: a fused AdamW
    kernel requires it (CUDA refuses; the CPU kernel silently mis-pairs elements), and a restored state comes
    back NCHW while the weights were turned channels_last."""
    import torch

    for q, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == q.shape and v.stride() != q.stride():
                st[k] = torch.empty_like(q, dtype=v.dtype).copy_(v)


def _probe_pass(s, p: FinetuneParams, shape: tuple, n: int) -> None:
    """One forward/backward of n zero latents with empty-prompt conditioning, as a training pass runs it."""
    import torch

    dev = s.unet.device
    zeros = torch.zeros((n, *shape), device=dev)
    pred, target = predict(s, p, zeros, zeros, torch.zeros(n, dtype=torch.long, device=dev), [""] * n)
    (pred.float() - target).pow(2).mean().backward()


def set_checkpointing(unet, on: bool) -> None:
    if on:
        unet.enable_gradient_checkpointing()
    elif getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()


def micro_batch(effective: int, requested_micro: int, fits: int | None) -> tuple[int, int]:
    """(micro-batch, accumulation) with micro x accumulation == ``effective``.

    ``fits`` None (off CUDA, or not measured): the configured micro-batch, unchanged. Else the largest
    multiple of ``requested_micro`` dividing ``effective`` with at most ``fits`` samples (whole recipe
    micro-batches, so the samples drawn stay those of the recipe); the configured one when none fits.
    """
    if requested_micro < 1 or effective % requested_micro:
        raise ValueError(f"effective batch {effective} is not a multiple of the micro-batch {requested_micro}")
    if fits is None:
        return requested_micro, effective // requested_micro
    units = effective // requested_micro
    best = max((requested_micro * u for u in range(1, units + 1) if units % u == 0 and requested_micro * u <= fits),
               default=requested_micro)
    return best, effective // best


def fused_micro_step(s, latents, captions: list[str], p: FinetuneParams, ms: range | list[int],
                     weight: float) -> float:
    """One forward/backward of recipe micro-batches ``ms`` together; the gradient and the returned
    share-weighted loss are the sums of what ``finetune._micro_step(.., m, weight)`` gives for each m."""
    import torch

    device = s.unet.device
    zs, noises, ts, coef, texts, reported = [], [], [], [], [], 0.0
    for m in ms:
        d = draws(s, latents, captions, p, m)
        if d is None:
            continue
        z, noise, t, rows_texts, n = d
        zs.append(z), noises.append(noise), ts.append(t)
        coef += [1 / n] * len(rows_texts)  # mean over the rows' elements x share = sum / n
        texts += rows_texts
    if not zs:
        return reported
    z, noise, t = torch.cat(zs).to(device, torch.float32), torch.cat(noises).to(device), torch.cat(ts).to(device)
    c = torch.tensor(coef, dtype=torch.float32, device=device)
    pred, target = predict(s, p, z, noise, t, texts)
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)  # Eq. 1 per sample
    loss = (per_sample * c).sum()
    s.scaler.scale(loss * weight).backward()
    return float(loss.detach())


def draws(s, latents, captions: list[str], p: FinetuneParams, m: int) -> tuple | None:
    """What recipe micro-batch m trains on, drawn from (seed, m) only, for this process's rows: (latents, noise,
    timesteps on the CPU, their captions, the micro-batch's size); None when no row of it is this process's.
    The noise and timesteps are the whole micro-batch's, whichever rows are ours."""
    import torch

    idx = _batch(m, len(latents), p.batch_size, p.seed)
    flips = _flips(m, len(idx), p.seed) if p.flip else np.zeros(len(idx), bool)
    z = torch.from_numpy(training_batch(latents, idx, flips))
    g = torch.Generator().manual_seed(int(stable_hash([p.seed, m], 15), 16))
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, s.sched.config.num_train_timesteps, (len(z),), generator=g)
    rows = p.shard.rows(len(idx))
    if not len(rows):  # more processes than rows: this one adds zero gradients
        return None
    if p.shard.parallel:
        z, noise, t = z[rows], noise[rows], t[rows]
    return z, noise, t, [captions[idx[r]] for r in rows], len(idx)


def predict(s, p: FinetuneParams, z, noise, t, texts: list[str]):
    """(the UNet's prediction, Eq. 1's target) for latents ``z`` noised by ``noise`` at timesteps ``t`` (on the
    UNet's device) with the captions ``texts``: one pass as training runs it (autocast, the layout)."""
    import torch

    pipe, device = s.pipe, s.unet.device
    ids = pipe.tokenizer(texts, padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].to(device)
    target = noise if s.sched.config.prediction_type == "epsilon" else s.sched.get_velocity(z, noise, t)
    with torch.autocast(device.type, dtype=s.amp, enabled=s.amp is not None):
        pred = s.unet(as_layout(s.sched.add_noise(z, noise, t), p), t, cond).sample
    return pred, target


def as_layout(x, p: FinetuneParams):
    """The UNet's input in the memory layout the UNet was put in (``TrainSpeed.channels_last``)."""
    import torch

    return x.contiguous(memory_format=torch.channels_last) if p.speed.channels_last else x


# The draws of one recipe micro-batch (``draws`` above), here so that fine-tuning and the fused pass share
# them without micro_batch importing fine-tuning back.
def _batch(step: int, n: int, bs: int, seed: int) -> np.ndarray:
    """The sample indices of micro-batch ``step`` (a fresh permutation per epoch)."""
    spe = math.ceil(n / bs)
    perm = np.random.default_rng([seed, step // spe]).permutation(n)
    return perm[(step % spe) * bs:(step % spe + 1) * bs]


def _flips(m: int, k: int, seed: int) -> np.ndarray:
    """Which of the k samples of micro-batch m are flipped (probability 1/2, from (seed, m) only)."""
    return np.random.default_rng([seed, m, 2]).random(k) < 0.5


def training_batch(latents: np.ndarray | Rows, idx: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """The latents of samples ``idx``, ``flips`` of them mirrored: from pairs (N, 2, C, H, W) the cached
    latent of the mirrored crop ([:, 1]); from single latents (N, C, H, W) the latent flipped along its width."""
    rows = latents[idx]  # one read per sample (Rows: a micro-batch at a time)
    if rows.ndim == 5:
        return np.ascontiguousarray(rows[np.arange(len(idx)), flips.astype(int)])
    rows = np.array(rows, copy=True)
    rows[flips] = rows[flips][..., ::-1]
    return rows
