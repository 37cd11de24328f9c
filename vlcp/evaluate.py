"""``vlcp evaluate``: train a network on a distilled set, test it on the real test split.

Three protocols; every value is recorded in the results JSON with where it comes from
(``protocol.sources``: the paper, a file of the public reference code, or vlcp's choice):

- ``minimax`` (ImageNet subsets; VLCP Tables 1-2): the Minimax script the VLCP repository ships
  (``04_evaluation/Minimax``): ResNetAP-10 with instance norm at 224 px; SGD 0.01, momentum 0.9,
  wd 5e-4, batch 64; epochs by IPC (1: 3000, <=10: 2000, <=50: 1500, <=200: 1000, <=500: 500, more: 300;
  x2/3 for 100 classes); lr x0.2 after epochs 2E/3 and 5E/6; Resize(224)+CenterCrop(224), then
  RandomResizedCrop(0.5-1), flip, colour jitter 0.4 (random order), lighting 0.1, CutMix (Beta(1, 1),
  every batch, loss mixed by box area); test Resize(224)+CenterCrop(224), every E/100 epochs.
- ``dc`` (digits, Fashion-MNIST, CIFAR): ConvNet-3 at the data's own size; SGD 0.01, momentum 0.9,
  wd 5e-4, batch 256; 1000 epochs with DSA or 300 without (``--aug none``); lr x0.1 at half; one test.
- ``rded`` (VLCP Tables 3-4): RDED's evaluation (``04_evaluation/RDED``): a student trained only on a
  teacher's soft labels of CutMix-ed images (KL at temperature 20), AdamW 1e-3 (wd 0.01 on weights),
  half-cosine lr per epoch, ShufflePatches + RandomResizedCrop(1/factor-1) + flip, batch by IPC and
  class count, 500 epochs, ImageNet normalisation; it reports the best test accuracy among the
  tests every 10 epochs in the last 20 % of training.

The headline figure is always the accuracy after the last epoch. The protocol's own "best" figure
(model selection on the test set, which both reference scripts report) is in its own column.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
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

MINIMAX = "Minimax script (VLCP repo 04_evaluation/Minimax/"
RDED = "RDED script (VLCP repo 04_evaluation/RDED/"
VLCP = "vlcp's choice"


class EvalError(Exception):
    pass


@dataclass
class Protocol:
    """Every training and testing setting of one evaluation; built with keywords, recorded as is."""
    name: str
    model: str
    epochs: int
    batch_size: int
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    wd_scope: str = "all"  # "weights": no decay on biases and norm parameters (RDED's get_parameters)
    schedule: str = "constant"
    aug: str = "none"
    mix: str = "torchvision"  # torchvision: v2 MixUp/CutMix by the alphas below; reference: rand_bbox CutMix
    cutmix: float = 0.0
    mixup: float = 0.0
    factor: int = 1  # RDED's ShufflePatches / RandomResizedCrop factor
    image_size: int = 32
    load_size: int = 32  # training images are loaded at this side ...
    load_crop: bool = False  # ... by Resize(short side) + CenterCrop (True) or by squashing (False)
    test_resize: int = 0  # test: Resize(short side) to this, then CenterCrop(image_size); 0: loaded as training
    channels: int = 3
    mean: tuple = IMAGENET_NORM[0]
    std: tuple = IMAGENET_NORM[1]
    test_every: int = 0
    best_after: float = 0.0  # only tests after this share of the epochs count for the "best" column
    kd_temperature: float = 0.0
    clean_forward: bool = False  # RDED also runs the student on the unmixed batch (updates batch-norm stats)
    teacher: str = ""
    teacher_epochs: int = 0
    sources: dict = field(default_factory=dict)


@dataclass
class EvalConfig:
    """One ``vlcp evaluate`` call: what to train on, under which protocol, with which overrides."""
    data: str
    synth_dir: str | None = None
    full: bool = False
    data_dir: str = "data"
    protocol: str | None = None
    model: str | None = None
    seeds: int = 3
    epochs: int | None = None
    ipc: int | None = None
    aug: str | None = None
    device: str = "auto"
    teacher: str | None = None
    teacher_epochs: int | None = None
    test_every: int | None = None
    progress: bool = True
    caption_fusion: bool = False  # also the separate caption-concatenation row (vlcp.caption_fusion)
    captioner: str | None = None  # --caption-fusion: captioner of the images without a prompt, and of the test set
    clip: str | None = None  # --caption-fusion: the text encoder
    tiny: bool = False  # --caption-fusion: the tiny LLaVA and tiny CLIP
    fusion_prompt: str | None = None  # --caption-fusion: the class-agnostic caption prompt


def default_protocol(data: str) -> str:
    return "minimax" if data in IMAGENET_LIKE else "dc"


def minimax_epochs(ipc: int, num_classes: int = 10) -> int:
    """Minimax ``argument.py:ipc_epoch`` (factor 1)."""
    epochs = 3000 if ipc == 1 else next((e for limit, e in ((10, 2000), (50, 1500), (200, 1000), (500, 500))
                                         if ipc <= limit), 300)
    if num_classes == 100:
        epochs = int(2 / 3 * epochs)
        epochs -= epochs % 100
    return epochs


def rded_batch_size(ipc: int, num_classes: int) -> tuple[int, str]:
    """RDED ``argument.py``: 10/50/100 for IPC 1/10/50, x2 for 100 or 1000 classes, at most ipc x classes."""
    if ipc in (1, 10, 50):
        bs, src = {1: 10, 10: 50, 50: 100}[ipc], f"{RDED}argument.py re_batch_size)"
    else:
        bs = 10 if ipc < 10 else 50 if ipc < 50 else 100
        src = f"{VLCP}: RDED defines IPC 1/10/50 only, the next row up is used"
    if num_classes in (100, 1000):
        bs *= 2
    return min(bs, ipc * num_classes), src


def _minimax(data: str, ipc: int, n: int, epochs: int | None) -> Protocol:
    imagenet = data in IMAGENET_LIKE or data not in NATURAL_SIZE
    e = epochs or minimax_epochs(ipc, n)
    size = 224 if imagenet else NATURAL_SIZE[data]
    a = f"{MINIMAX}argument.py defaults)"
    return Protocol(
        name="minimax", model="resnetap10", epochs=e, batch_size=64, optimizer="sgd", lr=0.01, momentum=0.9,
        weight_decay=5e-4, schedule="multistep-epoch(2/3,5/6;gamma=0.2)", aug="minimax", mix="reference",
        cutmix=1.0, image_size=size, load_size=size, load_crop=imagenet, test_resize=size if imagenet else 0,
        test_every=max(1, e // 100),
        sources={"model": "VLCP run_nette.sh (-n resnet_ap --norm_type instance, depth 10)",
                 "epochs": f"{MINIMAX}argument.py ipc_epoch)", "batch_size": a, "lr": a, "momentum": a,
                 "weight_decay": a, "schedule": f"{MINIMAX}train.py MultiStepLR, stepped per epoch)",
                 "aug": f"{MINIMAX}data.py transform_imagenet; misc/utils.py ColorJitter, Lighting)",
                 "mix": f"{MINIMAX}train.py train_epoch, misc/utils.py rand_bbox; --beta 1, --mix_p 1)",
                 "image_size": f"{MINIMAX}argument.py --size 224)" if imagenet else f"{VLCP}: natural size",
                 "load_size": f"{MINIMAX}data.py: Resize(224)+CenterCrop(224) before augmenting)",
                 "test_resize": f"{MINIMAX}data.py: test Resize(224)+CenterCrop(224))",
                 "test_every": f"{MINIMAX}argument.py epoch_print_freq = epochs // 100; train.py best_acc1)",
                 "mean": f"{MINIMAX}data.py MEANS['imagenet'])"})


def _dc(data: str, aug: str | None, epochs: int | None) -> Protocol:
    a = aug or "dsa"
    natural = NATURAL_SIZE.get(data, 32)
    dc = "DC/DSA evaluation (Zhao et al. 2021; not part of the VLCP repo)"
    return Protocol(
        name="dc", model="convnet3", epochs=epochs or (1000 if a == "dsa" else 300), batch_size=256, optimizer="sgd",
        lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="step(1/2;gamma=0.1)", aug=a, image_size=natural,
        load_size=natural, test_every=0,
        sources={k: dc for k in ("model", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "aug")}
        | {"test_every": f"{dc}: one test at the end"})


def _rded(data: str, ipc: int, n: int, epochs: int | None) -> Protocol:
    big = data in IMAGENET_LIKE or data not in NATURAL_SIZE
    size = 224 if big else NATURAL_SIZE[data]
    bs, bs_src = rded_batch_size(ipc, n)
    script = "imagenet-1k_10ipc_resnet-18_to_resnet-18_cr5.sh" if big else "cifar10_10ipc_..._cr5.sh"
    arg = f"{RDED}argument.py)"
    return Protocol(
        name="rded", model="resnet18-bn" if big else "resnet18-modified", epochs=epochs or 500, batch_size=bs,
        optimizer="adamw", lr=1e-3, momentum=0.0, weight_decay=0.01, wd_scope="weights", schedule="half-cosine-epoch",
        aug="rded", mix="reference", cutmix=1.0, factor=2 if big else 1, image_size=size, load_size=size,
        test_resize=size // 7 * 8, test_every=10, best_after=0.8, kd_temperature=20.0, clean_forward=True,
        sources={"model": f"{RDED}{script} --stud-name)", "epochs": f"{RDED}{script} --re-epochs 500)",
                 "batch_size": bs_src, "optimizer": f"{RDED}validation/main.py AdamW betas 0.9/0.999)",
                 "lr": f"{arg[:-1]} adamw_lr for resnet18 / resnet18_modified)",
                 "weight_decay": f"{arg[:-1]} --adamw-weight-decay)",
                 "wd_scope": f"{RDED}validation/utils.py get_parameters)",
                 "schedule": f"{RDED}validation/main.py LambdaLR 0.5*(1+cos(pi*epoch/E/2)), per epoch)",
                 "aug": f"{RDED}validation/main.py: ShufflePatches, RandomResizedCrop, flip)",
                 "mix": f"{RDED}argument.py --mix-type cutmix, --cutmix 1; validation/utils.py cutmix)",
                 "factor": f"{RDED}{script} --factor)", "image_size": f"{arg[:-1]} input_size)",
                 "load_size": f"{VLCP}: images squashed to image_size (RDED feeds them as saved)",
                 "test_resize": f"{RDED}validation/main.py Resize(size // 7 * 8) + CenterCrop(size))",
                 "test_every": f"{RDED}validation/main.py: every 10 epochs and the last)",
                 "best_after": f"{RDED}validation/main.py: only epochs > 0.8 E are tested)",
                 "kd_temperature": f"{arg[:-1]}: 20 with cutmix, 4 with mixup)",
                 "clean_forward": f"{RDED}validation/main.py train(): student(images) under no_grad)",
                 "mean": f"{RDED}validation/main.py Normalize: ImageNet statistics for every dataset)",
                 "teacher": f"{RDED}synthesize/utils.py load_model: torchvision resnet18, ImageNet weights)",
                 "teacher_epochs": f"{VLCP}: epochs of the teacher vlcp trains when none is given"})


def make_protocol(name: str, data: str, ipc: int, model: str | None = None, epochs: int | None = None,
                  aug: str | None = None, num_classes: int = 10, **overrides) -> Protocol:
    """The protocol's settings for this dataset, IPC and class count; ``overrides`` (batch_size, lr,
    test_every, teacher_epochs) and model/epochs/aug replace defaults and are recorded as the user's."""
    if name == "minimax":
        p = _minimax(data, ipc, num_classes, epochs)
    elif name == "dc":
        p = _dc(data, aug, epochs)
    elif name == "rded":
        p = _rded(data, ipc, num_classes, epochs)
        p.teacher = "torchvision:resnet18" if p.model == "resnet18-bn" and data == "imagenet" else "trained by vlcp"
        p.teacher_epochs = 50
        if p.teacher == "trained by vlcp":
            p.sources["teacher"] = (f"{VLCP}: RDED's observers (data/pretrain_models/*.pth) are pickles vlcp never "
                                    "loads; pass one converted to safetensors with --teacher")
    else:
        raise EvalError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    if aug and aug not in ("dsa", "none", "minimax", "flip", "rded"):
        raise EvalError(f"unknown augmentation {aug!r}")
    p.channels = 1 if data in GRAYSCALE else 3
    if p.name != "rded" or p.channels == 1 or data in ("digits", "fashion-mnist"):
        p.mean, p.std = NORM.get(data, IMAGENET_NORM)
    user = {"model": model, "epochs": epochs, "aug": aug, **{k: v for k, v in overrides.items() if v is not None}}
    for key, value in user.items():
        if value is not None:
            setattr(p, key, value)
            p.sources[key] = f"user (--{key.replace('_', '-')})"
    if tuple(p.mean) != IMAGENET_NORM[0]:
        p.sources["mean"] = f"{VLCP}: the dataset's own statistics (digits': measured on its training split)"
    p.sources["std"] = p.sources.get("mean", VLCP)
    for key in asdict(p):
        p.sources.setdefault(key, VLCP if key not in ("name", "channels", "sources") else "dataset / protocol name")
    p.sources.pop("sources", None)
    return p


