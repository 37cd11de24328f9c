"""Object masks of real images for the masked matching losses (``vlcp baseline --masks SOURCE``).

The multi-modal distillation paper (arXiv 2505.08605) restricts feature alignment and gradient
matching to the object; its abstract does not say how the masks are made. vlcp's reading offers:

- ``threshold``: for low-resolution grey data on a flat background (digits, Fashion-MNIST, MNIST).
  The background level of an image is the median of its one-pixel border (grey = channel mean);
  foreground = pixels whose grey value differs from it by more than ``margin`` intensity levels.
  Works offline, no model.
- ``clipseg``: text-prompted segmentation from the object-mask stage of the generative pipeline —
  not built yet, so it is refused with a clear error.

A masked image keeps its foreground and replaces the background by the image's own background
level (``x~ = m * x + (1 - m) * b``, b = border median): on a flat background this only removes
background noise, and the masked image stays on the data's intensity scale.
"""
from __future__ import annotations

import numpy as np

SOURCES = ["threshold"]
PLANNED = {"clipseg": "needs the object-mask (CLIPSeg) stage of the generative pipeline, which is not built yet"}
DEFAULT_MARGIN = 8


class MaskError(ValueError):
    pass


def check_source(source: str | None) -> None:
    """Refuse an unknown or not-yet-available mask source before any work is done."""
    if source is None or source in SOURCES:
        return
    if source in PLANNED:
        raise MaskError(f"--masks {source}: {PLANNED[source]}; available now: {', '.join(SOURCES)}")
    raise MaskError(f"unknown mask source {source!r}; available: {', '.join(SOURCES)}")


def background_level(x: np.ndarray) -> np.ndarray:
    """Per-image background grey level: the median of the one-pixel border. x: uint8 (N, C, H, W)."""
    grey = x.astype(np.float32).mean(1)
    border = np.concatenate([grey[:, 0, :], grey[:, -1, :], grey[:, 1:-1, 0], grey[:, 1:-1, -1]], axis=1)
    return np.median(border, axis=1)


def threshold_mask(x: np.ndarray, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Boolean foreground mask (N, H, W): |grey - background level| > margin."""
    grey = x.astype(np.float32).mean(1)
    return np.abs(grey - background_level(x)[:, None, None]) > margin


def apply_mask(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 images with the background (mask False) set to each image's background level."""
    fill = np.rint(background_level(x)).astype(np.uint8)[:, None, None, None]
    return np.where(mask[:, None], x, fill).astype(np.uint8)


def masked(x: np.ndarray, source: str | None, margin: float = DEFAULT_MARGIN) -> tuple[np.ndarray, dict]:
    """The images to match against, and a summary for the manifest (mean foreground fraction)."""
    check_source(source)
    if source is None:
        return x, {"source": None}
    m = threshold_mask(x, margin)
    return apply_mask(x, m), {"source": source, "margin": margin, "foreground_fraction": round(float(m.mean()), 4)}
