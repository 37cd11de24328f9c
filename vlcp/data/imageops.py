"""One way to bring a PIL image to a square size, for every evaluation read (so train and test cannot drift).

``resize_crop(img, size)`` squashes to size x size; ``resize_crop(img, size, crop_to)`` is torchvision's
``Resize(size)`` on the short side followed by ``CenterCrop(crop_to)``, pixel for pixel (the Minimax and
RDED transforms: long side truncated, crop offsets rounded). ``resample``: bicubic, as vlcp has always
resized, or bilinear, torchvision's default and so both reference scripts'.
"""
from __future__ import annotations

RESAMPLE = ("bicubic", "bilinear")


def resize_crop(img, size: int, crop_to: int | None = None, resample: str = "bicubic"):
    """PIL image -> PIL image: squashed to ``size``, or short side to ``size`` then centre ``crop_to``."""
    from PIL import Image

    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; known: {', '.join(RESAMPLE)}")
    f = Image.Resampling[resample.upper()]
    if crop_to:
        w, h = img.size
        long = int(size * max(w, h) / min(w, h))  # torchvision's _compute_resized_output_size
        nw, nh = (size, long) if w <= h else (long, size)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), f)
        top, left = int(round((nh - crop_to) / 2.0)), int(round((nw - crop_to) / 2.0))  # CenterCrop's offsets
        return img.crop((left, top, left + crop_to, top + crop_to))
    if img.size != (size, size):
        return img.resize((size, size), f)
    return img