def tested_epochs(p: Protocol) -> list[int]:
    """The epochs (1-based) after which the test set is evaluated for the protocol's "best" column."""
    e = p.epochs
    if not p.test_every:
        return []
    if p.best_after:  # RDED: 0-based epoch i when (i % 10 == 9 or i == E - 1) and i > 0.8 E
        return [i + 1 for i in range(e) if (i % p.test_every == p.test_every - 1 or i == e - 1)
                and i > p.best_after * e]
    return [i for i in range(1, e + 1) if i % p.test_every == 0]  # Minimax: epoch % epoch_print_freq == 0


def lr_factor(p: Protocol, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``p.lr`` at 0-based ``epoch`` and global optimiser ``step``."""
    if p.schedule.startswith("multistep-epoch"):
        return 0.2 ** sum(epoch >= m for m in (2 * p.epochs // 3, 5 * p.epochs // 6))
    if p.schedule.startswith("multistep"):  # per step, at 2/3 and 5/6 of all steps
        total = p.epochs * steps_per_epoch
        return 0.2 ** sum(step >= m for m in (total * 2 // 3, total * 5 // 6))
    if p.schedule.startswith("step"):
        return 0.1 if step >= p.epochs * steps_per_epoch // 2 else 1.0
    if p.schedule == "half-cosine-epoch":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / p.epochs / 2))
    if p.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(1, p.epochs * steps_per_epoch)))
    return 1.0


# -- data ---------------------------------------------------------------------------------------
def to_array(img, size: int, channels: int, crop_to: int | None = None) -> np.ndarray:
    """PIL image -> uint8 (C, H, W) at the protocol's size (``imageops.resize_crop``)."""
    from vlcp.imageops import resize_crop

    a = np.asarray(resize_crop(img.convert("L" if channels == 1 else "RGB"), size, crop_to), np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)




def tensors_from_samples(samples, size: int, channels: int, crop_to: int | None = None, progress: bool = False):
    """uint8 (N, C, H, W) and int64 labels, decoded once and kept in memory."""
    from tqdm.auto import tqdm

    xs, ys = [], []
    for s in tqdm(samples, desc="loading images", leave=False, disable=not progress or len(samples) < 2000):
        xs.append(to_array(s.load(), size, channels, crop_to))
        ys.append(s.class_idx)
    return np.stack(xs), np.array(ys, np.int64)


def train_tensors(samples, p: Protocol, progress: bool = False):
    return tensors_from_samples(samples, p.load_size, p.channels, p.load_size if p.load_crop else None, progress)


def test_tensors(samples, p: Protocol, progress: bool = False):
    if p.test_resize:
        return tensors_from_samples(samples, p.test_resize, p.channels, p.image_size, progress)
    return train_tensors(samples, p, progress)


def match_classes(folders: list[str], ds: Dataset) -> dict[str, int]:
    """Map synthetic class folders to dataset classes by canonical id or human name (case-insensitive)."""
    from vlcp.classnames import class_index, lookup

    index = class_index(ds.classes)
    mapping = {f: lookup(index, f) for f in folders}
    unmatched = [f for f, i in mapping.items() if i is None]
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
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and d.name != "evaluations")
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

    from vlcp import augment

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

    from vlcp import augment

    if p.mix == "reference" and p.cutmix:
        if p.clean_forward:
            with torch.no_grad():
                net(xb)  # RDED scores the unmixed batch in train mode: batch-norm statistics see it too
        xb, perm, keep = augment.cutmix(xb, p.cutmix, g)
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


