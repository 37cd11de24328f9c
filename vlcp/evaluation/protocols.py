"""``vlcp evaluate``: train a network on a distilled set, test it on the real test split.

Three protocols; every value is recorded in the results JSON with where it comes from
(``protocol.sources``: the paper, a file of the public reference code, or vlcp's choice). Without
``--protocol`` each dataset gets the one the paper evaluates it with (``default_protocol``).

- ``minimax`` (ImageNet subsets; VLCP Tables 1, 2, 5): the Minimax script the VLCP repository ships
  (``04_evaluation/Minimax``): ResNetAP-10 with instance norm at 224 px, convolutions He-normal (fan-out);
  SGD 0.01, momentum 0.9, wd 5e-4, batch 64 (more than 100 classes: lr 0.1, wd 1e-4, batch 128); epochs by
  IPC (1: 3000, <=10: 2000, <=50: 1500, <=200: 1000, <=500: 500, more: 300; x2/3 for 100 classes); lr x0.2
  after epochs 2E/3 and 5E/6; bilinear Resize(224)+CenterCrop(224), then RandomResizedCrop(0.5-1), flip,
  colour jitter 0.4 (random order), lighting 0.1, CutMix (Beta(1, 1), every batch, loss mixed by box
  area); test Resize(224)+CenterCrop(224), every E/100 epochs.
- ``dc`` (digits, Fashion-MNIST, any other folder): ConvNet-3 at the data's own size; SGD 0.01, momentum
  0.9, wd 5e-4, batch 256; 1000 epochs with DSA or 300 without (``--aug none``); lr x0.1 at half; one test.
- ``rded`` (ImageNet-1K and CIFAR; VLCP Tables 3-4): RDED's evaluation (``04_evaluation/RDED``): a student
  trained only on a teacher's soft labels of CutMix-ed images (KL at temperature 20), AdamW 1e-3 (wd 0.01
  on weights), half-cosine lr per epoch, ShufflePatches + RandomResizedCrop(1/factor-1) + flip, batch by
  IPC and class count, 500 epochs, ImageNet normalisation, bilinear resizing; the student also runs once
  without gradients on the mixed batch (RDED's cutmix mixes in place); it reports the best test accuracy
  among the tests every 10 epochs in the last 20 % of training.

The headline figure is always the accuracy after the last epoch. The protocol's own "best" figure
(model selection on the test set, which both reference scripts report) is in its own column.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

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
    no_grad_forward: bool = False  # RDED runs the student once more, without gradients, on the mixed batch
    resample: str = "bicubic"  # PIL filter of the loading resize (both reference scripts: torchvision's bilinear)
    teacher: str = ""
    teacher_epochs: int = 0
    sources: dict = field(default_factory=dict)



RDED_DATA = {"imagenet", "cifar10", "cifar100"}
DEFAULT_SOURCE = {
    "minimax": "VLCP paper Tables 1, 2, 5 (ImageNet subsets, Minimax's code); VLCP repo run_nette.sh",
    "rded": "VLCP paper Tables 3-4 (ImageNet-1K at 224 px 'for consistency with RDED', CIFAR); VLCP repo "
            "04_evaluation/RDED/*.sh",
    "dc": f"{VLCP}: the DC/DSA evaluation for data the paper does not evaluate",
}


def default_protocol(data: str) -> str:
    """The protocol the paper evaluates ``data`` with (``DEFAULT_SOURCE`` says where); ``dc`` for the rest."""
    if data in RDED_DATA:
        return "rded"
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
    many = imagenet and n > 100  # argument.py: "if args.nclass > 100: ... We need to tune lr and weight decay"
    a = (f"{MINIMAX}argument.py, more than 100 classes: lr 0.1, wd 1e-4, batch max(128, 64))" if many
         else f"{MINIMAX}argument.py defaults)")
    return Protocol(
        name="minimax", model="resnetap10", epochs=e, batch_size=128 if many else 64, optimizer="sgd",
        lr=0.1 if many else 0.01, momentum=0.9, weight_decay=1e-4 if many else 5e-4,
        schedule="multistep-epoch(2/3,5/6;gamma=0.2)", aug="minimax", mix="reference", cutmix=1.0,
        image_size=size, load_size=size, load_crop=imagenet, test_resize=size if imagenet else 0,
        test_every=max(1, e // 100), resample="bilinear",
        sources={"model": "VLCP run_nette.sh (-n resnet_ap --norm_type instance, depth 10; "
                          "train_models/resnet_ap.py: convs He-normal, fan-out)",
                 "epochs": f"{MINIMAX}argument.py ipc_epoch)", "batch_size": a, "lr": a, "momentum": a,
                 "weight_decay": a, "schedule": f"{MINIMAX}train.py MultiStepLR, stepped per epoch)",
                 "aug": f"{MINIMAX}data.py transform_imagenet; misc/utils.py ColorJitter, Lighting)",
                 "mix": f"{MINIMAX}train.py train_epoch, misc/utils.py rand_bbox; --beta 1, --mix_p 1)",
                 "image_size": f"{MINIMAX}argument.py --size 224)" if imagenet else f"{VLCP}: natural size",
                 "load_size": f"{MINIMAX}data.py: Resize(224)+CenterCrop(224) before augmenting)",
                 "test_resize": f"{MINIMAX}data.py: test Resize(224)+CenterCrop(224))",
                 "test_every": f"{MINIMAX}argument.py epoch_print_freq = epochs // 100; train.py best_acc1)",
                 "resample": f"{MINIMAX}data.py transforms.Resize, RandomResizedCrop: torchvision's bilinear)",
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
        test_resize=size // 7 * 8, test_every=10, best_after=0.8, kd_temperature=20.0, no_grad_forward=True,
        resample="bilinear",
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
                 "no_grad_forward": f"{RDED}validation/main.py train(): student(images) under no_grad, after "
                                    "validation/utils.py cutmix mixed images in place)",
                 "resample": f"{RDED}validation/main.py transforms.Resize, RandomResizedCrop: torchvision's bilinear)",
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
