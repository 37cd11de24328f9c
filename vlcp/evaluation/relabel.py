"""Stored soft labels (FKD / SRe²L relabelling): for every image of a set, M RandomResizedCrop + flip crops and a
teacher's soft labels of each, computed once (``vlcp relabel``) and trained on later (``vlcp evaluate
--soft-labels``: epoch e uses crop e mod M of each image, KL to its stored label).

``OUT/soft_labels/<name>.safetensors`` (outside ``train/``, so ImageFolder never sees it):

- ``crops`` float32 [N, M, 5]: top, left, height, width as fractions of the image side, and flip (0/1): FKD's
  normalised coordinates, so a student that loads the images at another size crops the same regions;
- ``soft_labels`` float16 [N, M, C]: softmax(teacher logits / T) of each crop, for C <= 100 classes; above that
  (or with ``--top-k K``) ``topk_values`` float16 [N, M, K] and ``topk_indices`` int16 [N, M, K] (int32 from
  32768 classes), the rest of the mass spread evenly over the other classes when read (FKD's
  ``marginal_smoothing_k5`` quantisation);
- ``image_logits`` float32 [N, C]: the teacher's logits of each whole image, for DD-Ranking's soft-label mode S
  (``LabelRobustScoreSoft.compute_metrics(soft_labels=...)`` takes one logit vector per image, in the image
  order, and applies its own temperature).

``<name>.json`` beside it: the teacher file and its sha256, the image list in row order (paths relative to OUT,
ImageFolder's order: class folder, then file name) with each image's sha256, the class order, M, the crop
sampling, the temperature, the seed and the vlcp version. Rows follow the image list; the crops are drawn from
one numpy PCG64 stream seeded by ``--seed``, image by image, crop by crop.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlcp.data.datasets import Dataset
from vlcp.data.images import is_class_dir
from vlcp.evaluation.protocols import EvalError, Protocol
from vlcp.evaluation.samples import NOT_CLASSES, set_classes, synthetic_samples

SOFT_DIR = "soft_labels"
FORMAT = "vlcp-soft-labels/1"
FULL_UP_TO = 100  # classes stored as whole distributions; above: top-k
DEFAULT_TOP_K = 10
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CROP_SOURCE = ("SRe2L relabel/generate_soft_label.py (RandomResizedCrop scale 0.08-1, ratio 3/4-4/3, bilinear; "
               "flip 0.5; coordinates as fractions of the side, utils_fkd.py RandomResizedCropWithCoords)")


@dataclass
class RelabelConfig:
    """One ``vlcp relabel`` call."""
    out: str
    data: str
    teacher: str  # a safetensors file, or "auto"
    crops: int = 300  # SRe2L relabel.sh --epochs 300: one crop per training epoch
    seed: int = 0
    temperature: float = 1.0  # FKD stores softmax at T = 1
    min_scale: float = 0.08
    top_k: int | None = None  # None: whole distributions up to FULL_UP_TO classes, DEFAULT_TOP_K above
    name: str | None = None
    model: str | None = None  # auto: the teacher's network [default: any vlcp teacher of the data, else rded's]
    teacher_epochs: int | None = None
    data_dir: str = "data"
    device: str = "auto"
    progress: bool = True


def default_name(crops: int, seed: int, temperature: float) -> str:
    return f"m{crops}-seed{seed}-T{temperature:g}"


def soft_paths(out: str | os.PathLike, name: str) -> tuple[Path, Path]:
    d = Path(out) / SOFT_DIR
    return d / f"{name}.safetensors", d / f"{name}.json"


def class_dirs(out: str | os.PathLike) -> list[Path]:
    """The class folders of a set (``OUT/train/<class>`` or ``OUT/<class>``); EvalError when there are none.
    Cheap: no image is read (``vlcp relabel`` checks this before importing torch)."""
    from vlcp.store.output import images_dir

    root = images_dir(Path(out))
    dirs = sorted(d for d in root.iterdir() if is_class_dir(d) and d.name not in NOT_CLASSES)
    if not dirs:
        raise EvalError(f"{out} has no class folders: expected a vlcp set (OUT/train/<class>/) or an ImageFolder")
    return dirs


def set_samples(out: str | os.PathLike, ds: Dataset) -> tuple[list, list[str]]:
    """Every image of the set as Samples labelled for ``ds`` (what ``vlcp evaluate`` reads), and their paths
    relative to ``out``: the row order."""
    samples, _ = synthetic_samples(Path(out), ds, None)
    return samples, [relative(s.source, out) for s in samples]


def relative(path: str, out: str | os.PathLike) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(out).resolve())).as_posix()


def sample_crops(n: int, m: int, side: int, min_scale: float, seed: int) -> np.ndarray:
    """[n, m, 5] float32: torchvision's RandomResizedCrop.get_params (scale min_scale-1, ratio 3/4-4/3, ten tries,
    then the whole square) on a ``side`` x ``side`` image and a flip, vectorised over one PCG64 stream."""
    rng = np.random.default_rng(seed)
    k = n * m
    area = side * side * rng.uniform(min_scale, 1.0, (k, 10))
    ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), (k, 10)))
    cw, ch = np.rint(np.sqrt(area * ratio)), np.rint(np.sqrt(area / ratio))
    ok = (cw > 0) & (cw <= side) & (ch > 0) & (ch <= side)
    first = ok.argmax(1)
    rows = np.arange(k)
    cw = np.where(ok.any(1), cw[rows, first], side)  # torchvision's fallback on a square: the whole image
    ch = np.where(ok.any(1), ch[rows, first], side)
    top = np.floor(rng.random(k) * (side - ch + 1))
    left = np.floor(rng.random(k) * (side - cw + 1))
    flip = rng.random(k) < 0.5
    boxes = np.stack([top / side, left / side, ch / side, cw / side, flip], 1).astype(np.float32)
    return boxes.reshape(n, m, 5)


def crop_batch(x, boxes: np.ndarray, size: int):
    """uint8 (B, C, H, W) images and their [B, 5] boxes -> float (B, C, size, size) in [0, 1]: each box cut out at
    the images' own resolution, resized (bilinear, antialiased) and flipped as stored."""
    import torch
    import torchvision.transforms.v2.functional as TF

    h, w = x.shape[-2], x.shape[-1]
    out = []
    for img, (t, left, bh, bw, flip) in zip(x, boxes.tolist()):
        ch, cw = max(1, min(h, round(bh * h))), max(1, min(w, round(bw * w)))
        top, lft = min(round(t * h), h - ch), min(round(left * w), w - cw)
        img = TF.resized_crop(img.float() / 255, top, lft, ch, cw, [size, size], antialias=True)
        out.append(TF.horizontal_flip(img) if flip else img)
    return torch.stack(out)


