"""Resumable training state in the stage cache: named weights + optimizer state as safetensors, the rest as JSON.

Both long trainings (diffusion fine-tuning, the refinement detector) save through here, so a killed
run continues from its last checkpoint instead of starting over. Nothing is pickled.
"""
from __future__ import annotations

import numpy as np

from vlcp.cache import Entry, StageCache


def save(cache: StageCache, stage: str, key: str, weights: dict, opt, meta: dict) -> None:
    """weights: name -> tensor; opt: a torch optimizer; meta: JSON-able progress (step, losses...)."""
    tensors = {f"w/{k}": v.detach().float().cpu().numpy() for k, v in weights.items()}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"opt/{pid}/{name}"] = v.detach().cpu().numpy() if hasattr(v, "detach") else np.array(v)
    layout = {"param_groups": sd["param_groups"],
              "state_names": {str(pid): sorted(st) for pid, st in sd["state"].items()}}
    cache.put(stage, key, {**meta, "opt": layout}, tensors)


def restore(entry: Entry, weights: dict, opt, device) -> dict:
    """Copy saved weights into the given tensors and load the optimizer; return the saved meta."""
    import torch

    with torch.no_grad():
        for k, v in entry.tensors.items():
            if k.startswith("w/"):
                weights[k[2:]].copy_(torch.from_numpy(v.copy()))
    layout = entry.meta["opt"]
    state = {}
    for pid, names in layout["state_names"].items():
        state[int(pid)] = {}
        for n in names:
            a = entry.tensors[f"opt/{pid}/{n}"]
            state[int(pid)][n] = torch.from_numpy(a.copy()).to(device if a.ndim else "cpu")  # Adam's step stays on CPU
    opt.load_state_dict({"state": state, "param_groups": layout["param_groups"]})
    return entry.meta
