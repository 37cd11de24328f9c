"""Detector-guided refinement (``--refine``): find defective synthetic images, replace them.

A classifier trained on the real data (the *detector*) judges every synthetic image. An image is
defective when its predicted label is not its class or its target-class probability is <= beta.
For each defective image, in (class, cluster) order: generate candidates from the same prototype
latent and prompt with fresh seeds; the valid pool is the candidates predicted as the target with
p > beta, cut to the top-k by p (a lone highest-p candidate when none is valid); the pool member with
the lowest summed cosine similarity to the class's accepted images' features replaces the defective
image and joins the accepted set, so later choices see it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from vlcp.store.cache import stable_hash

VERSION = 1
DETECTOR_VERSION = 1
SCORES_VERSION = 1
DEFAULT_BETA = {"imagenette": 0.9, "imagewoof": 0.9, "cifar10": 0.7}
DEFAULT_BETA_OTHER = 0.9


def default_beta(data: str) -> float:
    return DEFAULT_BETA.get(data, DEFAULT_BETA_OTHER)


def is_defective(pred: int, p_target: float, target: int, beta: float) -> bool:
    return pred != target or p_target <= beta


def candidate_seed(image_seed: int, j: int) -> int:
    """Candidate j of an image: a seed of its own, derived only from the image's seed and j."""
    return int(stable_hash(["candidate", image_seed, j], 15), 16)


def _cos(v: np.ndarray, normals) -> float:
    """Summed cosine similarity of v to every accepted feature (Eq. 5); 0 when none is accepted yet."""
    if len(normals) == 0:
        return 0.0
    normals = np.asarray(normals)
    v = v / (np.linalg.norm(v) + 1e-12)
    n = normals / (np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12)
    return float((n @ v).sum())


def choose(preds: list[int], probs: list[float], feats: np.ndarray, target: int, beta: float, top_k: int,
           normals: list) -> tuple[int, str, list[int]]:
    """(chosen candidate, "valid" | "fallback", the pool) for one defective image (Eq. 5-6).

    The pool is ordered by probability (then candidate index); equal similarities go to the earlier
    pool member, i.e. the more confident candidate.
    """
    valid = [i for i in range(len(preds)) if preds[i] == target and probs[i] > beta]
    if valid:
        pool, how = sorted(valid, key=lambda i: (-probs[i], i))[:top_k], "valid"
    else:
        pool, how = [max(range(len(probs)), key=lambda i: (probs[i], -i))], "fallback"
    sims = [_cos(feats[i], normals) for i in pool]
    best = pool[int(np.argmin(sims))]  # argmin keeps the first of equal similarities
    return best, how, pool


def select(classes: list[str], targets: list[int], scores: list[dict], candidate_scores: dict, beta: float,
           top_k: int) -> dict:
    """The whole selection from cached scores: which images are replaced by which candidate.

    ``scores[i]`` = {"pred", "probs", "feature"} of synthetic image i (in class, cluster order);
    ``candidate_scores[i]`` = list of the same for the candidates of image i.
    """
    decisions, per_class = {}, {}
    for c, name in enumerate(classes):
        idx = [i for i, t in enumerate(targets) if t == c]
        defective = [i for i in idx if is_defective(scores[i]["pred"], scores[i]["probs"][c], c, beta)]
        normals = [np.asarray(scores[i]["feature"]) for i in idx if i not in defective]
        stats = {"images": len(idx), "defective": len(defective), "valid": 0, "fallback": 0,
                 "confidence_before": _mean([scores[i]["probs"][c] for i in idx])}
        after = {i: scores[i]["probs"][c] for i in idx}
        for i in defective:
            cands = candidate_scores.get(i)
            if not cands:
                continue
            j, how, pool = choose([s["pred"] for s in cands], [s["probs"][c] for s in cands],
                                  np.array([s["feature"] for s in cands]), c, beta, top_k, normals)
            normals.append(np.asarray(cands[j]["feature"]))
            stats[how] += 1
            after[i] = cands[j]["probs"][c]
            decisions[i] = {"candidate": j, "how": how, "pool": pool, "p_before": scores[i]["probs"][c],
                            "p_after": cands[j]["probs"][c]}
        stats["confidence_after"] = _mean(list(after.values()))
        per_class[name] = stats
    return {"replacements": decisions, "per_class": per_class}


