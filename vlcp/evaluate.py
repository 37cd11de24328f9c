"""``vlcp evaluate``: train a network on a distilled set, test it on the real test split.

Three protocols, every value recorded in the JSON and overridable:

- ``minimax`` (ImageNet subsets; VLCP Tables 1-2, the refinement paper): ConvNet-6 / ResNetAP-10 /
  ResNet-18 with instance norm at 224 px; SGD 0.01, momentum 0.9, wd 5e-4, batch 64; epochs by IPC
  (<=10: 2000, <=50: 1500, <=200: 1000, <=500: 500, more: 300); MultiStepLR at 2/3 and 5/6, gamma 0.2;
  RandomResizedCrop(0.5-1) + flip + colour jitter 0.4 + lighting 0.1 + CutMix(beta 1, p 1);
  test Resize(256) + CenterCrop(224).
- ``dc`` (digits, Fashion-MNIST, CIFAR): ConvNet-3 at the data's own size; SGD 0.01, momentum 0.9,
  wd 5e-4, batch 256; 1000 epochs with DSA or 300 without (``--aug none``); lr x 0.1 at half;
  one test at the end.
- ``rded`` (VLCP Tables 3-4): ResNet-18-modified; knowledge distillation from a teacher trained on the
  real data (KL at temperature T); MixUp 0.8 / CutMix 1.0; AdamW with a cosine schedule; 500 epochs.

The primary figure is the accuracy after the last epoch. The best test accuracy seen during
training (the Minimax script's figure: model selection on the test set) is reported in its own,
labelled column, never in place of it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vlcp.datasets import Dataset, DatasetError

PROTOCOLS = ["minimax", "dc", "rded"]
IMAGENET_LIKE = {"imagenette", "imagewoof", "imageidc", "imagenet"}
# per-dataset normalisation (mean, std); digits' values are measured on its train split
NORM = {
    "digits": ((0.3059,), (0.3763,)), "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
GRAYSCALE = {"digits", "fashion-mnist"}
NATURAL_SIZE = {"digits": 8, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32}


class EvalError(Exception):
    pass


@dataclass
class Protocol:
    name: str
    model: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    aug: str
    cutmix: float
    mixup: float
    image_size: int
    load_size: int
    channels: int
    mean: tuple
    std: tuple
    test_every: int
    kd_temperature: float = 0.0
    teacher_epochs: int = 0
    notes: list[str] = field(default_factory=list)


def default_protocol(data: str) -> str:
    return "minimax" if data in IMAGENET_LIKE else "dc"


def minimax_epochs(ipc: int) -> int:
    for limit, epochs in ((10, 2000), (50, 1500), (200, 1000), (500, 500)):
        if ipc <= limit:
            return epochs
    return 300


def make_protocol(name: str, data: str, ipc: int, model: str | None = None, epochs: int | None = None,
                  aug: str | None = None, batch_size: int | None = None, lr: float | None = None,
                  test_every: int | None = None, teacher_epochs: int | None = None) -> Protocol:
    channels = 1 if data in GRAYSCALE else 3
    mean, std = NORM.get(data, IMAGENET_NORM)
    natural = NATURAL_SIZE.get(data, 32)
    if name == "minimax":
        p = Protocol("minimax", model or "resnetap10", epochs or minimax_epochs(ipc), batch_size or 64, "sgd",
                     lr or 0.01, 0.9, 5e-4, "multistep(2/3,5/6;gamma=0.2)", aug or "minimax", 1.0, 0.0,
                     224 if data in IMAGENET_LIKE or data not in NATURAL_SIZE else natural,
                     256 if data in IMAGENET_LIKE or data not in NATURAL_SIZE else natural, channels, mean, std, 0)
        p.test_every = test_every if test_every is not None else max(1, p.epochs // 20)
    elif name == "dc":
        a = aug or "dsa"
        p = Protocol("dc", model or "convnet3", epochs or (1000 if a == "dsa" else 300), batch_size or 256, "sgd",
                     lr or 0.01, 0.9, 5e-4, "step(1/2;gamma=0.1)", a, 0.0, 0.0, natural, natural, channels, mean, std,
                     test_every or 0)
    elif name == "rded":
        size = 224 if data in IMAGENET_LIKE else natural
        p = Protocol("rded", model or "resnet18-modified", epochs or 500, batch_size or 64, "adamw", lr or 1e-3,
                     0.0, 0.01, "cosine", aug or "flip", 1.0, 0.8, size, size, channels, mean, std, test_every or 0,
                     kd_temperature=4.0, teacher_epochs=teacher_epochs or 50,
                     notes=["lr 1e-3, weight decay 0.01, batch 64, KD temperature 4 and a 50-epoch teacher are "
                            "vlcp's choices where the protocol is silent"])
    else:
        raise EvalError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    if aug and aug not in ("dsa", "none", "minimax", "flip"):
        raise EvalError(f"unknown augmentation {aug!r}")
    return p


# -- data ---------------------------------------------------------------------------------------
def _to_array(img, size: int, channels: int, crop_to: int | None = None) -> np.ndarray:
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if crop_to:  # Resize(size) on the short side, then CenterCrop(crop_to)
        s = size / min(img.size)
        img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
        left, top = (img.width - crop_to) // 2, (img.height - crop_to) // 2
        img = img.crop((left, top, left + crop_to, top + crop_to))
    elif img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    a = np.asarray(img, np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def tensors_from_samples(samples, size: int, channels: int, crop_to: int | None = None, progress: bool = False):
    """uint8 (N, C, H, W) and int64 labels, decoded once and kept in memory."""
    from tqdm.auto import tqdm

    xs, ys = [], []
    for s in tqdm(samples, desc="loading images", leave=False, disable=not progress or len(samples) < 2000):
        xs.append(_to_array(s.load(), size, channels, crop_to))
        ys.append(s.class_idx)
    return np.stack(xs), np.array(ys, np.int64)


def match_classes(folders: list[str], ds: Dataset) -> dict[str, int]:
    """Map synthetic class folders to dataset classes by canonical id or human name (case-insensitive)."""
    index = {}
    for i, c in enumerate(ds.classes):
        for key in (c.folder, c.name, c.name.split(",")[0].strip()):
            index.setdefault(key.lower(), i)
    mapping, unmatched = {}, []
    for f in folders:
        i = index.get(f.lower())
        if i is None:
            unmatched.append(f)
        else:
            mapping[f] = i
    if unmatched:
        raise EvalError(f"class folder(s) {', '.join(sorted(unmatched))} match no class of {ds.name} "
                        f"(expected ids like {', '.join(c.folder for c in ds.classes[:3])} or their names)")
    return mapping


def synthetic_samples(folder: Path, ds: Dataset, ipc: int | None):
    """The first ``ipc`` images (by file name) of each class folder, as Samples labelled for ``ds``."""
    from vlcp.datasets import Sample, _image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"{folder} is not a directory")
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise EvalError(f"{folder} has no class folders: expected an ImageFolder (one sub-folder per class)")
    mapping = match_classes([d.name for d in subdirs], ds)
    samples, counts = [], {}
    for d in subdirs:
        files = _image_files(d)
        if not files:
            raise EvalError(f"class folder {d.name} in {folder} holds no images")
        if ipc is not None:
            if len(files) < ipc:
                raise EvalError(f"--ipc {ipc} but class folder {d.name} holds only {len(files)} images")
            files = files[:ipc]
        counts[d.name] = len(files)
        samples += [Sample(mapping[d.name], str(p), "") for p in files]
    return samples, counts


# -- training -----------------------------------------------------------------------------------
def _schedule(opt, p: Protocol, steps_per_epoch: int):
    import torch

    total = p.epochs * steps_per_epoch
    if p.schedule.startswith("multistep"):
        miles = [total * 2 // 3, total * 5 // 6]
        return torch.optim.lr_scheduler.MultiStepLR(opt, miles, gamma=0.2)
    if p.schedule.startswith("step"):
        return torch.optim.lr_scheduler.MultiStepLR(opt, [total // 2], gamma=0.1)
    if p.schedule == "constant":
        return torch.optim.lr_scheduler.MultiStepLR(opt, [], gamma=1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total))


def _batch_transform(p: Protocol, num_classes: int):
    from torchvision.transforms import v2

    if p.mixup and p.cutmix:
        return v2.RandomChoice([v2.MixUp(alpha=p.mixup, num_classes=num_classes),
                                v2.CutMix(alpha=p.cutmix, num_classes=num_classes)])
    if p.cutmix:
        return v2.CutMix(alpha=p.cutmix, num_classes=num_classes)
    return None


def net_input(x: np.ndarray, p: Protocol, device: str):
    """uint8 (N, C, H, W) images -> the network's float input, normalised with the protocol's statistics."""
    import torch

    mean = torch.tensor(p.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(p.std, device=device).view(1, -1, 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(x)).to(device).float() / 255 - mean) / std


def accuracy(net, x: np.ndarray, y: np.ndarray, p: Protocol, device: str, batch: int = 500) -> float:
    import torch

    net.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast(device.split(":")[0], enabled=device.startswith("cuda")):
        for i in range(0, len(x), batch):
            correct += (net(net_input(x[i:i + batch], p, device)).argmax(1).cpu().numpy() == y[i:i + batch]).sum()
    net.train()
    return float(correct) / len(x)


def train(p: Protocol, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int, device: str,
          test: tuple[np.ndarray, np.ndarray] | None = None, teacher=None, progress: bool = True,
          desc: str = "train", resume: tuple | None = None, checkpoint_every: int = 0):
    """Train a fresh network; returns (net, {"accuracy", "best_during_training", "losses", "seconds"}).

    ``resume = (cache, stage, key)`` saves the whole training state there every ``checkpoint_every``
    epochs and continues from it when present, with the same batches and augmentations as an
    uninterrupted run.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from vlcp import augment, networks

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = networks.build(p.model, p.channels, num_classes, p.image_size).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    if p.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    elif p.optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    bs = min(p.batch_size, len(x))
    steps = math.ceil(len(x) / bs)
    sched = _schedule(opt, p, steps)
    mix = _batch_transform(p, num_classes)
    scaler = torch.amp.GradScaler(enabled=cuda)
    mean = torch.tensor(p.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(p.std, device=device).view(1, -1, 1, 1)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    best, losses, t0, start = None, [], time.perf_counter(), 0
    weights = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    saved = resume[0].get(resume[1], resume[2]) if resume else None
    if saved is not None:
        from vlcp import checkpoint

        meta = checkpoint.restore(saved, weights, opt, device)
        start, losses, best = meta["epoch"], meta["losses"], meta["best"]
        g.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
        sched.last_epoch = start * steps  # the restored optimizer already carries the scheduled lr
    bar = tqdm(range(start, p.epochs), desc=desc, initial=start, total=p.epochs, leave=False, disable=not progress)
    for epoch in bar:
        perm = torch.randperm(len(x), generator=g)
        tot, correct, seen = 0.0, 0, 0
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            xb = xt[idx].to(device).float() / 255
            yb = yt[idx].to(device)
            if p.aug == "minimax":
                xb = augment.minimax_train(xb, p.image_size, g)
            elif p.aug == "flip":
                flip = (torch.rand(len(xb), generator=g) < 0.5).to(device)
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            xb = (xb - mean) / std
            if p.aug == "dsa":
                xb = augment.dsa(xb, g)
            target = yb
            if mix is not None:
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))  # v2 mixers use the global RNG
                xb, target = mix(xb, yb)
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.split(":")[0], enabled=cuda):
                out = net(xb)
                loss = F.cross_entropy(out, target)
                if teacher is not None and p.kd_temperature:
                    with torch.no_grad():
                        t_out = teacher(xb)
                    T = p.kd_temperature
                    loss = F.kl_div(F.log_softmax(out / T, 1), F.softmax(t_out / T, 1), reduction="batchmean") * T * T
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            tot += float(loss.detach()) * len(xb)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(xb)
        losses.append(tot / seen)
        post = {"loss": f"{tot / seen:.3f}", "train_acc": f"{correct / seen:.3f}"}
        if test is not None and p.test_every and (epoch + 1) % p.test_every == 0 and epoch + 1 < p.epochs:
            acc = accuracy(net, *test, p, device)
            best = acc if best is None else max(best, acc)
            post["test_acc"] = f"{acc:.3f}"
        bar.set_postfix(post)
        if resume and checkpoint_every and (epoch + 1) % checkpoint_every == 0 and epoch + 1 < p.epochs:
            from vlcp import checkpoint

            checkpoint.save(resume[0], resume[1], resume[2], weights, opt,
                            {"epoch": epoch + 1, "losses": losses, "best": best, "generator": g.get_state().tolist()})
    bar.close()
    result = {"losses": losses, "seconds": round(time.perf_counter() - t0, 3)}
    if test is not None:
        final = accuracy(net, *test, p, device)
        result["accuracy"] = final
        result["best_during_training"] = max(final, best) if best is not None else None
    return net, result


