"""CLIP as a semantic prior: load a model, embed images and texts (L2-normalised), cache embeddings per item.

Used by the SAS post-sampling selection (``vlcp.method.sas``, vlcp's formulation of SAS from its abstract).
A model is a hub id (default OpenAI ViT-B/32) or a local directory, loaded through transformers'
``CLIPModel`` / ``CLIPProcessor`` (safetensors only, never remote code); ``--tiny`` uses a tiny random
CLIP built from config, like the other tiny models. Embeddings are cached per image content (pixel
hash, so a PNG written by vlcp and the array it came from share an entry) and per text, each keyed by
the CLIP identity: a rerun that only changes selection knobs computes no embedding. No torch import at
module import time.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from vlcp.store.cache import StageCache, stage_key

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the notes' proposed default (OpenAI ViT-B/32)
DEFAULT_CLIP_PROMPT = "a photo of a {name}."
TINY_CLIP_VERSION = 1
TINY_CLIP = f"tiny-clip-v{TINY_CLIP_VERSION}"
IMAGE_STAGE, IMAGE_VERSION = "clip_image", 1
TEXT_STAGE, TEXT_VERSION = "clip_text", 1


# -- identity and keys ----------------------------------------------------------------------------
def pixel_hash(a: np.ndarray) -> str:
    """Content hash of decoded pixels (dtype and shape included); the same formula as distill's array_hash."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()[:32]


def image_key(digest: str, clip_identity: str) -> str:
    """Cache key of one image embedding: the image's content hash and the CLIP identity."""
    return stage_key(IMAGE_STAGE, IMAGE_VERSION, image=digest, model=clip_identity)


def text_key(text: str, clip_identity: str) -> str:
    return stage_key(TEXT_STAGE, TEXT_VERSION, text=text, model=clip_identity)


def class_prompts(names: list[str], template: str = DEFAULT_CLIP_PROMPT) -> list[str]:
    """One prompt per class name; ``{name}`` in the template is replaced (a template without it is refused)."""
    if "{name}" not in template:
        raise ValueError(f"--clip-prompt {template!r} has no {{name}} placeholder")
    return [template.replace("{name}", n) for n in names]


def resolve_clip(name: str | None, tiny: bool, cache: StageCache):
    """The ModelRef of --clip: the given hub id / directory, the tiny CLIP with --tiny, else DEFAULT_CLIP."""
    from vlcp.models.loading import resolve

    if name is None and tiny:
        return resolve(str(tiny_clip(cache.root / "models")), cache)
    return resolve(name or DEFAULT_CLIP, cache)


# -- the tiny model -------------------------------------------------------------------------------
def tiny_parts(out: Path):
    """(byte-level CLIP tokenizer, text-config and vision-config arguments) shared by the tiny CLIP-family
    models (CLIP here, CLIPSeg in ``vlcp/models/segment.py``): 2 layers of width 32, 32 px images."""
    from transformers import CLIPTokenizer

    from vlcp.models.tiny import _byte_vocab

    vocab = _byte_vocab()
    tok_dir = Path(out) / "tokenizer-src"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    layers = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    text = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"], vocab_size=len(vocab), max_position_embeddings=77, **layers)
    return tokenizer, text, dict(image_size=32, patch_size=16, **layers)


def tiny_clip(models_dir: Path) -> Path:
    """The tiny CLIP's directory under models_dir, built (atomically, fixed seed) on first use and
    rebuilt, identical, if damaged."""
    from vlcp.models.tiny import ensure_built

    return ensure_built(Path(models_dir) / TINY_CLIP, build_tiny_clip)


def build_tiny_clip(out: Path) -> None:
    """A 2-layer CLIP (text: byte-level tokenizer as the tiny SD; vision: 32 px, 16 px patches), seed 0."""
    import shutil

    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    torch.manual_seed(0)
    tokenizer, text_kw, vision_kw = tiny_parts(out)
    text = CLIPTextConfig(**text_kw)
    vision = CLIPVisionConfig(**vision_kw)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    shutil.rmtree(Path(out) / "tokenizer-src")


