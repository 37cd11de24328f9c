"""Resumable training state in the stage cache: named weights + optimizer state as safetensors, the rest as JSON.

Both long trainings (diffusion fine-tuning, the refinement detector) save through here, so a killed
run continues from its last checkpoint instead of starting over. Nothing is pickled.

A checkpoint is one cache entry per (stage, key), and only the latest is kept: saving streams the new
blob to disk tensor by tensor (no in-memory copy of the file), records it, then deletes the blob it
supersedes, so the disk holds at most two checkpoints for a moment and one otherwise. ``drop``
removes it once the final weights are stored. The entry's format is the cache's own, so
``StageCache.get`` reads it like any other.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from vlcp.store.cache import BLOB_DIR, Entry, StageCache
from vlcp.store.files import new_file
from vlcp.store.tensors import to_numpy, write_safetensors


def _blob_path(cache: StageCache, stage: str, name: str) -> Path:
    return cache.root / BLOB_DIR / stage / name[:2] / name  # the layout of StageCache's blobs


def _spec(t) -> tuple[tuple[int, ...], np.dtype]:
    if not hasattr(t, "detach"):
        return tuple(np.shape(t)), np.asarray(t).dtype
    if t.is_floating_point():
        return tuple(t.shape), np.dtype(np.float32)
    import torch

    return tuple(t.shape), torch.empty(0, dtype=t.dtype).numpy().dtype


def _producer(t):
    return (lambda: to_numpy(t)) if hasattr(t, "detach") else (lambda: np.asarray(t))


def save(cache: StageCache, stage: str, key: str, weights: dict, opt, meta: dict, scaler=None,
         extra: dict | None = None) -> None:
    """weights: name -> tensor; opt: a torch optimizer; meta: JSON-able progress (step, losses...);
    scaler: an AMP GradScaler whose state must survive (fp16 training skips steps by it);
    extra: more named tensors to restore with ``restore(..., extra=)`` (e.g. EMA weights)."""
    sd = opt.state_dict()
    tensors = {f"w/{k}": v for k, v in weights.items()}
    tensors.update({f"x/{k}": v for k, v in (extra or {}).items()})
    for pid, st in sd["state"].items():
        tensors.update({f"opt/{pid}/{name}": v for name, v in st.items()})
    layout = {"param_groups": sd["param_groups"],
              "state_names": {str(pid): sorted(st) for pid, st in sd["state"].items()}}
    full_meta = {**meta, "opt": layout}
    if scaler is not None and scaler.is_enabled():
        full_meta["scaler"] = scaler.state_dict()
    _put_streamed(cache, stage, key, full_meta, tensors)


def _put_streamed(cache: StageCache, stage: str, key: str, meta: dict, tensors: dict) -> None:
    """Like ``StageCache.put``, but the blob is streamed to disk, and the superseded blob is deleted."""
    meta_text = json.dumps(meta, sort_keys=True)
    folder = cache.root / BLOB_DIR / stage
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_file(folder, ".tmp-", ".safetensors")
    os.close(fd)
    try:
        sha = write_safetensors(Path(tmp), {k: _producer(v) for k, v in tensors.items()},
                                {k: _spec(v) for k, v in tensors.items()})
        name = f"{key}-{sha[:16]}.safetensors"
        path = _blob_path(cache, stage, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = Path(tmp).stat().st_size
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    old = cache.index.get(f"{stage}/{key}")
    cache.index.set(f"{stage}/{key}", {
        "meta": meta_text, "meta_sha": hashlib.sha256(meta_text.encode()).hexdigest(), "stage": stage,
        "bytes": len(meta_text) + size, "created": time.time(), "blob": name, "blob_sha": sha})
    if old and old.get("blob") and old["blob"] != name:
        _blob_path(cache, stage, old["blob"]).unlink(missing_ok=True)


def drop(cache: StageCache, stage: str, key: str) -> bool:
    """Delete the checkpoint (index record and blob) once the final weights are stored elsewhere."""
    rec = cache.index.pop(f"{stage}/{key}", None)
    if rec and rec.get("blob"):
        _blob_path(cache, stage, rec["blob"]).unlink(missing_ok=True)
    return rec is not None


def restore(entry: Entry, weights: dict, opt, device, scaler=None, extra: dict | None = None) -> dict:
    """Copy saved weights (and ``extra`` tensors) into the given tensors, load the optimizer and the
    scaler; return the saved meta."""
    import torch

    with torch.no_grad():
        for k, v in entry.tensors.items():
            if k.startswith("w/"):
                weights[k[2:]].copy_(torch.from_numpy(v.copy()))
            elif k.startswith("x/") and extra is not None:
                extra[k[2:]].copy_(torch.from_numpy(v.copy()))
    layout = entry.meta["opt"]
    state = {}
    for pid, names in layout["state_names"].items():
        state[int(pid)] = {}
        for n in names:
            a = entry.tensors[f"opt/{pid}/{n}"]
            state[int(pid)][n] = torch.from_numpy(a.copy()).to(device if a.ndim else "cpu")  # Adam's step stays on CPU
    # the hyper-parameters as saved; the kernel choice (fused / foreach) as this run made the optimizer: a
    # checkpoint of a CPU run resumed on CUDA gets the fused kernel, and the other way round
    kernel = ("fused", "foreach", "capturable")
    groups = [{**g, **{k: now[k] for k in kernel if k in now}} for g, now in zip(layout["param_groups"], opt.param_groups)]
    opt.load_state_dict({"state": state, "param_groups": groups})
    if scaler is not None and "scaler" in entry.meta:
        scaler.load_state_dict(entry.meta["scaler"])
    return entry.meta
