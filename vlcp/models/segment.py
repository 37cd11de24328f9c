"""Text-prompted segmentation (CLIPSeg) for object masks: vlcp's reading of the multi-modal paper's abstract.

The multi-modal distillation paper (Li, Reynaud, Kainz, arXiv 2505.08605) isolates the target object
with segmentation masks; its abstract does not say which segmenter. vlcp's reading (not the authors'
method) uses transformers' CLIPSeg (``CIDAS/clipseg-rd64-refined`` by default), prompted with the
class name or ``--mask-prompt``: a soft mask in [0, 1] (sigmoid of the logits) per image. ``--tiny``
uses a tiny random CLIPSeg built from config (fixed seed), like the other tiny models: its masks are
noise, so tests check the plumbing (shapes, ranges, caching), not the segmentation.

The foreground fraction of an image is the mean of its soft mask. No torch import at module import.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_SEGMENTER = "CIDAS/clipseg-rd64-refined"
TINY_CLIPSEG_VERSION = 1
TINY_CLIPSEG = f"tiny-clipseg-v{TINY_CLIPSEG_VERSION}"
LABEL = "vlcp's reading of the multi-modal paper's abstract (arXiv 2505.08605), not the authors' method"


def prompt_for(name: str, mask_prompt: str | None) -> str:
    """What the segmenter looks for: --mask-prompt (e.g. a super-category) or the class name."""
    return mask_prompt if mask_prompt is not None else name


def resolve_segmenter(name: str | None, tiny: bool, cache):
    """The ModelRef of --segmenter: the given hub id / directory, the tiny CLIPSeg with --tiny, else the default."""
    from vlcp.models.loading import resolve

    if name is None and tiny:
        return resolve(str(tiny_clipseg(cache.root / "models")), cache)
    return resolve(name or DEFAULT_SEGMENTER, cache)


def tiny_clipseg(models_dir: Path) -> Path:
    """The tiny CLIPSeg's directory under models_dir, built (atomically, fixed seed) on first use."""
    from vlcp.models.tiny import ensure_built

    return ensure_built(Path(models_dir) / TINY_CLIPSEG, build_tiny_clipseg)


def build_tiny_clipseg(out: Path) -> None:
    """A 2-layer CLIPSeg (byte-level tokenizer as the tiny CLIP; vision 32 px, 16 px patches), seed 0."""
    import shutil

    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPSegTextConfig,
        CLIPSegVisionConfig,
        ViTImageProcessor,
    )

    from vlcp.models.clip import tiny_parts

    torch.manual_seed(0)
    tokenizer, text_kw, vision_kw = tiny_parts(out)
    text = CLIPSegTextConfig(**text_kw)
    vision = CLIPSegVisionConfig(**vision_kw)
    config = CLIPSegConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16,
                           extract_layers=[0, 1], reduce_dim=16, decoder_num_attention_heads=2,
                           decoder_intermediate_size=32)
    model = CLIPSegForImageSegmentation(config).eval()
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                                        image_std=[0.229, 0.224, 0.225], resample=2)
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    shutil.rmtree(Path(out) / "tokenizer-src")


def load_segmenter(ref, device: str):
    """(model, processor) in eval mode (safetensors only, never remote code); a ModelError if it cannot load."""
    from vlcp.models import loading as models

    return models.load_transformers(ref, device, "CLIPSegForImageSegmentation", "CLIPSegProcessor")


def _rgb(im) -> np.ndarray:
    """uint8 HWC RGB (a PIL image, a grey array or an RGBA array)."""
    a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.array(a[..., :3], dtype=np.uint8)


def masks_for(model, processor, images: list, prompts: list[str], size: int, batch_size: int = 16) -> np.ndarray:
    """[N, size, size] float32 soft masks in [0, 1]: CLIPSeg's sigmoid, resized (bilinear) to ``size``.

    ``images``: PIL images or uint8 HWC arrays; ``prompts``: one text per image (what to segment).
    """
    import torch
    import torch.nn.functional as F

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not images:
        return np.zeros((0, size, size), np.float32)
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out = []
    for s in range(0, len(images), batch_size):
        batch = [_rgb(im) for im in images[s:s + batch_size]]
        inputs = processor(text=list(prompts[s:s + batch_size]), images=batch, padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = model(input_ids=inputs["input_ids"].to(dev), attention_mask=inputs["attention_mask"].to(dev),
                           pixel_values=inputs["pixel_values"].to(dev, dtype)).logits
        logits = logits.float().reshape(len(batch), 1, *logits.shape[-2:])
        probs = torch.sigmoid(F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False))
        out.append(probs[:, 0].cpu().numpy())
    return np.clip(np.concatenate(out), 0.0, 1.0).astype(np.float32)


def foreground_fraction(masks: np.ndarray) -> np.ndarray:
    """[N] mean of each soft mask: the share of the image the segmenter assigns to the object."""
    m = np.asarray(masks, dtype=np.float64)
    return m.reshape(len(m), -1).mean(1) if len(m) else np.zeros(0)