def train(p: Protocol, data: tuple[np.ndarray, np.ndarray, int], seed: int, device: str,
          test: tuple[np.ndarray, np.ndarray] | None = None, teacher=None, progress: bool | str = True,
          resume: tuple | None = None):
    """Train a fresh network; returns (net, {"accuracy", "best_during_training", "tests", "lrs", "losses", ...}).

    ``data = (x, y, number of classes)``; ``progress`` is False, True or the bar's name.
    ``resume = (cache, stage, key, every)`` saves the whole training state there every ``every``
    epochs and continues from it when present, with the same batches and augmentations as an
    uninterrupted run.
    """
    import torch
    from tqdm.auto import tqdm

    from vlcp import networks

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
        from vlcp import checkpoint

        meta = checkpoint.restore(saved, weights, opt, device)
        start = meta["epoch"]
        state = {"losses": meta["losses"], "tests": meta.get("tests", []), "lrs": meta.get("lrs", [])}
        g.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
    bar = tqdm(range(start, p.epochs), desc=progress if isinstance(progress, str) else "train", initial=start,
               total=p.epochs, leave=False, disable=progress is False)
    for epoch in bar:
        perm = torch.randperm(len(x), generator=g)
        tot, correct, seen = 0.0, 0, 0
        for s in range(steps):
            for group in opt.param_groups:
                group["lr"] = p.lr * lr_factor(p, epoch, epoch * steps + s, steps)
            if s == 0:
                state["lrs"].append(opt.param_groups[0]["lr"])
            idx = perm[s * bs:(s + 1) * bs]
            xb = _augment(xt[idx].to(device).float() / 255, p, g, mean, std)
            yb = yt[idx].to(device)
            if cuda:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.split(":")[0], enabled=cuda):
                loss, out = _loss(net, xb, yb, p, g, mix, teacher)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            tot += float(loss.detach()) * len(xb)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(xb)
        state["losses"].append(tot / seen)
        post = {"loss": f"{tot / seen:.3f}", "train_acc": f"{correct / seen:.3f}"}
        if test is not None and epoch + 1 in due and epoch + 1 < p.epochs:
            state["tests"].append([epoch + 1, accuracy(net, *test, p, device)])
            post["test_acc"] = f"{state['tests'][-1][1]:.3f}"
        bar.set_postfix(post)
        if resume and checkpoint_every and (epoch + 1) % checkpoint_every == 0 and epoch + 1 < p.epochs:
            from vlcp import checkpoint

            checkpoint.save(resume[0], resume[1], resume[2], weights, opt,
                            {"epoch": epoch + 1, **state, "generator": g.get_state().tolist()})
    bar.close()
    return net, _result(net, p, state, test, device, t0)


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