def _mean(v: list[float]) -> float:
    return round(float(np.mean(v)), 4) if v else 0.0


@dataclass(frozen=True)
class DetectorSpec:
    """Where the detector comes from: the real data it trains on, or user weights."""
    data: str
    data_dir: Any
    classes: list[str] | None
    weights: str | None  # a safetensors file, a torchvision model name, or None (train one)
    seed: int


@dataclass
class Detector:
    """The cached detector stage: its recipe, key, entry (meta + weights) and device."""
    protocol: Any
    key: str
    entry: Any
    device: Callable[[], str]

    def load(self, classes: list):
        return detector_from_state(self.entry.tensors, self.protocol, len(classes), self.device(),
                                   [c.name for c in classes])


def detector_protocol(data: str, arch: str | None, epochs: int, weights: str | None = None):
    """The detector's training recipe (paper, III-B): Adam 0.01, CutMix, flips, ``epochs`` (300).

    A torchvision model name as ``weights`` means its ImageNet recipe: 224 px, ImageNet statistics."""
    from pathlib import Path

    from vlcp.evaluation.protocols import IMAGENET_LIKE, make_protocol

    p = make_protocol("dc", data, 10, epochs=epochs, aug="none")
    low_res = data not in IMAGENET_LIKE and p.image_size <= 64
    p.name, p.optimizer, p.lr, p.momentum, p.weight_decay, p.schedule = "detector", "adam", 0.01, 0.0, 0.0, "constant"
    p.model = arch or ("resnet18-modified" if low_res else "resnet18")
    p.aug, p.cutmix, p.batch_size = "flip", 1.0, 64
    if not low_res:
        p.image_size = p.load_size = 224
    if weights and not Path(weights).is_file():
        p.model, p.image_size, p.load_size, p.channels = weights, 224, 224, 3
    return p


def weights_identity(weights: str | None) -> str | None:
    """What the detector key holds of ``--detector``: a file's content hash, or the torchvision name."""
    from pathlib import Path

    from vlcp.store.cache import file_digest

    return file_digest(weights) if weights and Path(weights).is_file() else weights


def net_state(net) -> dict:
    from vlcp.store.tensors import state_to_numpy

    return state_to_numpy(net.state_dict())


def detector_from_state(state: dict, p, num_classes: int, device: str, class_names: list[str] | None = None):
    from vlcp.evaluation import networks
    from vlcp.store.tensors import numpy_to_state

    if not state:  # a torchvision detector: nothing of ours was stored, its weights come from torch.hub
        return torchvision_detector(p.model, class_names or [], device)

    net = networks.build(p.model, p.channels, num_classes, p.image_size)
    net.load_state_dict(numpy_to_state(state, like=net.state_dict()))
    return net.to(device).eval()


def load_detector(path: str, p, num_classes: int, device: str):
    """A user's detector: ``--detector-arch`` weights saved with safetensors (never a pickle)."""
    from safetensors.torch import load_file

    from vlcp.evaluation.protocols import EvalError

    try:
        state = {k: v.numpy() for k, v in load_file(path).items()}
        return detector_from_state(state, p, num_classes, device)
    except (OSError, RuntimeError, KeyError) as exc:
        raise EvalError(f"cannot load detector weights {path} as {p.model}: {exc}") from None


def _restricted(net, columns: list[int]):
    """A 1000-way ImageNet classifier restricted to the dataset's classes (logit columns by name)."""
    import torch.nn as nn

    from vlcp.evaluation.networks import embed

    class Restricted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def embed(self, x):
            return embed(self.net, x)

        def forward(self, x):
            return self.net(x)[:, columns]

    return Restricted()