def _teacher(cfg: RelabelConfig, ds: Dataset, ipc: int, cache, device: str):
    """(network, the protocol of its inputs, the record of it): the file given, or ``auto``: the teacher vlcp
    trained for this data (``find_teacher``), trained now (rded's, as ``vlcp evaluate --protocol rded``) if none."""
    from vlcp.evaluation import teacher as tch
    from vlcp.evaluation.protocols import make_protocol

    p = make_protocol("rded", cfg.data, ipc, cfg.model, None, None, len(ds.classes),
                      teacher_epochs=cfg.teacher_epochs)
    path = None if cfg.teacher == "auto" else Path(cfg.teacher)
    if path is None:
        path = tch.find_teacher(cache.root, ds, cfg.model, cfg.teacher_epochs)
    if path is None:
        from vlcp.evaluation.samples import (
            load_test,
            test_for,
            test_tensors,
            train_tensors,
        )

        test = test_tensors(test_for(load_test(cfg.data, cfg.data_dir), ds).samples, p, cfg.progress)
        net, info = tch.teacher_net(p, ds, lambda: train_tensors(ds.samples, p, cfg.progress), test, device, cache,
                                    None, cfg.progress)
        if "file" not in info:  # torchvision's ImageNet teacher (or a file that could not be written)
            return net, p, {"file": None, "sha256": None, "model": p.model, "source": info["source"],
                            "accuracy": info["accuracy"]}
        path = Path(info["file"])
    meta = tch.read_teacher_meta(path)
    tp = tch.file_protocol(meta, p) if meta else p
    net, info = tch.load_teacher(path, tp, ds, device)
    return net, tp, {"file": str(Path(path).resolve()), "sha256": info["sha256"], "model": info["model"],
                     "source": "vlcp teacher file" if meta else "user's weights",
                     "accuracy": meta.get("accuracy") if meta else None}


