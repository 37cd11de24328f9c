"""GPU cost of a SAS pool (vlcp's formulation of SAS from its abstract): img2img per image and CLIP per image.

Random weights of the real architectures (timings do not depend on the values; no download needed):
Stable Diffusion v1.5's UNet and VAE, and a ViT-B/32 CLIP (transformers' CLIPConfig defaults). One
img2img image = VAE encode at 512 px + round(strength * steps) UNet steps with classifier-free guidance
(batch doubled) + VAE decode; the text encoder is left out (once per prompt). Prints the extra time a
pool of m x IPC per class costs over IPC per class. Needs a CUDA GPU and diffusers.

    python benchmarks/sas_pool_cost.py --classes 10 --ipc 10 --m 5
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def _timed(fn, sync, repeats: int = 3) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def img2img_seconds_per_image(batch: int, steps: int, strength: float, device: str) -> float:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).to(device, torch.float16).eval()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512).to(device, torch.float16).eval()
    x = torch.randn(batch, 3, 512, 512, device=device, dtype=torch.float16)
    text = torch.randn(2 * batch, 77, 768, device=device, dtype=torch.float16)
    n_steps = round(strength * steps)

    @torch.inference_mode()
    def run():
        z = vae.encode(x).latent_dist.mean
        for t in range(n_steps):
            zz = torch.cat([z, z])
            eps = unet(zz, 999 - t * (1000 // steps), encoder_hidden_states=text).sample
            z = z - 0.01 * eps[:batch]
        vae.decode(z)

    return _timed(run, torch.cuda.synchronize, 2) / batch


def clip_images_per_second(batch: int, device: str, with_processor: bool) -> float:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    model = CLIPModel(CLIPConfig()).to(device, torch.float16).eval()
    proc = CLIPImageProcessor()
    images = [np.random.default_rng(i).integers(0, 256, (512, 512, 3), dtype=np.uint8) for i in range(batch)]
    pixels = proc(images=images, return_tensors="pt")["pixel_values"].to(device, torch.float16)

    @torch.inference_mode()
    def run():
        pv = proc(images=images, return_tensors="pt")["pixel_values"].to(device, torch.float16) \
            if with_processor else pixels
        model.get_image_features(pixel_values=pv).pooler_output.float().cpu()

    return batch / _timed(run, torch.cuda.synchronize)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--m", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strength", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=10, help="img2img images per batch")
    a = ap.parse_args()
    import torch

    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    s_img = img2img_seconds_per_image(a.batch, a.steps, a.strength, dev)
    clip_model = clip_images_per_second(256, dev, False)
    clip_full = clip_images_per_second(256, dev, True)
    base, pool = a.classes * a.ipc, a.classes * a.ipc * a.m
    print(f"img2img (SD v1.5 size, 512 px, {round(a.strength * a.steps)} of {a.steps} steps, CFG, fp16, "
          f"batch {a.batch}): {s_img:.3f} s/image")
    print(f"CLIP ViT-B/32 fp16 batch 256: {clip_model:.0f} images/s (model only), {clip_full:.0f} images/s "
          f"(with CLIPImageProcessor from 512 px uint8)")
    extra_gen = (pool - base) * s_img
    clip_s = pool / clip_full
    print(f"{a.classes} classes x IPC {a.ipc}: {base} images; pool m = {a.m}: {pool} images")
    print(f"extra generation {pool - base} x {s_img:.3f} s = {extra_gen:.1f} s; CLIP over the pool {clip_s:.1f} s; "
          f"total extra {extra_gen + clip_s:.1f} s ({(extra_gen + clip_s) / 60:.1f} min)")


if __name__ == "__main__":
    main()
