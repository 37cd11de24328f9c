"""The evaluation training loop: a network trained under a ``Protocol`` (optimiser, augmentation, CutMix,
soft labels) and tested on the real test split. The refinement detector and DM/DC reuse it."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlcp.evaluation.protocols import Protocol, lr_factor, tested_epochs
from vlcp.store import scalars


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


def kd_loss(student_logits, teacher_logits, temperature: float):
    """RDED's loss: KL(softmax(teacher / T) || softmax(student / T)), batch mean, not rescaled by T^2."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                    reduction="batchmean")


def _optimizer(net, p: Protocol):
    import torch

    params = list(net.named_parameters())
    if p.wd_scope == "weights":
        groups = [{"params": [v for k, v in params if "weight" in k and v.dim() > 1]},
                  {"params": [v for k, v in params if not ("weight" in k and v.dim() > 1)], "weight_decay": 0.0}]
    else:
        groups = [v for _, v in params]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    if p.optimizer == "adam":
        return torch.optim.Adam(groups, lr=p.lr, weight_decay=p.weight_decay)
    return torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.999), weight_decay=p.weight_decay)


def _batch_transform(p: Protocol, num_classes: int):
    from torchvision.transforms import v2

    if p.mix != "torchvision":
        return None
    if p.mixup and p.cutmix:
        return v2.RandomChoice([v2.MixUp(alpha=p.mixup, num_classes=num_classes),
                                v2.CutMix(alpha=p.cutmix, num_classes=num_classes)])
    if p.cutmix:
        return v2.CutMix(alpha=p.cutmix, num_classes=num_classes)
    return None


def _augment(xb, p: Protocol, g, mean, std):
    """uint8-derived [0, 1] batch -> augmented, normalised network input."""
    import torch

    from vlcp.evaluation import augment

    if p.aug == "minimax":
        xb = augment.minimax_train(xb, p.image_size, g)
    elif p.aug == "rded":
        xb = augment.rded_train(xb, p.image_size, p.factor, g)
    elif p.aug == "flip":
        flip = (torch.rand(len(xb), generator=g) < 0.5).to(xb.device)
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
    xb = (xb - mean) / std
    if p.aug == "dsa":
        xb = augment.dsa(xb, g)
    return xb


def _loss(net, xb, yb, p: Protocol, g, mix, teacher):
    """(loss, logits) of one batch under the protocol's mixing and labels."""
    import torch
    import torch.nn.functional as F

    from vlcp.evaluation import augment

    if p.mix == "reference" and p.cutmix:
        xb, perm, keep = augment.cutmix(xb, p.cutmix, g)
        if p.no_grad_forward:
            with torch.no_grad():  # RDED's student(images) after its in-place cutmix: the *mixed* batch, in train
                net(xb)  # mode, so batch-norm statistics see every mixed batch twice
        out = net(xb)
        if teacher is not None:
            return _kd(out, teacher, xb, p), out
        return F.cross_entropy(out, yb) * keep + F.cross_entropy(out, yb[perm]) * (1 - keep), out
    target = yb
    if mix is not None:
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))  # v2 mixers use the global RNG
        xb, target = mix(xb, yb)
    out = net(xb)
    if teacher is not None and p.kd_temperature:
        return _kd(out, teacher, xb, p), out
    return F.cross_entropy(out, target), out


def _kd(out, teacher, xb, p: Protocol):
    import torch

    with torch.no_grad():
        t_out = teacher(xb)
    return kd_loss(out, t_out, p.kd_temperature)


def _soft_loss(net, xb, target, temperature: float):
    """SRe²L / FKD: KL(stored soft label || softmax(student / T)), batch mean; the stored labels are already
    softmax(teacher / T), so this is ``kd_loss`` with the teacher's logits stored."""
    import torch.nn.functional as F

    out = net(xb)
    return F.kl_div(F.log_softmax(out / temperature, 1), target, reduction="batchmean"), out



@dataclass
class _Epoch:
    """One epoch of ``train``: its batches in a fresh permutation, the lr of each step, one optimizer step
    each; returns (summed loss, correct, seen) and appends the epoch's first lr to ``lrs``."""
    net: Any
    opt: Any
    scaler: Any
    p: Protocol
    g: Any  # the training generator: permutation, augmentation and mixing draw from it in this order
    mix: Any
    teacher: Any
    soft: Any
    mean: Any
    std: Any
    device: str

    def __call__(self, xt, yt, epoch: int, bs: int, steps: int, lrs: list) -> tuple[float, int, int]:
        import torch

        p, opt, cuda = self.p, self.opt, self.device.startswith("cuda")
        perm = torch.randperm(len(xt), generator=self.g)
        tot, correct, seen = 0.0, 0, 0
        for s in range(steps):
            set_lr(opt, p, epoch, s, steps, lrs)
            idx = perm[s * bs:(s + 1) * bs]
            loss, out, yb = self._step(xt, yt, idx, epoch, cuda)
            tot += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(idx)
        return tot, correct, seen

    def _step(self, xt, yt, idx, epoch: int, cuda: bool):
        import torch

        p, device = self.p, self.device
        if self.soft is None:
            xb = _augment(xt[idx].to(device).float() / 255, p, self.g, self.mean, self.std)
        else:  # this epoch's stored crops and their soft labels: no other augmentation, no mixing
            xb, target = self.soft.inputs(xt, idx, epoch, p.image_size, device)
            xb = (xb - self.mean) / self.std
        yb = yt[idx].to(device)
        if cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.split(":")[0], enabled=cuda):
            if self.soft is None:
                loss, out = _loss(self.net, xb, yb, p, self.g, self.mix, self.teacher)
            else:
                loss, out = _soft_loss(self.net, xb, target, self.soft.temperature)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss, out, yb


