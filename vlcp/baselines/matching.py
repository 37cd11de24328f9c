"""Optimisation-based distillation: Distribution Matching (DM) and Gradient Matching (DC with DSA).

Both learn the pixels of IPC synthetic images per class, initialised from randomly chosen real
images (seeded), with SGD (momentum 0.5) on the images. Defaults are those of the public reference
code (VICO-UoE/DatasetCondensation, ``main_DM.py`` and ``main.py``), each overridable:

- ``dm`` (Zhao & Bilen, WACV 2023): every iteration draws a fresh random ConvNet-3; per class, the
  mean embedding of ``batch_real`` (256) augmented real images must match the mean embedding of the
  class's augmented synthetic images (squared L2, summed over classes); image lr 1.0, 20 000 iterations.
- ``dc`` (Zhao et al., ICLR 2021, with DSA: Zhao & Bilen, ICML 2021): every iteration draws a fresh
  ConvNet-3; ``outer_loop`` times it matches, per class, the network's gradients on a real batch
  and on the class's synthetic images with the layer-wise distance ``match_loss('ours')`` (sum over
  output channels of 1 - cosine; bias and norm vectors count 0) and takes one image step; between
  matches the network trains ``inner_loop`` epochs on the synthetic set (SGD lr 0.01, batch 256, DSA);
  image lr 0.1, 1000 iterations, loops (outer, inner) = (1, 1) IPC 1, (10, 50) IPC 10, (20, 25) IPC 20,
  (30, 20) IPC 30, (40, 15) IPC 40, (50, 10) IPC 50.
- DSA is siamese: per class one family and one parameter set, applied to the real batch and to the
  synthetic images alike (the reference's batch mode), strategy color_crop_cutout_flip_scale_rotate.

Masked variants (vlcp's reading of the multi-modal paper's abstract, arXiv 2505.08605): with
``masks`` (``threshold`` or ``clipseg``) the *real* side is replaced by masked real images
(``vlcp.baselines.masks``) — masked feature alignment for DM, masked gradient matching for DC. The synthetic
side is not masked: its pixels are what is learned (a mask would freeze its background) and test
images are never masked. CLIPSeg masks are cached per image (stage ``matching_masks``); the result's
key holds the segmenter's identity and the prompt of every class.

Determinism and resume: the randomness of iteration ``it`` (network init, real batches, DSA) comes
from a generator seeded by (seed, it) only, so a run resumed from a checkpoint (synthetic pixels +
optimiser momentum) reproduces the uninterrupted run, and a longer run continues a shorter one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from vlcp.baselines import masks as mask_mod
from vlcp.baselines.matching_losses import dm_loss, match_distance, siamese_dsa
from vlcp.store import scalars
from vlcp.store.cache import stable_hash, stage_key

METHODS = ["dm", "dc"]
VERSION = 1
STAGE = "matching"
CHECKPOINT_STAGE = "matching_checkpoint"
DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
DEFAULTS = {"dm": {"iterations": 20000, "lr_img": 1.0, "batch_real": 256},
            "dc": {"iterations": 1000, "lr_img": 0.1, "batch_real": 256}}
EMBED_CHUNK = 1024  # real images per no-grad forward pass (bounds memory, keeps batches large)


class MatchError(ValueError):
    pass


@dataclass
class MatchConfig:
    method: str
    ipc: int
    iterations: int
    lr_img: float
    batch_real: int
    momentum_img: float = 0.5
    lr_net: float = 0.01
    batch_train: int = 256
    outer_loop: int = 1
    inner_loop: int = 1
    dsa: bool = True
    masks: str | None = None
    mask_margin: float = mask_mod.DEFAULT_MARGIN
    init: str = "real"
    model: str = "convnet3"
    seed: int = 0
    caption_loss: float = 0.0  # weight of vlcp.baselines.caption_losses's term; 0: off
    segmenter: mask_mod.Segmenter | None = None  # --masks clipseg: which segmenter, which prompt (key: its identity)


def make_config(method: str, ipc: int, seed: int = 0, masks: str | None = None, **overrides) -> MatchConfig:
    """The paper defaults for ``method`` at ``ipc``, with every non-None override applied."""
    if method not in METHODS:
        raise MatchError(f"unknown matching method {method!r}; known: {', '.join(METHODS)}")
    mask_mod.check_source(masks)
    vals: dict = dict(DEFAULTS[method])
    if method == "dc":
        loops = DC_LOOPS.get(ipc)
        if loops is None and (overrides.get("outer_loop") is None or overrides.get("inner_loop") is None):
            raise MatchError(f"DC's outer/inner loops are published for IPC {', '.join(map(str, DC_LOOPS))}; "
                             f"pass --outer-loop and --inner-loop for IPC {ipc}")
        if loops:
            vals["outer_loop"], vals["inner_loop"] = loops
    vals.update({k: v for k, v in overrides.items() if v is not None})
    cfg = MatchConfig(method=method, ipc=ipc, seed=seed, masks=masks, **vals)
    if masks != "threshold":
        cfg.mask_margin = mask_mod.DEFAULT_MARGIN  # irrelevant without threshold masks: keep it out of the key
    cfg.segmenter = (cfg.segmenter or mask_mod.Segmenter()) if masks == "clipseg" else None
    if cfg.init not in ("real", "noise"):
        raise MatchError(f"unknown init {cfg.init!r}; known: real, noise")
    for name in ("iterations", "batch_real", "batch_train", "outer_loop", "inner_loop"):
        if getattr(cfg, name) < 1:
            raise MatchError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    return cfg


# -- losses ---------------------------------------------------------------------------------------

# -- one iteration of each method ---------------------------------------------------------------
@dataclass
class Real:
    """Normalised real images on the device (masked if asked), and each class's indices into them."""
    x: object
    per_class: list
    caption: object = None  # syn -> caption-matching loss (vlcp.baselines.caption_losses), or None


