"""The fine-tuning micro-batch from memory, with the recipe's effective batch kept.

The reference updates once per 8 x 4 = 32 samples. SD's UNet normalises with GroupNorm (no batch
statistics), so one forward/backward of 32 samples gives the same update as 4 of 8 when memory allows.
To make it the *same* update and not just the same kind: a fused pass runs ``fuse`` consecutive recipe
micro-batches (``FinetuneParams.batch_size`` each) in one forward/backward, each drawing its samples,
flips, noise and timesteps from (seed, its recipe index m) exactly as ``finetune._micro_step`` does, and
each weighted as that micro-step would weight it. Only memory use and float rounding change, so ``fuse``
stays out of the cache key.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from vlcp.store.cache import stable_hash

if TYPE_CHECKING:
    from vlcp.method.finetune import FinetuneParams, Rows


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


def fuse_for(p: FinetuneParams, fits: int | None) -> int:
    """How many recipe micro-batches one pass runs (``FinetuneParams.fuse``) when ``fits`` samples fit."""
    micro, _ = micro_batch(p.batch_size * p.accumulation, p.batch_size, fits)
    return micro // p.batch_size


def fused_micro_step(s, latents, captions: list[str], p: FinetuneParams, ms: range | list[int],
                     weight: float) -> float:
    """One forward/backward of recipe micro-batches ``ms`` together; the gradient and the returned
    share-weighted loss are the sums of what ``finetune._micro_step(.., m, weight)`` gives for each m."""
    import torch

    pipe, unet, device = s.pipe, s.unet, s.unet.device
    zs, noises, ts, coef, texts, reported = [], [], [], [], [], 0.0
    for m in ms:  # the draws of micro-batch m, as _micro_step makes them
        idx = _batch(m, len(latents), p.batch_size, p.seed)
        flips = _flips(m, len(idx), p.seed) if p.flip else np.zeros(len(idx), bool)
        z = torch.from_numpy(training_batch(latents, idx, flips))
        g = torch.Generator().manual_seed(int(stable_hash([p.seed, m], 15), 16))
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, s.sched.config.num_train_timesteps, (len(z),), generator=g)
        rows = p.shard.rows(len(idx))
        if not len(rows):
            continue
        if p.shard.parallel:
            z, noise, t = z[rows], noise[rows], t[rows]
        zs.append(z), noises.append(noise), ts.append(t)
        coef += [1 / len(idx)] * len(rows)  # mean over the rows' elements x share = sum / len(idx)
        texts += [captions[idx[r]] for r in rows]
    if not zs:
        return reported
    z, noise, t = torch.cat(zs).to(device, torch.float32), torch.cat(noises).to(device), torch.cat(ts).to(device)
    c = torch.tensor(coef, dtype=torch.float32, device=device)
    ids = pipe.tokenizer(texts, padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].to(device)
    target = noise if s.sched.config.prediction_type == "epsilon" else s.sched.get_velocity(z, noise, t)
    with torch.autocast(device.type, enabled=s.cuda):
        pred = unet(s.sched.add_noise(z, noise, t), t, cond).sample
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)  # Eq. 1 per sample
    loss = (per_sample * c).sum()
    s.scaler.scale(loss * weight).backward()
    return float(loss.detach())


# The draws of one recipe micro-batch, shared with vlcp/method/finetune.py (which imports them from here, so
# the fused pass below can make them without importing fine-tuning back).
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