def summarise(runs: list[dict]) -> dict:
    accs = np.array([r["accuracy"] for r in runs]) * 100
    out = {"mean": round(float(accs.mean()), 2), "std": round(float(accs.std()), 2),
           "per_seed": [round(float(a), 2) for a in accs]}
    bests = [r["best_during_training"] for r in runs]
    if all(b is not None for b in bests):
        b = np.array(bests) * 100
        out["best_during_training"] = {"mean": round(float(b.mean()), 2), "std": round(float(b.std()), 2),
                                       "per_seed": [round(float(v), 2) for v in b]}
    return out


def check_dataset(ds: Dataset) -> None:
    if not ds.samples:
        raise DatasetError(f"{ds.name} has no images in split {ds.split}")


TEACHER_VERSION = 1


def teacher_net(p: Protocol, ds: Dataset, x: np.ndarray, y: np.ndarray, test, device: str, cache,
                path: str | None, progress: bool) -> tuple[object, dict]:
    """The RDED teacher: the user's safetensors weights, or one trained on the real data and cached."""
    import torch

    from vlcp import networks
    from vlcp.cache import stage_key

    net = networks.build(p.model, p.channels, len(ds.classes), p.image_size).to(device)
    if path:
        from safetensors.torch import load_file

        try:
            net.load_state_dict(load_file(path, device="cpu"))
        except (OSError, RuntimeError) as exc:
            raise EvalError(f"cannot load teacher weights {path}: {exc}") from None
        info = {"source": str(path)}
    else:
        key = stage_key("teacher", TEACHER_VERSION, dataset=ds.identity(), model=p.model, epochs=p.teacher_epochs,
                        size=p.image_size, optimizer=p.optimizer, lr=p.lr)
        entry = cache.get("teacher", key)
        if entry is None:
            tp = Protocol(**{**asdict(p), "kd_temperature": 0.0, "cutmix": 0.0, "mixup": 0.0,
                             "epochs": p.teacher_epochs, "test_every": 0})
            trained, res = train(tp, x, y, len(ds.classes), 0, device, test=test, progress=progress,
                                 desc="teacher")
            state = {k: v.detach().cpu().numpy() for k, v in trained.state_dict().items()}
            entry = cache.put("teacher", key, {"accuracy": res.get("accuracy"), "epochs": p.teacher_epochs}, state)
        net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in entry.tensors.items()})
        info = {"source": "trained by vlcp", "key": key, "epochs": entry.meta["epochs"]}
    net.eval()
    info["accuracy"] = round(accuracy(net, *test, p, device) * 100, 2)
    return net, info


