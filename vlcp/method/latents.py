"""Stage ``latents``: VAE encodings of the real images (paper, section 3.3.1).

Images are resized to ``resolution`` x ``resolution`` without cropping, as the public reference code
does (``crop="center"`` resizes the short side and centre-crops instead). The stored latent is the
*mean* of the VAE's latent distribution (the reference samples from it; the mean makes reruns exact),
multiplied by ``vae.config.scaling_factor`` so it can be fed to the diffusion model as it is.
``encode_training_pairs`` makes the fine-tuning data of stage ``training_latents``: the reference's
centre crop and its mirror.
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


def encode_images(vae, images: list, resolution: int, crop: str = "none",
                  channels_last: bool | None = None) -> np.ndarray:
    x = np.stack([preprocess(im, resolution, crop) for im in images])
    return _encode(vae, x, channels_last)


def _encode(vae, x: np.ndarray, channels_last: bool | None) -> np.ndarray:
    """Posterior means x scaling factor of the CHW batch ``x``. ``channels_last`` (None: on CUDA, issue 25):
    the VAE and its input in NHWC, the layout cuDNN's fast fp16 convolutions take; the same latents to
    float rounding (tests/test_throughput.py)."""
    import torch

    # a copy in torch's own (64-byte aligned) memory: CPU kernels round differently with the input's
    # alignment, and a numpy array's depends on how it was allocated
    t = torch.from_numpy(np.ascontiguousarray(x)).to(vae.device, vae.dtype, copy=True)
    if vae.device.type == "cuda" if channels_last is None else channels_last:
        if not getattr(vae, "_vlcp_channels_last", False):
            vae.to(memory_format=torch.channels_last)
            vae._vlcp_channels_last = True
        t = t.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        z = vae.encode(t).latent_dist.mean * vae.config.scaling_factor
    return z.float().cpu().numpy()


TRAINING_VERSION = 1


def training_view(img, resolution: int) -> np.ndarray:
    """PIL RGB -> CHW float32 in [-1, 1]: what diffusers' ``train_text_to_image.py`` feeds the VAE with
    ``--center_crop`` (before its flip): ``Resize(resolution)`` (short side, bilinear, long side truncated)
    then ``CenterCrop(resolution)`` (offsets rounded), ``ToTensor``, ``Normalize(0.5, 0.5)``."""
    from vlcp.data.imageops import resize_crop

    a = np.asarray(resize_crop(img.convert("RGB"), resolution, resolution, "bilinear"), dtype=np.float32)
    return (a / 127.5 - 1.0).transpose(2, 0, 1)


def encode_training_pairs(vae, images: list, resolution: int, channels_last: bool | None = None) -> np.ndarray:
    """(N, 2, C, h, w) latents for fine-tuning: [:, 0] of the centre crop, [:, 1] of its mirror.

    The reference fine-tunes on centre crops (512 px; 32 px for CIFAR) with random horizontal flips,
    computed from the pixels every step; caching both latents once lets ``finetune.train`` draw the flip
    per sample (from the seed and the micro-batch) with the VAE never running again. What stays
    different: the cached latent is the posterior *mean*, where the reference encodes a fresh sample
    (``latent_dist.sample()``) every step. Prototype latents stay as ``encode_images`` makes them.
    """
    x = np.stack([training_view(im, resolution) for im in images])
    z = _encode(vae, np.concatenate([x, x[..., ::-1]]), channels_last)  # CHW: the last axis is the width
    n = len(images)
    return np.stack([z[:n], z[n:]], axis=1)