def _label(net, x: np.ndarray, crops: np.ndarray, tp: Protocol, cfg: RelabelConfig, top_k: int, device: str):
    """The teacher's soft labels of every (image, crop), a batch of crops at a time: arrays ready to store."""
    import torch
    from tqdm.auto import tqdm

    n, m = crops.shape[:2]
    classes = None
    mean = torch.tensor(tp.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(tp.std, device=device).view(1, -1, 1, 1)
    xt = torch.from_numpy(x)

    def logits(ii, boxes):
        batch = (crop_batch(xt[ii], boxes, tp.image_size).to(device) - mean) / std
        with torch.inference_mode(), torch.autocast(device.split(":")[0], enabled=device.startswith("cuda")):
            return net(batch).float()

    whole = np.array([[0, 0, 1, 1, 0]], np.float32)
    image_logits = np.concatenate([logits(np.arange(i, min(i + 256, n)), whole.repeat(min(256, n - i), 0)).cpu()
                                   .numpy() for i in range(0, n, 256)])
    classes = image_logits.shape[1]
    values = np.zeros((n, m, top_k or classes), np.float16)
    indices = np.zeros((n, m, top_k), np.int16 if classes < 32768 else np.int32) if top_k else None
    batch = 256
    for start in tqdm(range(0, n * m, batch), desc="relabel", leave=False, disable=not cfg.progress):
        flat = np.arange(start, min(start + batch, n * m))
        ii, mm = flat // m, flat % m
        probs = torch.softmax(logits(ii, crops[ii, mm]) / cfg.temperature, 1)
        if top_k:
            v, ix = probs.topk(top_k, 1)
            values[ii, mm], indices[ii, mm] = v.half().cpu().numpy(), ix.cpu().numpy()
        else:
            values[ii, mm] = probs.half().cpu().numpy()
    return values, indices, image_logits


def relabel(cfg: RelabelConfig, cache) -> dict:
    """Compute and store the soft labels of every image of ``cfg.out``; returns the record written as JSON."""
    from vlcp import __version__
    from vlcp.data.datasets import load_dataset
    from vlcp.evaluation.samples import train_tensors
    from vlcp.models.loading import torch_device
    from vlcp.store.cache import file_digest
    from vlcp.store.output import write_json

    out = Path(cfg.out)
    name = cfg.name or default_name(cfg.crops, cfg.seed, cfg.temperature)
    ds = load_dataset(cfg.data, cfg.data_dir, "train")
    samples, rel = set_samples(out, ds)
    ds, samples = set_classes(ds, samples)  # a set of a class subset: a teacher and soft labels over its classes
    ipc = min(np.unique([s.class_idx for s in samples], return_counts=True)[1].tolist())
    device = torch_device(cfg.device)
    net, tp, tinfo = _teacher(cfg, ds, ipc, cache, device)
    x, y = train_tensors(samples, tp, cfg.progress)
    crops = sample_crops(len(x), cfg.crops, x.shape[-1], cfg.min_scale, cfg.seed)
    n_cls = len(ds.classes)
    top_k = cfg.top_k if cfg.top_k is not None else (0 if n_cls <= FULL_UP_TO else DEFAULT_TOP_K)
    top_k = 0 if top_k >= n_cls else top_k
    values, indices, image_logits = _label(net, x, crops, tp, cfg, top_k, device)
    tensors = {"crops": crops, "image_logits": image_logits}
    tensors.update({"topk_values": values, "topk_indices": indices} if top_k else {"soft_labels": values})
    top1 = indices[..., 0] if top_k else values.argmax(-1)
    weights, side = soft_paths(out, name)
    from vlcp.store.tensors import publish_safetensors

    digest = publish_safetensors(weights, tensors)
    record = {
        "format": FORMAT, "name": name, "file": weights.name, "sha256": digest, "vlcp_version": __version__,
        "teacher": tinfo, "dataset": ds.identity(), "classes": [c.folder for c in ds.classes],
        "images": rel, "image_sha256": [file_digest(s.source) for s in samples],
        "crops": cfg.crops, "seed": cfg.seed, "temperature": cfg.temperature,
        "labels": {"kind": f"top-{top_k}" if top_k else "full", "dtype": "float16",
                   "tensors": sorted(tensors), "rest": "spread evenly over the other classes" if top_k else None},
        "crop": {"scale": [cfg.min_scale, 1.0], "ratio": [3 / 4, 4 / 3], "flip": 0.5, "interpolation": "bilinear",
                 "antialias": True, "sampled_on": int(x.shape[-1]), "resized_to": tp.image_size,
                 "box": "top, left, height, width (fractions of the side), flip", "source": CROP_SOURCE},
        "teacher_input": {k: getattr(tp, k) for k in ("load_size", "image_size", "channels", "mean", "std",
                                                      "resample")},
        "agreement": {"crops": round(float((top1 == y[:, None]).mean()) * 100, 2),
                      "images": round(float((image_logits.argmax(1) == y).mean()) * 100, 2)},
    }
    write_json(side, record)
    return record


@dataclass
class SoftLabels:
    """Stored soft labels, rows in the order of the images an evaluation trains on."""
    crops: np.ndarray  # [N, M, 5]
    values: np.ndarray  # [N, M, C] or top-k [N, M, K]
    indices: np.ndarray | None  # [N, M, K] or None
    num_classes: int
    temperature: float
    record: dict = field(default_factory=dict)

    def inputs(self, xt, idx, epoch: int, size: int, device: str):
        """(crops of ``epoch`` (crop epoch mod M) of images ``idx``, [0, 1] floats on ``device``; their targets)."""
        rows, m = idx.numpy(), epoch % self.crops.shape[1]
        return crop_batch(xt[idx], self.crops[rows, m], size).to(device), self.targets(rows, m).to(device)

    def targets(self, rows: np.ndarray, m: int):
        """float32 [B, C] distributions (top-k ones filled in evenly), summing to 1."""
        import torch

        v = torch.from_numpy(self.values[rows, m].astype(np.float32))
        if self.indices is not None:
            k = v.shape[1]
            rest = (1 - v.sum(1, keepdim=True)).clamp(min=0) / max(self.num_classes - k, 1)
            v = rest.expand(len(rows), self.num_classes).clone().scatter_(
                1, torch.from_numpy(self.indices[rows, m].astype(np.int64)), v)
        return v / v.sum(1, keepdim=True)


def soft_label_names(folder: str | os.PathLike) -> list[str]:
    return sorted(p.stem for p in (Path(folder) / SOFT_DIR).glob("*.json") if not p.name.startswith("."))


def load_soft_labels(folder: str | os.PathLike, name: str | None, samples: list, ds: Dataset) -> SoftLabels:
    """The soft labels ``name`` of ``folder`` (its only ones when ``name`` is empty), checked against the folder
    (same images, unchanged, same classes) and the file against its JSON; rows follow ``samples``."""
    from safetensors.numpy import load_file

    from vlcp.store.cache import file_digest

    names = soft_label_names(folder)
    if not name:
        if not names:
            raise EvalError(f"{folder} has no soft labels: run vlcp relabel {folder} first")
        if len(names) > 1:
            raise EvalError(f"{folder} has several soft labels ({', '.join(names)}): name one, --soft-labels NAME")
        name = names[0]
    weights, side = soft_paths(folder, name)
    if not side.is_file() or not weights.is_file():
        raise EvalError(f"no soft labels {name!r} in {Path(folder) / SOFT_DIR} (found: {', '.join(names) or 'none'})")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read {side}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise EvalError(f"{side} is not a vlcp soft-labels description (format {got!r})")
    redo = f"rerun vlcp relabel {folder} --name {name} --force"
    lacking = [k for k in ("sha256", "classes", "images", "image_sha256", "labels", "teacher") if k not in meta]
    if lacking:
        raise EvalError(f"{side} lacks {', '.join(lacking)}: {redo}")
    if file_digest(weights) != meta["sha256"]:
        raise EvalError(f"{weights} is not the file {side.name} describes (sha256 differs): {redo}")
    if meta["classes"] != [c.folder for c in ds.classes]:
        if set(meta["classes"]) > {c.folder for c in ds.classes}:  # labelled before a subset kept its own classes
            raise EvalError(f"soft labels {name!r} are over {len(meta['classes'])} classes, the set holds "
                            f"{len(ds.classes)} of them (it is evaluated on those): {redo}")
        raise EvalError(f"soft labels {name!r} are over the classes of another dataset than {ds.name}")
    _, rel = set_samples(folder, ds)
    if rel != meta["images"]:
        extra, missing = sorted(set(rel) - set(meta["images"])), sorted(set(meta["images"]) - set(rel))
        raise EvalError(f"the image list of soft labels {name!r} does not match {folder}: {len(meta['images'])} "
                        f"images listed, {len(rel)} in the folder" + (f"; not listed: {extra[0]}" if extra else "")
                        + (f"; listed but missing: {missing[0]}" if missing else "") + f"; {redo}")
    row_of = {r: i for i, r in enumerate(meta["images"])}
    rows = np.array([row_of[relative(s.source, folder)] for s in samples])
    for s, r in zip(samples, rows):
        if file_digest(s.source) != meta["image_sha256"][r]:
            raise EvalError(f"{meta['images'][r]} changed after its soft labels {name!r} were computed; {redo}")
    t = load_file(str(weights))
    top = "topk_values" in t
    record = {"name": name, "sha256": meta["sha256"], "crops": meta["crops"], "temperature": meta["temperature"],
              "labels": meta["labels"]["kind"], "teacher": meta["teacher"],
              "replaces": "the protocol's augmentation, mixing and labels: epoch e trains on stored crop e mod M of "
                          "each image, KL to its stored soft label (FKD)"}
    return SoftLabels(t["crops"][rows], t["topk_values" if top else "soft_labels"][rows],
                      t["topk_indices"][rows] if top else None, len(ds.classes), float(meta["temperature"]), record)
