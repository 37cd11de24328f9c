"""``vlcp evaluate --caption-fusion``: caption concatenation, vlcp's reading of the multi-modal paper's abstract.

The multi-modal distillation paper (arXiv 2505.08605; ``shared/papers/multimodal_dd_full.md``) names
*caption concatenation* — caption embeddings fused with visual features in the classifier — but its
abstract gives no formula. vlcp's reading, not the authors' method:

- The classifier is the protocol's evaluation network whose penultimate features f(x)
  (``networks.embed``) are concatenated with the frozen, L2-normalised CLIP text embedding t of the
  image's text, rescaled to unit RMS per entry (t * sqrt(d): a unit-norm 512-d vector has entries of
  ~0.04, ConvNet-3's features an RMS of ~0.5 at initialisation, so the head can use t within the
  protocol's epochs); a new linear head maps [f(x) ; t * sqrt(d)] (features + text dim) to the
  classes. The network's own classifier is unused.
- Training images: the prompt each image was generated from when the folder is a ``vlcp distill``
  output (``train/metadata.jsonl``'s ``prompt``; in a folder written before it, ``prototypes.json``: class
  folder -> ``clusters[j].prompt`` for ``<folder>/<j>.png``, with SAS post-sampling the kept image's
  prototype from ``manifest.json``); otherwise (real images, other tools' folders, ``--full``) the
  captioner's caption.
- Test images: the captioner's caption. The prompt must not name the class (``{CLASSNAME}``): the
  distill captions stage's prompt does (``vlcp.models.captioner.PROMPT``), so fusion uses that prompt with the
  class replaced by "the object" for every image it captions. Captions are cached exactly as the
  distill captions stage caches them (same stage, same key: image hash, class name, prompt, max tokens,
  captioner identity, decoding as distill's default `--caption-mode reference`), so captions ``vlcp distill`` made with the same prompt are reused;
  the captioner never receives the class name.
- Training follows the protocol (optimiser, schedule, batch, epochs, image augmentation; the text
  rides along unchanged), without CutMix/MixUp (a caption describes the whole image, not a mix of
  two): a protocol that mixes trains this row without it and says so. rded (a teacher's soft labels
  of CutMix-ed images) is refused.

It changes the test-time input (each test image's caption), so its accuracy is a separate, labelled
row — never the headline. No torch import at module import.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vlcp.evaluation.protocols import EvalError
from vlcp.models import captioner as captions
from vlcp.store import scalars

LABEL = ("caption concatenation [visual features ; CLIP text embedding of the image's caption]: vlcp's reading of "
         "the multi-modal paper's abstract (arXiv 2505.08605), not the authors' method")
NOTE = "changes the test-time input (each test image's caption): not comparable to the headline"
DEFAULT_PROMPT = captions.format_prompt(captions.PROMPT, "object")  # the distill prompt, the class left out
CAPTION_STAGE = "captions"  # the distill captions stage's cache stage and key (see caption_key)


@dataclass
class Fusion:
    """The resolved models and settings of one fused evaluation (resolved before any training)."""
    captioner: object  # ModelRef
    clip: object  # ModelRef
    prompt: str
    max_tokens: int
    batch: int | None  # captioning batch; None: from the device's memory (as distill)
    device: str
    protocol: object  # the evaluation Protocol without mixing
    changes: dict = field(default_factory=dict)
    mode: str = "reference"  # captions made as `vlcp distill`'s default --caption-mode makes them
    seed: int = 0  # ... and its default --caption-seed, so distill's captions are reused


@dataclass
class Split:
    """Images of one side (training or test) with what their texts need: samples (digests) and class names."""
    samples: list
    x: np.ndarray
    y: np.ndarray
    names: list[str]  # per image: its class name (in the caption key only; the captioner never sees it)
    prompts: dict[str, str] | None = None  # '<class folder>/<file>' -> generating prompt (distill folders)


def prepare(cfg, p, cache, device: str) -> Fusion:
    """Check the settings and resolve the captioner and CLIP (one-line ModelError if missing) before training."""
    from vlcp.models import clip
    from vlcp.models import loading as models

    if p.name == "rded" or p.kd_temperature:
        raise EvalError("--caption-fusion: the rded protocol trains on a teacher's soft labels of CutMix-ed images, "
                        "which a caption cannot follow; use --protocol dc or minimax")
    prompt = cfg.fusion_prompt or DEFAULT_PROMPT
    if "{CLASSNAME}" in prompt:
        raise EvalError("--fusion-caption-prompt must not contain {CLASSNAME}: test images are captioned without "
                        "their label")
    name = cfg.captioner
    if name is None and cfg.tiny:
        from vlcp.models.tiny import tiny_models

        name = str(tiny_models(cache.root / "models")[1])
    captioner = models.resolve(name or models.DEFAULT_CAPTIONER, cache)
    clip_ref = clip.resolve_clip(cfg.clip, cfg.tiny, cache)
    changes = {}
    if p.cutmix or p.mixup:
        p = replace(p, cutmix=0.0, mixup=0.0)
        changes["cutmix/mixup"] = "off for this row: a caption describes the whole image, not a mix of two"
    mode, seed = "reference", 0  # distill's defaults (--caption-mode, --caption-seed): the same cache entries
    max_tokens = 32 if cfg.tiny else captions.default_max_tokens(mode)
    return Fusion(captioner, clip_ref, prompt, max_tokens, 32 if cfg.tiny else None, device, p, changes, mode, seed)


def folder_prompts(folder: Path | None) -> dict[str, str] | None:
    """'<class folder>/<file>' -> the prompt that generated the image, for a folder ``vlcp distill`` wrote: its
    ``train/metadata.jsonl``, else (a folder written before it) ``prototypes.json`` and ``manifest.json``'s
    post_sampling.images, read as the output stage reads them (``vlcp.store.output.prototype_records``);
    None for any other folder."""
    from vlcp.store.output import read_metadata

    if folder is None:
        return None
    prompts = {}
    for records in (_json_records(Path(folder)), read_metadata(Path(folder)) or {}):  # the rows with the images win
        prompts.update({k: r["prompt"] for k, r in records.items() if isinstance(r.get("prompt"), str)})
    return prompts or None


def _json_records(folder: Path) -> dict[str, dict]:
    from vlcp.store.output import prototype_records

    try:
        protos = json.loads((folder / "prototypes.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return prototype_records(protos, manifest)


def caption_key(digest: str, class_name: str, fu: Fusion) -> str:
    """The key the distill captions stage gives this caption (``Step.key`` of stage ``captions``)."""
    from vlcp.store.cache import KEY_LAYOUT, stage_key

    return stage_key(CAPTION_STAGE, captions.VERSION, layout=KEY_LAYOUT,
                     params={"caption_prompt": fu.prompt, "caption_max_tokens": fu.max_tokens},
                     image=digest, class_name=class_name, model=fu.captioner.identity,
                     decoding=captions.decoding(fu.mode, fu.seed))


def captions_for(fu: Fusion, cache, samples: list, names: list[str], progress: bool | str = False
                 ) -> tuple[list[str], dict]:
    """Captions of every image (cached per image, shared with distill); (texts, computed/cached counts)."""
    from vlcp.models import loading as models
    from vlcp.store.cache import file_digest
    from vlcp.store.runner import Lazy, run_items

    digests = [s.digest or file_digest(s.source) for s in samples]
    keys = [caption_key(d, n, fu) for d, n in zip(digests, names)]
    model = Lazy(lambda: models.load_captioner(fu.captioner, fu.device))

    def compute(idx):
        m, proc = model()
        seeds = [captions.item_seed(fu.seed, digests[i]) for i in idx]
        texts = captions.caption_images(m, proc, [samples[i].load() for i in idx], [""] * len(idx),
                                        fu.prompt, fu.max_tokens, fu.mode, seeds)  # no class name reaches it
        for i, t in zip(idx, texts):
            if not t.strip():
                raise EvalError(f"the captioner returned empty text for {samples[i].source}; try another "
                                f"--fusion-caption-prompt or --captioner")
            yield {"caption": t}, None

    batch = fu.batch or (lambda: models.auto_caption_batch(fu.device))
    entries, rep = run_items(cache, CAPTION_STAGE, keys, compute, batch, model, progress)
    return [e.meta["caption"] for e in entries], {"computed": rep.items_computed, "cached": rep.items_cached}


def texts_for(fu: Fusion, cache, split: Split, progress: bool) -> tuple[list[str], dict]:
    """Per image its generating prompt where the folder records one, else its caption."""
    rel = [f"{Path(s.source).parent.name}/{Path(s.source).name}" for s in split.samples]
    prompts = split.prompts or {}
    need = [i for i, r in enumerate(rel) if r not in prompts]
    caps, counts = ([], {"computed": 0, "cached": 0}) if not need else captions_for(
        fu, cache, [split.samples[i] for i in need], [split.names[i] for i in need], progress and "captions")
    texts = [prompts.get(r) for r in rel]
    for i, c in zip(need, caps):
        texts[i] = c
    return texts, {"prompts": len(rel) - len(need), "captions": len(need), **counts}


def text_embeddings(fu: Fusion, cache, texts: list[str]) -> np.ndarray:
    """[N, d] L2-normalised CLIP text embeddings, cached per (text, CLIP) as everywhere in vlcp."""
    from vlcp.models import clip
    from vlcp.store.runner import Lazy

    model = Lazy(lambda: clip.load_clip(fu.clip, fu.device))
    emb, _ = clip.cached_text_embeddings(cache, fu.clip, texts, model)
    return emb


# -- the fused classifier ---------------------------------------------------------------------------
def build_fused(p, num_classes: int, text_dim: int):
    """The protocol's network with a new head over [penultimate features ; text embedding]."""
    import torch
    from torch import nn

    from vlcp.evaluation import networks

    class FusedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = networks.build(p.model, p.channels, num_classes, p.image_size)
            self.head = nn.Linear(networks.feature_dim(self.base) + text_dim, num_classes)

        def forward(self, x, t):
            t = t.to(x.dtype) * math.sqrt(t.shape[1])  # unit norm -> unit RMS per entry, the features' scale
            return self.head(torch.cat([networks.embed(self.base, x), t], 1))

    return FusedNet()