def _batch(real: Real, c: int, n: int, g):
    import torch

    idx = real.per_class[c]
    pick = idx[torch.randperm(len(idx), generator=g)[:n].to(idx.device)]
    return real.x[pick]


def _embed(net, x):
    import torch

    with torch.no_grad():
        return torch.cat([net.embed(x[i:i + EMBED_CHUNK]) for i in range(0, len(x), EMBED_CHUNK)])


def dm_iteration(cfg: MatchConfig, net, real: Real, syn, opt, g) -> float:
    """One DM step: real batches embedded without gradients, all synthetic images in one batch."""
    import torch

    for p in net.parameters():
        p.requires_grad_(False)
    reals, syns = [], []
    for c in range(len(real.per_class)):
        xr, xs = _batch(real, c, cfg.batch_real, g), syn[c * cfg.ipc:(c + 1) * cfg.ipc]
        if cfg.dsa:
            aug = siamese_dsa(g)
            xr, xs = aug(xr), aug(xs)
        reals.append(xr)
        syns.append(xs)
    er = _embed(net, torch.cat(reals)).split([len(x) for x in reals])
    es = net.embed(torch.cat(syns)).split(cfg.ipc)
    loss = dm_loss(er, es)
    if real.caption is not None:
        loss = loss + cfg.caption_loss * real.caption(syn)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()) / len(reals)


def dc_iteration(cfg: MatchConfig, net, real: Real, syn, opt, g) -> float:
    """One DC step: outer_loop gradient matches, each followed by inner_loop epochs of network training."""
    import torch
    import torch.nn.functional as F

    from vlcp.evaluation.augment import dsa

    params = list(net.parameters())
    opt_net = torch.optim.SGD(params, lr=cfg.lr_net)
    n_cls, total = len(real.per_class), 0.0
    labels = torch.arange(n_cls, device=syn.device).repeat_interleave(cfg.ipc)
    for ol in range(cfg.outer_loop):
        opt.zero_grad(set_to_none=True)
        for c in range(n_cls):
            xr, xs = _batch(real, c, cfg.batch_real, g), syn[c * cfg.ipc:(c + 1) * cfg.ipc]
            if cfg.dsa:
                aug = siamese_dsa(g)
                xr, xs = aug(xr), aug(xs)
            yr = torch.full((len(xr),), c, device=syn.device)
            gr = [t.detach() for t in torch.autograd.grad(F.cross_entropy(net(xr), yr), params)]
            ys = torch.full((len(xs),), c, device=syn.device)
            gs = torch.autograd.grad(F.cross_entropy(net(xs), ys), params, create_graph=True)
            loss = match_distance(gr, gs)
            torch.autograd.backward(loss, inputs=[syn])  # per class: the graph is freed at once
            total += float(loss.detach())
        if real.caption is not None:
            cap = cfg.caption_loss * real.caption(syn)
            torch.autograd.backward(cap, inputs=[syn])
            total += float(cap.detach())
        opt.step()
        if ol == cfg.outer_loop - 1:
            break
        xs_all = syn.detach().clone()
        for _ in range(cfg.inner_loop):
            perm = torch.randperm(len(xs_all), generator=g).to(syn.device)
            for i in range(0, len(perm), cfg.batch_train):
                xb, yb = xs_all[perm[i:i + cfg.batch_train]], labels[perm[i:i + cfg.batch_train]]
                if cfg.dsa:
                    xb = dsa(xb, g)
                opt_net.zero_grad(set_to_none=True)
                F.cross_entropy(net(xb), yb).backward()
                opt_net.step()
    return total / (n_cls * cfg.outer_loop)


