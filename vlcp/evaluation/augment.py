"""Training-time augmentations of the evaluation protocols, on batched tensors on the device.

``dsa``: Differentiable Siamese Augmentation (Zhao & Bilen, 2021) as the DC/DM evaluation uses it:
per batch one family is drawn from color / crop / cutout / flip / scale / rotate, and each image gets
its own random parameters within it (scale 1.2, rotate 15 degrees, crop 0.125, cutout 0.5,
brightness 1.0, saturation 2.0, contrast 0.5).

``minimax``: per-image RandomResizedCrop(scale 0.5-1), horizontal flip, colour jitter 0.4 and PCA
lighting noise 0.1, as the Minimax script (``04_evaluation/Minimax/data.py:transform_imagenet``): its
jitter applies brightness, contrast and saturation *in random order*, each a ``lerp`` by a factor in
[-0.4, 0.4] (``misc/utils.py:ColorJitter``), and nothing is clamped.

``rded``: RDED's training transform (``04_evaluation/RDED/validation/main.py``): ShufflePatches(factor),
RandomResizedCrop(size, scale=(1/factor, 1)), horizontal flip. ``cutmix_boxes`` is the box sampler both
reference scripts share (``rand_bbox``: one Beta(1, 1) box per batch, a random permutation).

Every random number comes from the caller's ``torch.Generator``.
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


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=g))


def rrc_params(h: int, w: int, scale: tuple[float, float], g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of torchvision's RandomResizedCrop.get_params (ratio 3/4-4/3), seeded by g."""
    for _ in range(10):
        area = h * w * _uniform(g, *scale)
        ratio = math.exp(_uniform(g, math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    in_ratio = w / h  # torchvision's fallback: a central crop with the ratio clamped to the range
    if in_ratio < 3 / 4:
        cw, ch = w, int(round(w / (3 / 4)))
    elif in_ratio > 4 / 3:
        ch, cw = h, int(round(h * (4 / 3)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def shuffle_patches(img: torch.Tensor, factor: int, g: torch.Generator) -> torch.Tensor:
    """RDED's ShufflePatches on one (C, H, W) image: permute ``factor`` column strips, then row strips."""
    if factor <= 1:
        return img
    for dim in (2, 1):
        step = img.shape[dim] // factor
        strips = [img.narrow(dim, i * step, step) for i in range(factor)]
        img = torch.cat([strips[int(j)] for j in torch.randperm(factor, generator=g)], dim)
    return img


def rded_train(x: torch.Tensor, size: int, factor: int, g: torch.Generator) -> torch.Tensor:
    """RDED: ShufflePatches(factor), RandomResizedCrop(size, scale=(1/factor, 1)), flip; x is (N, C, H, W)."""
    import torchvision.transforms.v2.functional as TF

    out = []
    for img in x:
        img = shuffle_patches(img, factor, g)
        top, left, ch, cw = rrc_params(img.shape[-2], img.shape[-1], (1 / factor, 1.0), g)
        img = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
        if float(torch.rand(1, generator=g)) < 0.5:
            img = TF.horizontal_flip(img)
        out.append(img)
    return torch.stack(out)


def _gray(img: torch.Tensor) -> torch.Tensor:
    if img.shape[0] != 3:
        return img.clone()
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).expand(3, -1, -1)


def minimax_jitter(img: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Minimax/IDC ColorJitter: brightness, contrast, saturation in random order, each img.lerp(target, a)."""
    for t in torch.randperm(3, generator=g).tolist():
        a = _uniform(g, -strength, strength)
        if t == 0:
            target = torch.zeros_like(img)
        elif t == 1:
            target = torch.full_like(img, float(_gray(img).mean()))
        else:
            target = _gray(img)
        img = img.lerp(target, a)
    return img


def minimax_train(x: torch.Tensor, size: int, g: torch.Generator, jitter: float = 0.4,
                  lighting: float = 0.1) -> torch.Tensor:
    """Per-image RandomResizedCrop(size, 0.5-1), flip, colour jitter, lighting; x in [0, 1], (N, C, H, W)."""
    import torchvision.transforms.v2.functional as TF

    out = []
    for img in x:
        top, left, ch, cw = rrc_params(img.shape[-2], img.shape[-1], (0.5, 1.0), g)
        img = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
        if float(torch.rand(1, generator=g)) < 0.5:
            img = TF.horizontal_flip(img)
        out.append(minimax_jitter(img, jitter, g))
    x = torch.stack(out)
    if lighting > 0 and x.shape[1] == 3:
        alpha = torch.randn(x.shape[0], 3, generator=g) * lighting
        rgb = (_EIGVEC[None] * (alpha * _EIGVAL[None])[:, None, :]).sum(-1)
        x = x + rgb.to(x.device)[:, :, None, None]
    return x


def cutmix_box(h: int, w: int, alpha: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """The reference ``rand_bbox``: lam ~ Beta(alpha, alpha), side sqrt(1 - lam), centre uniform, clipped."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha != 1.0 else _uniform(g, 0.0, 1.0)
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    return (min(max(cy - cut_h // 2, 0), h), min(max(cx - cut_w // 2, 0), w),
            min(max(cy + cut_h // 2, 0), h), min(max(cx + cut_w // 2, 0), w))


def cutmix(x: torch.Tensor, alpha: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mixed batch, partner index, share of the image kept) with one box per batch, as both scripts do."""
    perm = torch.randperm(len(x), generator=g).to(x.device)
    y1, x1, y2, x2 = cutmix_box(x.shape[-2], x.shape[-1], alpha, g)
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return x, perm, 1 - (y2 - y1) * (x2 - x1) / (x.shape[-2] * x.shape[-1])