def fused_accuracy(net, test: tuple, p, device: str, batch: int = 500) -> float:
    """Top-1 of the fused net on (uint8 images, labels, text embeddings)."""
    import torch

    from vlcp.evaluation.training import net_input

    x, y, t = test
    net.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out = net(net_input(x[i:i + batch], p, device), torch.from_numpy(t[i:i + batch]).to(device))
            correct += int((out.argmax(1).cpu().numpy() == y[i:i + batch]).sum())
    net.train()
    return correct / len(x)


def train_fused(p, data: tuple, test: tuple, seed: int, device: str, progress: bool | str = False,
                curve: str | None = None) -> tuple:
    """Train a fresh fused net: ``data = (x, y, text, classes)``, ``test = (x, y, text)``; (net, result).
    The protocol's optimiser, lr schedule, batch size and image augmentation; every random choice seeded.
    ``curve``: the TensorBoard section (``--log-dir``) of its per-epoch ``loss`` and ``lr`` (the epoch's first, as
    ``training.train`` records it) and its final ``test_accuracy``, by default ``caption_fusion/run<seed>``."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from vlcp.evaluation.training import _augment, _optimizer, set_lr

    x, y, text, num_classes = data
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = build_fused(p, num_classes, text.shape[1]).to(device)
    opt = _optimizer(net, p)
    bs = min(p.batch_size, len(x))
    steps = math.ceil(len(x) / bs)
    mean = torch.tensor(p.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(p.std, device=device).view(1, -1, 1, 1)
    xt, yt, tt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(np.asarray(text, np.float32))
    losses, lrs = [], []
    for epoch in tqdm(range(p.epochs), desc=progress if isinstance(progress, str) else "fusion", leave=False,
                      disable=progress is False):
        perm, tot = torch.randperm(len(x), generator=g), 0.0
        for s in range(steps):
            set_lr(opt, p, epoch, s, steps, lrs)
            idx = perm[s * bs:(s + 1) * bs]
            xb = _augment(xt[idx].to(device).float() / 255, p, g, mean, std)
            loss = F.cross_entropy(net(xb, tt[idx].to(device)), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        losses.append(tot / len(x))
        with scalars.section(curve or f"caption_fusion/run{seed}"):
            scalars.add("loss", losses[-1], epoch + 1)
            scalars.add("lr", lrs[-1], epoch + 1)
    acc = fused_accuracy(net, test, p, device)
    with scalars.section(curve or f"caption_fusion/run{seed}"):
        scalars.add("test_accuracy", acc, p.epochs)
    return net, {"accuracy": acc, "best_during_training": None, "losses": losses, "lrs": lrs,
                 "head_input": net.head.in_features}


def evaluate_fused(fu: Fusion, cache, train: Split, test: Split, num_classes: int, seeds: int,
                   progress: bool) -> dict:
    """The separate, labelled fusion row: texts, their embeddings, one fused training per seed."""
    from vlcp.evaluation.training import summarise

    train_texts, train_counts = texts_for(fu, cache, train, progress)
    test_texts, test_counts = texts_for(fu, cache, test, progress)
    emb = text_embeddings(fu, cache, train_texts + test_texts)
    tr, te = emb[:len(train_texts)], emb[len(train_texts):]
    runs = []
    for seed in range(seeds):
        _, res = train_fused(fu.protocol, (train.x, train.y, tr, num_classes), (test.x, test.y, te), seed, fu.device,
                             progress and f"fusion seed {seed}")
        runs.append({"seed": seed, **res, "final_loss": round(res["losses"][-1], 4) if res["losses"] else None})
    return {"label": LABEL, "note": NOTE, "accuracy": summarise(runs), "seeds": runs,
            "head_input": {"features": runs[0]["head_input"] - emb.shape[1], "text": int(emb.shape[1])},
            "texts": {"train": train_counts, "test": test_counts}, "caption_prompt": fu.prompt,
            "caption_max_tokens": fu.max_tokens, "captioner": fu.captioner.identity, "clip": fu.clip.identity,
            "protocol_changes": fu.changes}
