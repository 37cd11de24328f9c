"""RDED's teacher for soft labels: the user's weights, torchvision's ImageNet ResNet-18, or one vlcp trains
once and caches.

A teacher vlcp trains is also kept as a named file a user can pass around (``--teacher FILE``, ``vlcp relabel``,
exports): ``<cache>/teachers/<dataset>-<model>-<short key>.safetensors`` and, beside it, ``.json`` with what it
was trained on (dataset identity, class order, model, protocol, accuracy, epochs, the weights' sha256).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, fields, replace
from pathlib import Path

from vlcp.data.datasets import Dataset
from vlcp.evaluation.protocols import EvalError, Protocol
from vlcp.evaluation.training import accuracy, train

TEACHER_VERSION = 2
TEACHERS_DIR = "teachers"  # under the cache directory
FILE_FORMAT = "vlcp-teacher/1"
log = logging.getLogger("vlcp")


def _torchvision_teacher(p: Protocol, ds: Dataset, device: str):
    """RDED's ImageNet-1K teacher: torchvision's ResNet-18 with its ImageNet weights, from the local hub cache."""
    import torchvision.models as tvm

    if len(ds.classes) != 1000:
        raise EvalError(f"the torchvision teacher has ImageNet's 1000 classes, {ds.name} has {len(ds.classes)}: "
                        "pass --teacher WEIGHTS.safetensors")
    try:
        return tvm.resnet18(weights=tvm.ResNet18_Weights.IMAGENET1K_V1).to(device)
    except Exception as exc:  # not in the torch hub cache and no network
        raise EvalError(f"cannot load torchvision's resnet18 ImageNet weights ({exc}); put them where torch.hub "
                        "finds them (~/.cache/torch/hub/checkpoints) or pass --teacher") from None


def teacher_file(cache_root: str | os.PathLike, dataset: str, model: str, key: str) -> Path:
    """Where the teacher of cache key ``key`` is kept as a named file (its ``.json`` sits beside it)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "data"
    return Path(cache_root) / TEACHERS_DIR / f"{safe}-{model}-{key[:10]}.safetensors"


def read_teacher_meta(path: str | os.PathLike) -> dict | None:
    """The ``.json`` beside a teacher file, or None for weights without one (a user's own file)."""
    side = Path(path).with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read {side}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise EvalError(f"{side} is not a vlcp teacher description (no \"format\": \"{FILE_FORMAT}\")")
    return meta


def _same_data(meta: dict, ds: Dataset) -> bool:
    mine, theirs = ds.identity(), meta.get("dataset", {})
    return all(theirs.get(k) == mine[k] for k in ("name", "classes", "digest"))


def find_teacher(cache_root: str | os.PathLike, ds: Dataset, model: str | None = None,
                 epochs: int | None = None) -> Path | None:
    """The named teacher file vlcp trained for ``ds`` (same name, class folders and image digest), ``model`` and
    ``epochs`` (any when None): the most accurate, then by name; None when there is none."""
    found = []
    for side in sorted((Path(cache_root) / TEACHERS_DIR).glob("*.json")):
        try:
            meta = read_teacher_meta(side.with_suffix(".safetensors"))
        except EvalError:
            continue
        weights = side.with_suffix(".safetensors")
        if (meta and weights.is_file() and _same_data(meta, ds) and model in (None, meta.get("model"))
                and epochs in (None, meta.get("epochs"))):
            found.append((-(meta.get("accuracy") or 0.0), weights.name, weights))
    return min(found)[2] if found else None


def save_teacher_file(cache_root, ds: Dataset, tp: Protocol, key: str, state: dict, info: dict) -> Path:
    """Write the named file of a trained teacher (weights, then its ``.json``), each atomically; kept if there."""
    from vlcp import __version__
    from vlcp.store.cache import atomic_write_text
    from vlcp.store.tensors import publish_safetensors

    path = teacher_file(cache_root, ds.name, tp.model, key)
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    digest = publish_safetensors(path, state)
    meta = {"format": FILE_FORMAT, "weights": path.name, "sha256": digest, "model": tp.model,
            "classes": [c.folder for c in ds.classes], "class_names": [c.name for c in ds.classes],
            "dataset": ds.identity(), "accuracy": info.get("accuracy"), "epochs": info.get("epochs"),
            "protocol": {k: v for k, v in asdict(tp).items() if k != "sources"}, "cache_key": key,
            "vlcp_version": __version__}
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return path


