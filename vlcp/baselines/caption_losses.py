"""Caption matching for DM / DC (``vlcp baseline --caption-loss W``): vlcp's reading of the abstract of
the multi-modal distillation paper (arXiv 2505.08605), which names a caption-based alignment loss
between real and synthetic data but not its form.

vlcp's formulation (option (a) of ``shared/papers/multimodal_dd_full.md``, section 4.4): captioning a
synthetic image is not differentiable, so both sides meet in CLIP's joint space. Per class c, the
target t_c is the normalised mean of the L2-normalised CLIP text embeddings of the captions of c's
real images; the loss is ``L_cap = Σ_c (1 - cos(mean_{s in S_c} f_I(s), t_c))`` with the frozen CLIP
image encoder f_I applied differentiably to the synthetic images (de-normalised, grey made RGB,
bicubic resize to CLIP's input size, CLIP's own normalisation). It is added, weighted by W, to the
DM loss of each iteration / to the DC loss of each outer step.

Captions come from ``--captions FILE``: JSON mapping each class (folder id or name) to the list of
captions of its real images, or a ``.jsonl`` caption file in the reference's format
(``{"file_name": "<class folder>/<file>", "text": ...}`` per line, ``vlcp.data.caption_files``). Without
them the loss is refused. CLIP is ``--clip`` (hub id or directory; default OpenAI ViT-B/32) or, with ``--tiny``, the
tiny random CLIP of ``vlcp.models.clip``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlcp.store.cache import stable_hash


class CaptionError(ValueError):
    pass


@dataclass
class Captions:
    per_class: list[list[str]]  # in dataset class order
    source: str

    def digest(self) -> str:
        return stable_hash(self.per_class)


def load_captions(path: Path | None, classes: list) -> Captions:
    """Captions per class from a JSON file {class folder or name: [caption, ...]}; every class needs one."""
    if path is None:
        raise CaptionError("--caption-loss needs captions of the real images: pass --captions FILE (JSON: class "
                           "folder or name -> list of captions)")
    if str(path).endswith(".jsonl"):  # the reference's / HF imagefolder format: one {file_name, text} per line
        from vlcp.data.caption_files import CaptionFileError, read_reference_jsonl

        try:
            table = read_reference_jsonl(path)
        except CaptionFileError as exc:
            raise CaptionError(str(exc)) from None
        raw: dict = {}
        for file_name, text in table.items():
            raw.setdefault(file_name.rpartition("/")[0], []).append(text)
    else:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise CaptionError(f"--captions {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CaptionError(f"--captions {path}: expected a JSON object mapping classes to lists of captions")
    out = []
    for c in classes:
        texts = raw.get(c.folder, raw.get(c.name))
        if not texts or not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
            raise CaptionError(f"--captions {path}: no captions for class {c.folder!r} ({c.name})")
        out.append([" ".join(t.split()) for t in texts])
    return Captions(out, str(path))


def class_targets(text_emb: np.ndarray, counts: list[int]) -> np.ndarray:
    """Per class: the normalised mean of its (already normalised) caption embeddings, in order."""
    out, start = [], 0
    for n in counts:
        m = text_emb[start:start + n].mean(0)
        out.append(m / max(float(np.linalg.norm(m)), 1e-12))
        start += n
    return np.stack(out).astype(np.float32)


def caption_loss(img_emb, targets, ipc: int):
    """Σ_c (1 - cos(mean of class c's synthetic image embeddings, t_c)); img_emb is class-major (C*ipc, d)."""
    import torch.nn.functional as F

    means = img_emb.view(len(targets), ipc, -1).mean(1)
    return (1 - F.cosine_similarity(means, targets, dim=1)).sum()


def make_term(model, processor, targets: np.ndarray, ipc: int, mean: tuple, std: tuple):
    """syn (normalised with the data's mean/std) -> L_cap, differentiable in syn; CLIP stays frozen."""
    import torch
    import torch.nn.functional as F

    for p in model.parameters():
        p.requires_grad_(False)
    dev = next(model.parameters()).device
    size = model.config.vision_config.image_size
    ip = processor.image_processor
    cm = torch.tensor(ip.image_mean, device=dev).view(1, 3, 1, 1)
    cs = torch.tensor(ip.image_std, device=dev).view(1, 3, 1, 1)
    dm = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    ds = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    t = torch.from_numpy(targets).to(dev)

    def term(syn):
        x = (syn * ds + dm).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        out = model.get_image_features(pixel_values=(x - cm) / cs)
        emb = getattr(out, "pooler_output", out)
        return caption_loss(F.normalize(emb, dim=1), t, ipc)

    return term


@dataclass
class CaptionSpec:
    """What --caption-loss needs besides its weight: the captions and which CLIP."""
    captions: Captions
    clip: str | None = None
    tiny: bool = False

    def key_parts(self, cache) -> dict:
        """Identity of the loss's inputs for the cache key (resolving CLIP loads no model)."""
        from vlcp.models import clip

        return {"clip": clip.resolve_clip(self.clip, self.tiny, cache).identity, "captions": self.captions.digest()}

    def term(self, cache, device: str, ipc: int, mean: tuple, std: tuple):
        """The loss term: CLIP loaded, caption targets embedded (cached per text by vlcp.models.clip)."""
        from vlcp.models import clip
        from vlcp.store.runner import Lazy

        ref = clip.resolve_clip(self.clip, self.tiny, cache)
        model = Lazy(lambda: clip.load_clip(ref, device))
        texts = [t for cls in self.captions.per_class for t in cls]
        emb, _ = clip.cached_text_embeddings(cache, ref, texts, model)
        targets = class_targets(emb, [len(c) for c in self.captions.per_class])
        m, proc = model()
        return make_term(m, proc, targets, ipc, mean, std)
