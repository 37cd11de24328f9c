"""Training-time augmentations of the evaluation protocols, on batched tensors on the device.

``dsa``: Differentiable Siamese Augmentation (Zhao & Bilen, 2021) as the DC/DM evaluation uses it:
per batch one family is drawn from color / crop / cutout / flip / scale / rotate, and each image gets
its own random parameters within it (scale 1.2, rotate 15 degrees, crop 0.125, cutout 0.5,
brightness 1.0, saturation 2.0, contrast 0.5).

``minimax``: per-image RandomResizedCrop(scale 0.5-1), horizontal flip, colour jitter 0.4 and PCA
lighting noise 0.1 (torchvision.transforms.v2 functionals), as IDC/Minimax's ImageNet-subset training.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DSA = {"scale": 1.2, "rotate": 15.0, "crop": 0.125, "cutout": 0.5, "brightness": 1.0, "saturation": 2.0,
       "contrast": 0.5}
DSA_FAMILIES = ["color", "crop", "cutout", "flip", "scale", "rotate"]


def _affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def dsa(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One DSA family, per-image parameters; x is (N, C, H, W) in any range."""
    n, dev = x.shape[0], x.device

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(dev)

    family = DSA_FAMILIES[int(torch.randint(len(DSA_FAMILIES), (1,), generator=g))]
    if family == "color":
        x = x + (rand(n, 1, 1, 1) - 0.5) * DSA["brightness"]
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (rand(n, 1, 1, 1) * DSA["saturation"]) + mean
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - mean) * (rand(n, 1, 1, 1) + DSA["contrast"]) + mean
    if family == "flip":
        flip = rand(n) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)
    if family == "scale":
        s = (rand(n, 2) * (DSA["scale"] - 1 / DSA["scale"]) + 1 / DSA["scale"])
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
        return _affine(x, theta)
    if family == "rotate":
        a = (rand(n) - 0.5) * 2 * DSA["rotate"] / 180 * math.pi
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        return _affine(x, theta)
    h, w = x.shape[2], x.shape[3]
    if family == "crop":  # translation by up to 12.5% with zero padding
        sh, sw = int(h * DSA["crop"] + 0.5), int(w * DSA["crop"] + 0.5)
        tx = torch.randint(-sh, sh + 1, (n,), generator=g).to(dev)
        ty = torch.randint(-sw, sw + 1, (n,), generator=g).to(dev)
        padded = F.pad(x, (sw, sw, sh, sh))
        rows = (torch.arange(h, device=dev)[None, :] + tx[:, None] + sh).clamp(0, h + 2 * sh - 1)
        cols = (torch.arange(w, device=dev)[None, :] + ty[:, None] + sw).clamp(0, w + 2 * sw - 1)
        idx = torch.arange(n, device=dev)[:, None, None]
        return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    # cutout: a square of half the side set to zero, centre anywhere
    ch, cw = int(h * DSA["cutout"] + 0.5), int(w * DSA["cutout"] + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n,), generator=g).to(dev)
    cx = torch.randint(0, w + (1 - cw % 2), (n,), generator=g).to(dev)
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    inside_y = (ys[None, :] >= (cy - ch // 2)[:, None]) & (ys[None, :] < (cy - ch // 2 + ch)[:, None])
    inside_x = (xs[None, :] >= (cx - cw // 2)[:, None]) & (xs[None, :] < (cx - cw // 2 + cw)[:, None])
    mask = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return x * mask[:, None].to(x.dtype)


# ImageNet PCA lighting (AlexNet; IDC's Lighting transform)
_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def minimax_train(x: torch.Tensor, size: int, g: torch.Generator, jitter: float = 0.4,
                  lighting: float = 0.1) -> torch.Tensor:
    """Per-image RandomResizedCrop(size, 0.5-1), flip, colour jitter, lighting; x in [0, 1], (N, 3, H, W)."""
    import torchvision.transforms.v2.functional as TF

    out = []
    for img in x:
        h, w = img.shape[-2:]
        for _ in range(10):  # RandomResizedCrop's sampling, with our generator
            area = h * w * float(torch.empty(1).uniform_(0.5, 1.0, generator=g))
            logr = torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
            ratio = float(torch.exp(logr))
            cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            ch, cw = h, w
        top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        img = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
        if float(torch.rand(1, generator=g)) < 0.5:
            img = TF.horizontal_flip(img)
        f = 1 + (torch.rand(3, generator=g) * 2 - 1) * jitter
        img = TF.adjust_brightness(img, float(f[0]))
        if img.shape[0] == 3:  # contrast/saturation/lighting are defined for RGB
            img = TF.adjust_contrast(img, float(f[1]))
            img = TF.adjust_saturation(img, float(f[2]))
        out.append(img)
    x = torch.stack(out).clamp(0, 1)
    if lighting > 0 and x.shape[1] == 3:
        alpha = torch.randn(x.shape[0], 3, generator=g) * lighting
        rgb = (_EIGVEC[None] * (alpha * _EIGVAL[None])[:, None, :]).sum(-1)
        x = x + rgb.to(x.device)[:, :, None, None]
    return x