ITERATIONS = {"dm": dm_iteration, "dc": dc_iteration}


# -- the run: real data decoded once, seeded iterations, checkpoints, the cached result -----------
@dataclass
class Result:
    images: np.ndarray  # uint8 (classes * ipc, C, H, W), class-major
    meta: dict
    cached: bool


def iteration_seed(seed: int, it: int) -> int:
    """The seed of iteration ``it``: depends on nothing else, so resumed runs draw the same numbers."""
    return int(stable_hash(["matching", seed, it], 15), 16)


def real_arrays(ds, data: str, cache, progress: bool):
    """uint8 (N, C, H, W) images at the dc protocol's size, labels, and the protocol (decoded once, cached)."""
    from vlcp.evaluation.protocols import make_protocol
    from vlcp.evaluation.samples import tensors_from_samples

    p = make_protocol("dc", data, 1, aug="none")
    key = stage_key("matching_real", VERSION, dataset=ds.identity(), size=p.load_size, channels=p.channels)
    entry = cache.get("matching_real", key)
    if entry is None:
        x, y = tensors_from_samples(ds.samples, p.load_size, p.channels, progress=progress)
        entry = cache.put("matching_real", key, {"images": len(x)}, {"x": x, "y": y})
    return entry.tensors["x"], entry.tensors["y"], p


def keys(cfg: MatchConfig, ds, p, caption_parts: dict | None = None, mask_parts: dict | None = None
         ) -> tuple[str, str]:
    """(result key, checkpoint key). The checkpoint key leaves out the iteration count: a longer run
    continues from a shorter one's last state. Without a caption loss its fields stay out of the key;
    the segmenter counts by its identity and prompts (``mask_parts``), only with clipseg masks."""
    parts = {"dataset": ds.identity(), "size": p.image_size, "channels": p.channels, "mean": p.mean, "std": p.std}
    config = asdict(cfg)
    config.pop("segmenter")
    if cfg.masks == "clipseg":
        parts["masks"] = mask_parts
    if cfg.caption_loss:
        parts["caption"] = caption_parts
    else:
        config.pop("caption_loss")
    result = stage_key(STAGE, VERSION, config=config, **parts)
    config.pop("iterations")
    return result, stage_key(CHECKPOINT_STAGE, VERSION, config=config, **parts)


