"""One way to bring a PIL image to a square size, shared by latents and evaluation (so they cannot drift).

``resize_crop(img, size)`` squashes to size x size (the VLCP reference's latent preprocessing);
``resize_crop(img, size, crop_to)`` is torchvision's Resize(size) on the short side followed by
CenterCrop(crop_to) (the Minimax and RDED test transforms). Bicubic, as vlcp has always resized.
"""
from __future__ import annotations


def resize_crop(img, size: int, crop_to: int | None = None):
    """PIL image -> PIL image: squashed to ``size``, or short side to ``size`` then centre ``crop_to``."""
    from PIL import Image

    if crop_to:
        s = size / min(img.size)
        img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
        left, top = (img.width - crop_to) // 2, (img.height - crop_to) // 2
        return img.crop((left, top, left + crop_to, top + crop_to))
    if img.size != (size, size):
        return img.resize((size, size), Image.BICUBIC)
    return img