def run(synth_dir: str | None, data: str, data_dir, protocol: str | None, model: str | None, seeds: int,
        epochs: int | None, ipc: int | None, aug: str | None, device: str, cache, full: bool = False,
        teacher: str | None = None, teacher_epochs: int | None = None, test_every: int | None = None,
        progress: bool = True) -> dict:
    """Evaluate a synthetic ImageFolder (or the full real training set) under one protocol."""
    from vlcp import __version__
    from vlcp.datasets import load_dataset
    from vlcp.models import torch_device

    t0 = time.perf_counter()
    train_ds = load_dataset(data, data_dir, "train")
    test_ds = load_dataset(data, data_dir, "test")
    check_dataset(test_ds)
    if full:
        samples, counts = train_ds.samples, {}
        for s in samples:
            counts[train_ds.classes[s.class_idx].folder] = counts.get(train_ds.classes[s.class_idx].folder, 0) + 1
    else:
        samples, counts = synthetic_samples(Path(synth_dir), train_ds, ipc)
    per_class = min(counts.values())
    p = make_protocol(protocol or default_protocol(data), data, per_class, model, epochs, aug, test_every=test_every,
                      teacher_epochs=teacher_epochs)
    dev = torch_device(device)
    crop = p.image_size if p.load_size != p.image_size else None
    x, y = tensors_from_samples(samples, p.load_size, p.channels, progress=progress)
    xte, yte = tensors_from_samples(test_ds.samples, p.load_size, p.channels, crop_to=crop, progress=progress)
    tnet, tinfo = None, None
    if p.name == "rded":
        xr, yr = (x, y) if full else tensors_from_samples(train_ds.samples, p.load_size, p.channels,
                                                          progress=progress)
        tnet, tinfo = teacher_net(p, train_ds, xr, yr, (xte, yte), dev, cache, teacher, progress)
    runs = []
    for seed in range(seeds):
        _, res = train(p, x, y, len(train_ds.classes), seed, dev, test=(xte, yte), teacher=tnet, progress=progress,
                       desc=f"seed {seed}")
        res["seed"] = seed
        res["final_loss"] = round(res["losses"][-1], 4) if res["losses"] else None
        runs.append(res)
    return {
        "vlcp_version": __version__, "synthetic": None if full else str(synth_dir), "full": full,
        "dataset": train_ds.identity(), "test_split": {"split": test_ds.split, "images": len(test_ds.samples)},
        "images_per_class": counts, "train_images": len(samples), "protocol": asdict(p), "device": dev,
        "teacher": tinfo, "accuracy": summarise(runs), "seeds": runs, "seconds": round(time.perf_counter() - t0, 2),
    }
