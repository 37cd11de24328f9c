"""Tensors leaving torch: state dicts to numpy, and safetensors files written one tensor at a time.

One helper for every module that stores weights (fine-tuning, the refinement detector, evaluation),
so they convert alike. ``write_safetensors`` streams: it never holds the serialised file (nor more
than one converted tensor) in memory, which matters for a 10 GB fine-tuning checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
           np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
           np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def to_numpy(t, keep_dtype: bool = False) -> np.ndarray:
    """One torch tensor (any device, grad or not) as a numpy array: float32 unless ``keep_dtype``."""
    t = t.detach()
    if not keep_dtype and t.is_floating_point():
        t = t.float()
    return t.cpu().numpy()


def state_to_numpy(state: Mapping, keep_dtype: bool = False) -> dict[str, np.ndarray]:
    """A state dict (name -> tensor) as name -> numpy array (float32 unless ``keep_dtype``; integer
    buffers such as BatchNorm's ``num_batches_tracked`` keep their integer type either way)."""
    return {k: to_numpy(v, keep_dtype) for k, v in state.items()}


def numpy_to_state(arrays: Mapping[str, np.ndarray], like: Mapping | None = None) -> dict:
    """name -> numpy array as name -> torch tensor, cast to the dtype of ``like[name]`` when given."""
    import torch

    out = {k: torch.from_numpy(np.ascontiguousarray(v).copy()) for k, v in arrays.items()}
    if like is not None:
        out = {k: v.to(like[k].dtype) if k in like else v for k, v in out.items()}
    return out


def write_safetensors(path: Path, items: Mapping[str, Callable[[], np.ndarray] | np.ndarray],
                      shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> str:
    """Write a safetensors file tensor by tensor; return the sha256 of its bytes.

    ``items`` maps a name to its array or to a function producing it (called once, when it is
    written: e.g. ``lambda: to_numpy(param)``, so only one tensor is on the host at a time);
    ``shapes`` gives each name's (shape, dtype) for the header, which comes first.
    """
    header, offset = {}, 0
    for name in items:
        shape, dtype = shapes[name]
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(head)), head):
            f.write(chunk)
            h.update(chunk)
        for name, item in items.items():
            a = np.asarray(item() if callable(item) else item)
            a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
            if a.shape != tuple(shapes[name][0]) or a.dtype != np.dtype(shapes[name][1]):
                raise ValueError(f"{name}: got {a.dtype}{a.shape}, the header says {shapes[name]}")
            view = memoryview(a.reshape(-1).view(np.uint8))
            f.write(view)
            h.update(view)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def publish_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> str:
    """Write numpy ``tensors`` to ``path`` through a temp file beside it and a rename (a reader never sees half a
    file; the mode follows the umask, ``vlcp.store.files``); return the file's sha256."""
    from vlcp.store.files import new_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_file(path.parent, ".tmp-", ".safetensors")
    os.close(fd)
    try:
        digest = write_safetensors(Path(tmp), tensors, {k: (v.shape, v.dtype) for k, v in tensors.items()})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return digest