def torchvision_detector(name: str, class_names: list[str], device: str):
    """An ImageNet-pretrained torchvision ResNet whose weights are already on this machine.

    Classes are matched to the weights' category names by their first name ("tench, Tinca tinca" ->
    "tench"), so this works for ImageNet subsets only.
    """
    import torchvision.models as tvm

    from vlcp.data.classnames import lookup
    from vlcp.evaluation.protocols import EvalError

    try:
        weights = tvm.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise EvalError(f"--detector {name!r} is neither a file nor a torchvision model name") from None
    index = {c.lower(): i for i, c in reversed(list(enumerate(weights.meta["categories"])))}
    columns, missing = [], []
    for n in class_names:
        col = lookup(index, n.split(",")[0])
        if col is not None:
            columns.append(col)
        else:
            missing.append(n)
    if missing:
        raise EvalError(f"{name}'s ImageNet categories lack {', '.join(missing)}: use a trained detector instead")
    try:
        net = tvm.get_model(name, weights=weights)
    except Exception as exc:  # not in the torch hub cache and no network
        raise EvalError(f"cannot load {name} weights ({exc}); download them where torch.hub can find them "
                        f"(~/.cache/torch/hub/checkpoints) or omit --detector to train one") from None
    if not hasattr(net, "fc"):
        raise EvalError(f"--detector {name}: only ResNet-family torchvision models are supported")
    return _restricted(net, columns).to(device).eval()


def scores_of(net, images: list[np.ndarray], p, device: str) -> list[dict]:
    """Detector verdicts: predicted label, softmax probabilities and penultimate features per image."""
    import torch
    from PIL import Image

    from vlcp.evaluation import networks
    from vlcp.evaluation.samples import to_array
    from vlcp.evaluation.training import net_input

    x = net_input(np.stack([to_array(Image.fromarray(im), p.image_size, p.channels) for im in images]), p, device)
    net.eval()
    with torch.inference_mode():
        feats = networks.embed(net, x).float()
        logits = net(x).float()
    probs = torch.softmax(logits, 1)
    return [{"pred": int(pr.argmax()), "probs": [round(float(v), 6) for v in pr], "feature": f.cpu().numpy()}
            for pr, f in zip(probs, feats)]


def train_detector(cache, ds, p, spec: DetectorSpec, key: str, device: str, progress: bool) -> tuple[dict, dict]:
    """(meta, weights) of the detector: trained on ``ds`` with checkpoints every tenth of training (a
    killed training resumes), or loaded from ``spec.weights``; its real test accuracy goes in meta."""
    from pathlib import Path

    from vlcp.data.datasets import NoTestSplit, load_dataset
    from vlcp.evaluation.samples import tensors_from_samples
    from vlcp.evaluation.training import accuracy, train

    w = spec.weights
    try:
        test = tensors_from_samples(load_dataset(spec.data, spec.data_dir, "test", spec.classes).samples,
                                    p.image_size, p.channels)
        untested = {}
    except NoTestSplit:  # a folder without a test split: the detector still refines, its accuracy is unknown
        test, untested = None, {"accuracy_note": "not measured: --data has no test split"}

    def score(net) -> float | None:
        return None if test is None else round(accuracy(net, *test, p, device) * 100, 2)

    if w and not Path(w).is_file():  # a torchvision model name
        net = torchvision_detector(w, [c.name for c in ds.classes], device)
        return {"source": f"torchvision:{w}", "model": w, "accuracy": score(net), **untested}, {}
    if w:
        net = load_detector(w, p, len(ds.classes), device)
        return {"source": str(w), "model": p.model, "accuracy": score(net), **untested}, net_state(net)
    x, y = tensors_from_samples(ds.samples, p.image_size, p.channels)
    net, res = train(p, (x, y, len(ds.classes)), spec.seed, device, test=test, progress=progress and "detector",
                     resume=(cache, "detector_checkpoint", key, max(1, p.epochs // 10)), curve="detector")
    acc = round(res["accuracy"] * 100, 2) if "accuracy" in res else None
    return {"source": "trained by vlcp", "model": p.model, "epochs": p.epochs, "accuracy": acc, **untested}, \
        net_state(net)
