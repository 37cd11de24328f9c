"""``vlcp baseline``: the Random / Herding / K-Center columns of the papers' tables.

All three select real training images per class. Herding (Welling, 2009) and k-center (Sener &
Savarese, 2018) are greedy on features of a ConvNet-3 trained briefly on the real data at its natural
size (64 px for ImageNet-like data), as in the DC/IDC literature; that network is cached.

- herding: repeatedly add the image that brings the mean of the selected features closest to the
  class mean.
- k-center: start from the image closest to the class mean, then repeatedly add the image farthest
  from everything selected so far.
"""
from __future__ import annotations

import math

import numpy as np

METHODS = ["random", "herding", "kcenter", "dm", "dc"]  # dm, dc: optimisation-based, in vlcp.baselines.matching
FEATURE_VERSION = 1


def select_random(n: int, k: int, rng: np.random.Generator) -> list[int]:
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def select_herding(feats: np.ndarray, k: int) -> list[int]:
    mu = feats.mean(0)
    chosen: list[int] = []
    total = np.zeros_like(mu)
    for step in range(1, k + 1):
        dist = np.linalg.norm(mu[None] - (total[None] + feats) / step, axis=1)
        dist[chosen] = np.inf
        i = int(np.argmin(dist))
        chosen.append(i)
        total += feats[i]
    return chosen


def select_kcenter(feats: np.ndarray, k: int) -> list[int]:
    first = int(np.argmin(np.linalg.norm(feats - feats.mean(0), axis=1)))
    chosen = [first]
    mind = np.linalg.norm(feats - feats[first], axis=1)
    while len(chosen) < k:
        i = int(np.argmax(mind))
        chosen.append(i)
        mind = np.minimum(mind, np.linalg.norm(feats - feats[i], axis=1))
    return chosen


def features(ds, data: str, cache, device: str, epochs: int, progress: bool) -> np.ndarray:
    """Penultimate ConvNet-3 features of every training image (network and features cached)."""
    from vlcp.evaluation.protocols import make_protocol
    from vlcp.evaluation.samples import tensors_from_samples
    from vlcp.evaluation.training import net_input, train
    from vlcp.models.loading import torch_device
    from vlcp.store.cache import stage_key

    p = make_protocol("dc", data, 10, "convnet3", epochs, "none")
    if data not in ("digits", "fashion-mnist", "cifar10", "cifar100"):
        p.image_size = p.load_size = 64
    key = stage_key("baseline_features", FEATURE_VERSION, dataset=ds.identity(), epochs=epochs, size=p.image_size)
    entry = cache.get("baseline_features", key, verify=True)
    if entry is None:
        import torch

        from vlcp.evaluation import networks

        x, y = tensors_from_samples(ds.samples, p.load_size, p.channels, progress=progress)
        dev = torch_device(device)
        net, _ = train(p, (x, y, len(ds.classes)), 0, dev, progress=progress and "feature net")
        net.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), 500):
                out.append(networks.embed(net, net_input(x[i:i + 500], p, dev)).float().cpu().numpy())
        entry = cache.put("baseline_features", key, {"epochs": epochs}, {"features": np.concatenate(out)})
    return entry.tensors["features"]


def select(method: str, ds, ipc: int, seed: int, feats: np.ndarray | None) -> dict[int, list[int]]:
    """Sample indices (into ds.samples) chosen per class."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in range(len(ds.classes)):
        idx = np.array([i for i, s in enumerate(ds.samples) if s.class_idx == c])
        if len(idx) < ipc:
            raise ValueError(f"class {ds.classes[c].folder!r} has {len(idx)} images, fewer than --ipc {ipc}")
        if method == "random":
            local = select_random(len(idx), ipc, rng)
        elif method == "herding":
            local = select_herding(feats[idx], ipc)
        else:
            local = select_kcenter(feats[idx], ipc)
        out[c] = [int(idx[j]) for j in local]
    return out


def selected_images(ds, chosen: dict[int, list[int]]) -> dict[int, list]:
    """The chosen real images as PIL images, per class."""
    return {c: [ds.samples[i].load() for i in idx] for c, idx in chosen.items()}


def array_images(images: np.ndarray, ipc: int) -> dict[int, list]:
    """Class-major uint8 (N, C, H, W) arrays (matching's output) as PIL images, per class."""
    from PIL import Image

    out: dict[int, list] = {}
    for i, a in enumerate(images):
        out.setdefault(i // ipc, []).append(Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)))
    return out


def write_folder(tmp, ds, images: dict[int, list], manifest: dict) -> None:
    """The standard layout: ``train/<class folder>/<index>.png`` (canonical class ids) with
    ``train/metadata.jsonl`` (label, class; for real images their index in the training split, from
    ``manifest["sources"]``), and manifest.json at the root."""
    from vlcp.store.output import IMAGES_DIR, file_name, write_json, write_metadata

    root = tmp / IMAGES_DIR
    for c, imgs in images.items():
        (root / ds.classes[c].folder).mkdir(parents=True)
        for j, img in enumerate(imgs):
            img.save(root / file_name(ds.classes[c].folder, j))
    root.mkdir(parents=True, exist_ok=True)
    index = {s.source: i for i, s in enumerate(ds.samples)}
    sources = manifest.get("sources") or {}  # random/herding/k-center: class folder -> chosen files; DM/DC: none
    extra = {file_name(folder, j): {"source_index": index[src]} for folder, srcs in sources.items()
             for j, src in enumerate(srcs) if src in index}
    write_metadata(root, ds.classes, {c: len(v) for c, v in images.items()}, extra)
    write_json(tmp / "manifest.json", {**manifest, "dataset": ds.identity(),
                                       "classes": [{"folder": c.folder, "name": c.name} for c in ds.classes]})


def loss_curve(losses: list[float], points: int = 200) -> list[list]:
    """At most ``points`` (iteration, loss) pairs, always with the first and the last."""
    step = max(1, math.ceil(len(losses) / points))
    idx = sorted(set(range(0, len(losses), step)) | {len(losses) - 1})
    return [[i + 1, round(losses[i], 6)] for i in idx]