def train(p: Protocol, data: tuple[np.ndarray, np.ndarray, int], seed: int, device: str,
          test: tuple[np.ndarray, np.ndarray] | None = None, teacher=None, progress: bool | str = True,
          resume: tuple | None = None, curve: str | None = None, soft=None):
    """Train a fresh network; returns (net, {"accuracy", "best_during_training", "tests", "lrs", "losses", ...}).

    ``data = (x, y, number of classes)``; ``progress`` is False, True or the bar's name.
    ``resume = (cache, stage, key, every)`` saves the whole training state there every ``every``
    epochs and continues from it when present, with the same batches and augmentations as an
    uninterrupted run. ``curve``: the TensorBoard section of its scalars (``--log-dir``: loss, lr, training
    ``accuracy`` per epoch, ``test_accuracy`` when tested), by default ``<protocol>-<model>/run<seed>``.
    ``soft``: stored soft labels (``vlcp.evaluation.relabel.SoftLabels``, rows as ``x``): epoch e trains on
    stored crop e mod M of each image with KL to its stored label, instead of the protocol's augmentation,
    mixing and labels (FKD); without them the path (and its random numbers) is the hard-label one.
    """
    import torch
    from tqdm.auto import tqdm

    from vlcp.evaluation import networks

    x, y, num_classes = data
    checkpoint_every = resume[3] if resume else 0
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = networks.build(p.model, p.channels, num_classes, p.image_size).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    opt = _optimizer(net, p)
    bs = min(p.batch_size, len(x))
    steps = math.ceil(len(x) / bs)
    mix = _batch_transform(p, num_classes)
    scaler = torch.amp.GradScaler(enabled=cuda)
    mean = torch.tensor(p.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(p.std, device=device).view(1, -1, 1, 1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    state = {"losses": [], "tests": [], "lrs": []}
    t0 = time.perf_counter()
    start, due = 0, set(tested_epochs(p))
    weights = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    saved = resume[0].get(resume[1], resume[2]) if resume else None
    if saved is not None:
        from vlcp.store import checkpoint

        meta = checkpoint.restore(saved, weights, opt, device)
        start = meta["epoch"]
        state = {"losses": meta["losses"], "tests": meta.get("tests", []), "lrs": meta.get("lrs", [])}
        g.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
    bar = tqdm(range(start, p.epochs), desc=progress if isinstance(progress, str) else "train", initial=start,
               total=p.epochs, leave=False, disable=progress is False)
    for epoch in bar:
        run = _Epoch(net, opt, scaler, p, g, mix, teacher, soft, mean, std, device)
        tot, correct, seen = run(xt, yt, epoch, bs, steps, state["lrs"])
        state["losses"].append(tot / seen)
        post = {"loss": f"{tot / seen:.3f}", "train_acc": f"{correct / seen:.3f}"}
        if test is not None and epoch + 1 in due and epoch + 1 < p.epochs:
            state["tests"].append([epoch + 1, accuracy(net, *test, p, device)])
            post["test_acc"] = f"{state['tests'][-1][1]:.3f}"
        bar.set_postfix(post)
        _curves(curve, p, seed, epoch + 1, state, correct / seen)
        if resume and checkpoint_every and (epoch + 1) % checkpoint_every == 0 and epoch + 1 < p.epochs:
            from vlcp.store import checkpoint

            checkpoint.save(resume[0], resume[1], resume[2], weights, opt,
                            {"epoch": epoch + 1, **state, "generator": g.get_state().tolist()})
    bar.close()
    result = _result(net, p, state, test, device, t0)
    if test is not None and p.epochs > start:
        _curves(curve, p, seed, p.epochs, {"tests": [[p.epochs, result["accuracy"]]]})
    return net, result


def _curves(curve: str | None, p: Protocol, seed: int, epoch: int, state: dict, train_acc: float | None = None):
    """TensorBoard points of ``epoch`` (``--log-dir``), from values the loop already has: no extra sync."""
    with scalars.section(f"{p.name}-{p.model}/run{seed}" if curve is None else curve):
        if train_acc is not None:
            scalars.add("loss", state["losses"][-1], epoch)
            scalars.add("lr", state["lrs"][-1], epoch)
            scalars.add("accuracy", train_acc, epoch)
        if state["tests"] and state["tests"][-1][0] == epoch:
            scalars.add("test_accuracy", state["tests"][-1][1], epoch)


def _result(net, p: Protocol, state: dict, test, device: str, t0: float) -> dict:
    """The final accuracy (headline) and, separately, the best of the protocol's tests."""
    result = {"losses": state["losses"], "lrs": state["lrs"], "seconds": round(time.perf_counter() - t0, 3)}
    if test is not None:
        final = accuracy(net, *test, p, device)
        tests = state["tests"] + ([[p.epochs, final]] if p.epochs in tested_epochs(p) else [])
        result["accuracy"] = final
        result["tests"] = tests
        result["best_during_training"] = max(a for _, a in tests) if tests else None
    return result


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


def best_label(best_after: float) -> str:
    """The column title of the protocol's "best" figure."""
    if best_after:
        return f"best in last {round(100 * (1 - best_after))}% (RDED's figure)"
    return "best-during-training"


def set_lr(opt, p: Protocol, epoch: int, step: int, steps_per_epoch: int, lrs: list) -> None:
    """Every parameter group at the scheduled lr of (epoch, step within it); an epoch's first lr goes to ``lrs``
    (the recorded curve). One place for the classifier and the caption-fusion loops alike."""
    for group in opt.param_groups:
        group["lr"] = p.lr * lr_factor(p, epoch, epoch * steps_per_epoch + step, steps_per_epoch)
    if step == 0:
        lrs.append(opt.param_groups[0]["lr"])
