"""Stage ``latents``: VAE encodings of the real images (paper, section 3.3.1).

Images are resized to ``resolution`` x ``resolution`` without cropping, as the public reference code
does (``crop="center"`` resizes the short side and centre-crops instead). The stored latent is the
*mean* of the VAE's latent distribution (the reference samples from it; the mean makes reruns exact),
multiplied by ``vae.config.scaling_factor`` so it can be fed to the diffusion model as it is.
"""
from __future__ import annotations

import numpy as np

VERSION = 1


def preprocess(img, resolution: int, crop: str = "none") -> np.ndarray:
    """PIL RGB -> CHW float32 in [-1, 1] at resolution x resolution."""
    from PIL import Image

    if crop == "center":
        scale = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                         Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    else:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return a.transpose(2, 0, 1)


def encode_images(vae, images: list, resolution: int, crop: str = "none") -> np.ndarray:
    import torch

    x = torch.from_numpy(np.stack([preprocess(im, resolution, crop) for im in images]))
    x = x.to(vae.device, vae.dtype)
    with torch.inference_mode():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return z.float().cpu().numpy()