# -- loading and embedding (imports torch) --------------------------------------------------------
def load_clip(ref, device: str):
    """(model, processor) in eval mode; a model that cannot be loaded is a one-line ModelError."""
    from vlcp.models import loading as models

    load = getattr(models, "load_transformers", None) or models._load_transformers  # public name from 0.2 on
    return load(ref, device, "CLIPModel", "CLIPProcessor")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_images(model, processor, images: list[np.ndarray], device: str | None = None,
                 batch_size: int = 64) -> np.ndarray:
    """[N, d] float32 unit vectors of uint8 HWC RGB images, in batches (CLIP's own resize/crop/normalise)."""
    import torch

    dev = next(model.parameters()).device if device in (None, "auto") else device
    dtype = next(model.parameters()).dtype
    out = []
    for s in range(0, len(images), batch_size):
        batch = [np.array(im[..., :3]) if im.ndim == 3 else np.stack([im] * 3, -1)  # writable copies
                 for im in images[s:s + batch_size]]
        inputs = processor(images=batch, return_tensors="pt")
        with torch.inference_mode():
            feats = model.get_image_features(pixel_values=inputs["pixel_values"].to(dev, dtype)).pooler_output
        out.append(feats.float().cpu().numpy())
    return _normalise(np.concatenate(out)) if out else np.zeros((0, model.config.projection_dim), np.float32)


def embed_texts(model, processor, texts: list[str], device: str | None = None, batch_size: int = 64) -> np.ndarray:
    """[N, d] float32 unit vectors of texts (truncated at CLIP's 77 tokens)."""
    import torch

    dev = next(model.parameters()).device if device in (None, "auto") else device
    out = []
    for s in range(0, len(texts), batch_size):
        inputs = processor(text=list(texts[s:s + batch_size]), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            feats = model.get_text_features(input_ids=inputs["input_ids"].to(dev),
                                            attention_mask=inputs["attention_mask"].to(dev)).pooler_output
        out.append(feats.float().cpu().numpy())
    return _normalise(np.concatenate(out)) if out else np.zeros((0, model.config.projection_dim), np.float32)


# -- cached embeddings ----------------------------------------------------------------------------
def cached_image_embeddings(cache: StageCache, ref, digests: list[str], load: Callable[[int], np.ndarray],
                            model, batch_size: int = 64, progress: bool | str = True):
    """(embeddings [N, d], StageReport): cached per (image content, CLIP); only missing ones are computed.

    ``load(i)`` returns image i (uint8 HWC), or None when it cannot be read (its row is NaN, and cached
    so); it is called only for missing items. ``model`` is a ``runner.Lazy`` of (model, processor), so
    a fully cached call never loads CLIP.
    """
    from vlcp.store.runner import run_items

    keys = [image_key(d, ref.identity) for d in digests]

    def compute(idx):
        m, proc = model()
        images = [load(i) for i in idx]
        emb = iter(embed_images(m, proc, [im for im in images if im is not None], None, batch_size))
        bad = np.full(m.config.projection_dim, np.nan, np.float32)
        return [({}, {"embedding": next(emb)}) if im is not None else ({"unreadable": True}, {"embedding": bad})
                for im in images]

    entries, rep = run_items(cache, IMAGE_STAGE, keys, compute, batch_size, model, progress)
    return _stack(entries), rep


def cached_text_embeddings(cache: StageCache, ref, texts: list[str], model, progress: bool | str = False):
    """(embeddings [N, d], StageReport) of texts, cached per (text, CLIP)."""
    from vlcp.store.runner import run_items

    keys = [text_key(t, ref.identity) for t in texts]

    def compute(idx):
        m, proc = model()
        emb = embed_texts(m, proc, [texts[i] for i in idx])
        return (({"text": texts[i]}, {"embedding": e}) for i, e in zip(idx, emb))

    entries, rep = run_items(cache, TEXT_STAGE, keys, compute, 64, model, progress)
    return _stack(entries), rep


def _stack(entries) -> np.ndarray:
    if not entries:
        return np.zeros((0, 0), np.float32)
    return np.stack([e.tensors["embedding"] for e in entries]).astype(np.float32)