def file_protocol(meta: dict, fallback: Protocol) -> Protocol:
    """The protocol a teacher file was trained under (its input size, channels and normalisation)."""
    known = {f.name for f in fields(Protocol)}
    recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("protocol", {}).items() if k in known}
    return replace(fallback, **recorded, sources={})


def load_teacher(path: str | os.PathLike, p: Protocol, ds: Dataset, device: str) -> tuple[object, dict]:
    """A teacher from a safetensors file: its ``.json`` (if any) gives the model and must name ``ds``'s classes;
    without one the protocol's model is built. Returns (network in eval mode, info with ``sha256``)."""
    from safetensors.torch import load_file

    from vlcp.evaluation import networks
    from vlcp.store.cache import file_digest

    meta = read_teacher_meta(path)
    model, size = p.model, p.image_size
    if meta is not None:
        if meta.get("classes") != [c.folder for c in ds.classes]:
            raise EvalError(f"teacher {path} was trained on the classes {meta.get('classes')}, not on "
                            f"{ds.name}'s {[c.folder for c in ds.classes][:5]}...")
        model, size = meta["model"], meta.get("protocol", {}).get("image_size", size)
        if size != p.image_size or meta.get("protocol", {}).get("channels", p.channels) != p.channels:
            raise EvalError(f"teacher {path} takes {size} px images, this protocol trains at {p.image_size} px")
    net = networks.build(model, p.channels, len(ds.classes), size).to(device)
    from safetensors import SafetensorError

    try:
        net.load_state_dict(load_file(str(path), device="cpu"))
    except (OSError, RuntimeError, SafetensorError) as exc:  # a .pt or any non-safetensors file: SafetensorError
        raise EvalError(f"cannot load teacher weights {path} (vlcp reads safetensors only): {exc}") from None
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net, {"source": str(path), "sha256": file_digest(path), "model": model}


def teacher_net(p: Protocol, ds: Dataset, real, test, device: str, cache, path: str | None,
                progress: bool) -> tuple[object, dict]:
    """The RDED teacher: the user's safetensors weights, torchvision's (ImageNet-1K), or one vlcp trains once
    (and keeps as a named file, ``teacher_file``)."""
    from vlcp.evaluation import networks
    from vlcp.store.cache import stage_key
    from vlcp.store.tensors import numpy_to_state, state_to_numpy

    if path:
        net, info = load_teacher(path, p, ds, device)
    elif p.teacher.startswith("torchvision:"):
        net, info = _torchvision_teacher(p, ds, device), {"source": "torchvision resnet18 ImageNet weights (RDED's)"}
    else:
        net = networks.build(p.model, p.channels, len(ds.classes), p.image_size).to(device)
        tp = replace(p, kd_temperature=0.0, mix="torchvision", cutmix=0.0, mixup=0.0, no_grad_forward=False,
                     epochs=p.teacher_epochs, test_every=0, best_after=0.0, sources={})
        key = stage_key("teacher", TEACHER_VERSION, dataset=ds.identity(), protocol=asdict(tp))
        entry = cache.get("teacher", key, verify=True)
        if entry is None:
            trained, res = train(tp, (*real(), len(ds.classes)), 0, device, test=test,
                                 progress=progress and "teacher", curve=f"{p.name}-{p.model}/teacher")
            state = state_to_numpy(trained.state_dict(), keep_dtype=True)
            entry = cache.put("teacher", key, {"accuracy": res.get("accuracy"), "epochs": p.teacher_epochs}, state)
        net.load_state_dict(numpy_to_state(entry.tensors))
        info = {"source": "trained by vlcp (not RDED's observer)", "key": key, "epochs": entry.meta["epochs"]}
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    info["accuracy"] = round(accuracy(net, *test, p, device) * 100, 2)
    if "key" in info:
        try:
            info["file"] = str(save_teacher_file(cache.root, ds, tp, info["key"], entry.tensors, info).resolve())
        except OSError as exc:  # the teacher is trained and cached: a file that cannot be written costs nothing else
            log.warning("could not write the named teacher file under %s: %s", Path(cache.root) / TEACHERS_DIR, exc)
    return net, info