def check_dataset(ds: Dataset) -> None:
    if not ds.samples:
        raise DatasetError(f"{ds.name} has no images in split {ds.split}")


TEACHER_VERSION = 2


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


def teacher_net(p: Protocol, ds: Dataset, real, test, device: str, cache, path: str | None,
                progress: bool) -> tuple[object, dict]:
    """The RDED teacher: the user's safetensors weights, torchvision's (ImageNet-1K), or one vlcp trains once."""
    from vlcp import networks
    from vlcp.cache import stage_key
    from vlcp.tensors import numpy_to_state, state_to_numpy

    net = networks.build(p.model, p.channels, len(ds.classes), p.image_size).to(device)
    if path:
        from safetensors.torch import load_file

        try:
            net.load_state_dict(load_file(path, device="cpu"))
        except (OSError, RuntimeError) as exc:
            raise EvalError(f"cannot load teacher weights {path}: {exc}") from None
        info = {"source": str(path)}
    elif p.teacher.startswith("torchvision:"):
        net, info = _torchvision_teacher(p, ds, device), {"source": "torchvision resnet18 ImageNet weights (RDED's)"}
    else:
        tp = replace(p, kd_temperature=0.0, mix="torchvision", cutmix=0.0, mixup=0.0, clean_forward=False,
                     epochs=p.teacher_epochs, test_every=0, best_after=0.0, sources={})
        key = stage_key("teacher", TEACHER_VERSION, dataset=ds.identity(), protocol=asdict(tp))
        entry = cache.get("teacher", key, verify=True)
        if entry is None:
            trained, res = train(tp, (*real(), len(ds.classes)), 0, device, test=test,
                                 progress=progress and "teacher")
            state = state_to_numpy(trained.state_dict(), keep_dtype=True)
            entry = cache.put("teacher", key, {"accuracy": res.get("accuracy"), "epochs": p.teacher_epochs}, state)
        net.load_state_dict(numpy_to_state(entry.tensors))
        info = {"source": "trained by vlcp (not RDED's observer)", "key": key, "epochs": entry.meta["epochs"]}
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    info["accuracy"] = round(accuracy(net, *test, p, device) * 100, 2)
    return net, info