def initial_indices(cfg: MatchConfig, y: np.ndarray, classes: list) -> list[int]:
    """Seeded choice of IPC real images per class to start from (also the noise init's seed)."""
    rng = np.random.default_rng(cfg.seed)
    out: list[int] = []
    for c, cls in enumerate(classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < cfg.ipc:
            raise MatchError(f"class {cls.folder!r} has {len(idx)} images, fewer than --ipc {cfg.ipc}")
        out += sorted(rng.choice(idx, size=cfg.ipc, replace=False).tolist())
    return out


def _normalise(x: np.ndarray, p, device: str):
    import torch

    mean = torch.tensor(p.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(p.std, device=device).view(1, -1, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(x)).to(device).float() / 255 - mean) / std


def to_uint8(syn: np.ndarray, p) -> np.ndarray:
    """Normalised float images back to uint8 pixels (clipped), as the reference saves them."""
    mean, std = np.array(p.mean).reshape(1, -1, 1, 1), np.array(p.std).reshape(1, -1, 1, 1)
    return np.rint(np.clip(syn * std + mean, 0, 1) * 255).astype(np.uint8)


def optimise(cfg: MatchConfig, real: Real, syn0, p, cache, ckpt_key: str, progress: bool,
             checkpoint_every: int) -> tuple[np.ndarray, list[float], int]:
    """Run (or resume) the iterations; returns (normalised synthetic images, losses, resumed-from iteration)."""
    import torch
    from tqdm.auto import tqdm

    from vlcp.evaluation import networks
    from vlcp.store import checkpoint

    syn = syn0.clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=cfg.momentum_img)
    start, losses = 0, []
    saved = cache.get(CHECKPOINT_STAGE, ckpt_key)
    if saved is not None and saved.meta["iteration"] <= cfg.iterations:
        meta = checkpoint.restore(saved, {"syn": syn}, opt, syn.device)
        start, losses = meta["iteration"], meta["losses"]
    newest = saved.meta["iteration"] if saved is not None else 0

    def save(done: int) -> None:
        nonlocal newest
        if done > newest:  # a checkpoint only moves forward
            checkpoint.save(cache, CHECKPOINT_STAGE, ckpt_key, {"syn": syn}, opt,
                            {"iteration": done, "losses": losses})
            newest = done

    step, n_cls = ITERATIONS[cfg.method], len(real.per_class)
    bar = tqdm(range(start, cfg.iterations), desc=cfg.method.upper(), initial=start, total=cfg.iterations,
               leave=False, disable=not progress)
    for it in bar:
        s = iteration_seed(cfg.seed, it)
        g = torch.Generator().manual_seed(s)
        torch.manual_seed(s)  # the network's initialisation
        net = networks.build(cfg.model, p.channels, n_cls, p.image_size).to(syn.device)
        net.train()
        losses.append(step(cfg, net, real, syn, opt, g))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        scalars.add("matching/loss", losses[-1], it + 1)  # --log-dir: after iteration it + 1
        if checkpoint_every and (it + 1) % checkpoint_every == 0:
            save(it + 1)
    bar.close()
    save(cfg.iterations)
    return syn.detach().cpu().numpy(), losses, start


def run(cfg: MatchConfig, ds, data: str, cache, device: str = "auto", progress: bool = True,
        checkpoint_every: int = 50, caption=None) -> Result:
    """The optimised set for ``cfg`` on ``ds``: from the cache, or computed (resuming a checkpoint).
    ``caption``: a vlcp.baselines.caption_losses.CaptionSpec, required when cfg.caption_loss > 0."""
    if cfg.caption_loss and caption is None:
        raise MatchError("--caption-loss needs captions of the real images (--captions FILE)")
    x, y, p = real_arrays(ds, data, cache, progress)
    init = initial_indices(cfg, y, ds.classes)
    cap_parts = caption.key_parts(cache) if cfg.caption_loss else None
    names = [c.name for c in ds.classes]
    seg_parts = cfg.segmenter.key_parts(cache, names) if cfg.masks == "clipseg" else None
    key, ckpt_key = keys(cfg, ds, p, cap_parts, seg_parts)
    entry = cache.get(STAGE, key)
    if entry is not None:
        return Result(entry.tensors["images"], entry.meta, True)
    import torch

    from vlcp.models.loading import torch_device

    dev = torch_device(device)
    soft, seg_info = (mask_mod.clipseg_masks(x, y, names, cfg.segmenter, cache, dev, progress)
                      if cfg.masks == "clipseg" else (None, {}))
    xm, mask_info = mask_mod.masked(x, cfg.masks, cfg.mask_margin, soft)
    mask_info.update(seg_info)
    yt = torch.from_numpy(y).to(dev)
    real = Real(_normalise(xm, p, dev), [torch.nonzero(yt == c).flatten() for c in range(len(ds.classes))])
    if cfg.caption_loss:
        real.caption = caption.term(cache, dev, cfg.ipc, p.mean, p.std)
    syn0 = _normalise(x[init], p, dev)
    if cfg.init == "noise":
        syn0 = torch.randn(syn0.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
    t0 = time.perf_counter()
    syn, losses, resumed = optimise(cfg, real, syn0, p, cache, ckpt_key, progress, checkpoint_every)
    seconds = time.perf_counter() - t0
    done = cfg.iterations - resumed
    meta = {"config": asdict(cfg), "losses": losses, "final_loss": losses[-1], "resumed_from": resumed,
            "seconds": round(seconds, 2), "seconds_per_iteration": round(seconds / max(done, 1), 4),
            "device": dev, "masks": mask_info, "caption": cap_parts,
            "init_sources": [ds.samples[i].source for i in init],
            "image_size": p.image_size, "normalisation": {"mean": p.mean, "std": p.std}}
    images = to_uint8(syn, p)
    cache.put(STAGE, key, meta, {"images": images, "syn": syn.astype(np.float32)})
    return Result(images, meta, False)
