"""Stage ``finetune``: adapt the diffusion model to the dataset's (image, caption) pairs (Algorithm 1, step 3).

The standard text-to-image denoising loss (Eq. 1) with the model's own DDPM noise schedule, trained
from the cached latents (the VAE encoder never runs again). ``full`` trains the whole UNet (as the
paper, batch 8, 8 epochs); ``lora`` trains a LoRA adapter through diffusers + peft for one consumer GPU.

Resumable: every ``checkpoint_every`` steps the weights, the optimizer state and the loss history go
into the cache. The data order and the noise of step s depend only on (seed, s), so a resumed run
computes exactly what an uninterrupted one would.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from vlcp import checkpoint
from vlcp.cache import StageCache, stable_hash

VERSION = 1
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class FinetuneParams:
    method: str = "full"  # full | lora
    epochs: int = 8
    batch_size: int = 8
    lr: float | None = None  # default: 1e-5 full, 1e-4 lora
    max_steps: int | None = None
    lora_rank: int = 4
    gradient_checkpointing: bool = False
    checkpoint_every: int = 200
    seed: int = 0

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.method == "full" else 1e-4)

    def total_steps(self, n: int) -> int:
        steps = self.epochs * math.ceil(n / self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def key_parts(self) -> dict:
        d = asdict(self)
        d.pop("checkpoint_every")  # changes when we save, not what we learn
        d.pop("gradient_checkpointing")
        d["lr"] = self.learning_rate()
        return d


def _batch(step: int, n: int, bs: int, seed: int) -> np.ndarray:
    spe = math.ceil(n / bs)
    perm = np.random.default_rng([seed, step // spe]).permutation(n)
    return perm[(step % spe) * bs:(step % spe + 1) * bs]


def add_lora(unet, rank: int) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def trained_weights(unet, method: str) -> dict:
    if method == "lora":
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(unet)
    else:
        sd = unet.state_dict()
    return {k: v.detach().float().cpu().numpy() for k, v in sd.items()}


def apply_weights(unet, method: str, weights: dict, rank: int) -> None:
    """Put fine-tuned weights (full UNet or LoRA adapter) into a freshly loaded pipeline's UNet."""
    import torch

    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    if method == "lora":
        from peft import set_peft_model_state_dict

        add_lora(unet, rank)
        set_peft_model_state_dict(unet, sd)
    else:
        unet.load_state_dict(sd)


def train(pipe, latents: np.ndarray, captions: list[str], p: FinetuneParams, cache: StageCache, ckpt_key: str,
          progress: bool = True) -> tuple[dict, dict]:
    """Fine-tune ``pipe.unet`` in place; returns (trained weights, meta with the loss curve)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    unet, device = pipe.unet, pipe.unet.device
    cuda = device.type == "cuda"
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    dtype = unet.dtype
    if dtype != torch.float32:
        unet.to(torch.float32)  # master weights in fp32; autocast runs the forward in fp16 on CUDA
    pipe.text_encoder.requires_grad_(False)
    unet.requires_grad_(p.method == "full")
    if p.method == "lora":
        add_lora(unet, p.lora_rank)
    if p.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [q for q in unet.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=p.learning_rate(), weight_decay=1e-2)
    total, start, losses = p.total_steps(len(latents)), 0, []
    ckpt = cache.get("finetune_checkpoint", ckpt_key)
    if ckpt is not None:
        saved = checkpoint.restore(ckpt, dict(unet.named_parameters()), opt, device)
        start, losses = saved["step"], saved["losses"]
    scaler = torch.amp.GradScaler(enabled=cuda)
    unet.train()
    bar = tqdm(range(start, total), desc="finetune", initial=start, total=total, leave=False, disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        idx = _batch(step, len(latents), p.batch_size, p.seed)
        g = torch.Generator().manual_seed(int(stable_hash([p.seed, step], 15), 16))
        z = torch.from_numpy(latents[idx]).to(device, torch.float32)
        noise = torch.randn(z.shape, generator=g).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z),), generator=g).to(device)
        ids = pipe.tokenizer([captions[i] for i in idx], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            cond = pipe.text_encoder(ids)[0].to(torch.float32)
        target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(z, noise, t)
        with torch.autocast(device.type, enabled=cuda):
            pred = unet(noise_sched.add_noise(z, noise, t), t, cond).sample
        loss = F.mse_loss(pred.float(), target)  # Eq. 1
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(round(float(loss.detach()), 6))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % p.checkpoint_every == 0 and step + 1 < total:
            trainable = {k: v for k, v in unet.named_parameters() if v.requires_grad}
            checkpoint.save(cache, "finetune_checkpoint", ckpt_key, trainable, opt, {"step": step + 1, "losses": losses})
    bar.close()
    meta = {"steps": total, "resumed_from": start, "losses": losses, "seconds": round(time.perf_counter() - t0, 2),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "params": p.key_parts(), "trainable_parameters": sum(q.numel() for q in params)}
    unet.eval()
    weights = trained_weights(unet, p.method)
    if dtype != torch.float32:
        unet.to(dtype)  # back to the pipeline's dtype for synthesis
    return weights, meta


def loss_plot(losses: list[float], path_png, path_csv) -> str:
    """finetune_loss.png with matplotlib when installed, else finetune_loss.csv; returns the file name."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path_csv.write_text("step,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(losses)))
        return path_csv.name
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(losses)), losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss (Eq. 1)")
    ax.set_title("vlcp finetune")
    fig.tight_layout()
    fig.savefig(path_png, dpi=100)
    plt.close(fig)
    return path_png.name