def _training_set(cfg: EvalConfig, train_ds: Dataset):
    if cfg.full:
        counts: dict[str, int] = {}
        for s in train_ds.samples:
            folder = train_ds.classes[s.class_idx].folder
            counts[folder] = counts.get(folder, 0) + 1
        return train_ds.samples, counts
    return synthetic_samples(Path(cfg.synth_dir), train_ds, cfg.ipc)


def run(cfg: EvalConfig, cache) -> dict:
    """Evaluate a synthetic ImageFolder (or the full real training set) under one protocol."""
    from vlcp import __version__
    from vlcp.datasets import load_dataset
    from vlcp.models import torch_device

    t0 = time.perf_counter()
    train_ds = load_dataset(cfg.data, cfg.data_dir, "train")
    test_ds = load_dataset(cfg.data, cfg.data_dir, "test")
    check_dataset(test_ds)
    samples, counts = _training_set(cfg, train_ds)
    p = make_protocol(cfg.protocol or default_protocol(cfg.data), cfg.data, min(counts.values()), cfg.model,
                      cfg.epochs, cfg.aug, len(train_ds.classes), test_every=cfg.test_every,
                      teacher_epochs=cfg.teacher_epochs)
    if cfg.teacher:
        p.teacher, p.sources["teacher"] = str(cfg.teacher), "user (--teacher)"
    dev = torch_device(cfg.device)
    fusion = _fusion_setup(cfg, p, cache, dev)  # models resolved before any training: a missing one fails fast
    x, y = train_tensors(samples, p, cfg.progress)
    test = test_tensors(test_ds.samples, p, cfg.progress)
    tnet, tinfo = None, None
    if p.name == "rded":
        def real():
            return (x, y) if cfg.full else train_tensors(train_ds.samples, p, cfg.progress)

        tnet, tinfo = teacher_net(p, train_ds, real, test, dev, cache, cfg.teacher, cfg.progress)
    runs = []
    for seed in range(cfg.seeds):
        _, res = train(p, (x, y, len(train_ds.classes)), seed, dev, test=test, teacher=tnet,
                       progress=cfg.progress and f"seed {seed}")
        res["seed"] = seed
        res["final_loss"] = round(res["losses"][-1], 4) if res["losses"] else None
        runs.append(res)
    fused = _fused_row(cfg, fusion, cache, (samples, x, y), train_ds, (test_ds, test)) if fusion else None
    return {
        "vlcp_version": __version__, "synthetic": None if cfg.full else str(cfg.synth_dir), "full": cfg.full,
        "dataset": train_ds.identity(), "test_split": {"split": test_ds.split, "images": len(test_ds.samples)},
        "images_per_class": counts, "train_images": len(samples), "protocol": asdict(p),
        "best_label": best_label(p.best_after), "device": dev, "teacher": tinfo, "accuracy": summarise(runs),
        "seeds": runs, **({"caption_fusion": fused} if fused else {}), "seconds": round(time.perf_counter() - t0, 2),
    }


def _fusion_setup(cfg: EvalConfig, p: Protocol, cache, device: str):
    """``--caption-fusion``'s resolved models (vlcp.caption_fusion.prepare), or None without the flag."""
    if not cfg.caption_fusion:
        return None
    from vlcp import caption_fusion

    return caption_fusion.prepare(cfg, p, cache, device)


def _fused_row(cfg: EvalConfig, fusion, cache, train: tuple, train_ds: Dataset, test: tuple) -> dict:
    """The caption-fusion row: training images (samples, x, y) with their prompts or captions, the test images
    with their captions; separate from the headline."""
    from vlcp import caption_fusion as cf

    samples, x, y = train
    test_ds, (xt, yt) = test
    names = [c.name for c in train_ds.classes]
    tr = cf.Split(samples, x, y, [names[s.class_idx] for s in samples],
                  None if cfg.full else cf.folder_prompts(Path(cfg.synth_dir)))
    te = cf.Split(test_ds.samples, xt, yt, [test_ds.classes[s.class_idx].name for s in test_ds.samples])
    return cf.evaluate_fused(fusion, cache, tr, te, len(train_ds.classes), cfg.seeds, cfg.progress)


def written_by_vlcp(folder: Path) -> bool:
    """True when ``folder/manifest.json`` is a manifest vlcp wrote (distill or baseline)."""
    import json

    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "vlcp_version" in manifest


def evaluation_path(folder: Path, res: dict) -> Path:
    """``FOLDER/evaluations/<protocol>-<model>-<hash of the settings>.json``: one file per distinct setting."""
    from vlcp.cache import stable_hash

    p = res["protocol"]
    settings = {"protocol": {k: v for k, v in p.items() if k != "sources"}, "seeds": len(res["seeds"]),
                "images_per_class": res["images_per_class"], "teacher": (res["teacher"] or {}).get("source")}
    if res.get("caption_fusion"):  # its own file: an evaluation without the flag does not overwrite the row
        settings["caption_fusion"] = {k: res["caption_fusion"][k] for k in ("caption_prompt", "captioner", "clip")}
    return Path(folder) / "evaluations" / f"{p['name']}-{p['model']}-{stable_hash(settings, 10)}.json"


def save_in_folder(folder: Path, res: dict) -> Path | None:
    """Write the results next to a vlcp-made synthetic set (for ``vlcp report``); None for other folders."""
    from vlcp.output import write_json

    if not written_by_vlcp(folder):
        return None
    path = evaluation_path(folder, res)
    try:
        path.parent.mkdir(exist_ok=True)
        write_json(path, res)
    except OSError as exc:  # a read-only folder must not cost the evaluation that just ran
        import logging

        logging.getLogger("vlcp").warning("could not save the results in %s: %s", path.parent, exc)
        return None
    return path
