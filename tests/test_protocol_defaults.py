"""`vlcp evaluate` follows the paper's protocol per dataset and the reference code's evaluation details (issue 22,
section 2). Expected values are written out by hand from the VLCP repository's 04_evaluation/Minimax and
04_evaluation/RDED, or computed by torchvision's own transforms (what those scripts call)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from vlcp.evaluation import augment, networks, samples, training
from vlcp.evaluation.protocols import DEFAULT_SOURCE, default_protocol, make_protocol


def test_each_dataset_gets_the_protocol_the_paper_evaluates_it_with():
    datasets = ("imagenette", "imagewoof", "imageidc", "imagenet", "cifar10", "cifar100", "digits", "fashion-mnist",
                "/data/my-folder")
    assert [default_protocol(d) for d in datasets] == [
        "minimax", "minimax", "minimax", "rded", "rded", "rded", "dc", "dc", "dc"]
    assert DEFAULT_SOURCE["rded"].startswith("VLCP paper Tables 3-4") and "04_evaluation/RDED" in DEFAULT_SOURCE["rded"]
    assert DEFAULT_SOURCE["minimax"].startswith("VLCP paper Tables 1, 2, 5")
    assert DEFAULT_SOURCE["dc"].startswith("vlcp's choice")


def test_minimax_above_100_classes_takes_the_scripts_own_lr_wd_and_batch():
    """argument.py: `if args.dataset == 'imagenet': if args.nclass > 100: lr = 0.1; weight_decay = 1e-4;
    batch_size = max(128, batch_size)`; ipc_epoch's x2/3 is for exactly 100 classes, so 1000 keep 2000 at IPC 10."""
    big = make_protocol("minimax", "imagenet", 10, num_classes=1000)
    assert (big.lr, big.weight_decay, big.batch_size, big.momentum, big.epochs) == (0.1, 1e-4, 128, 0.9, 2000)
    for key in ("lr", "weight_decay", "batch_size"):
        assert big.sources[key] == ("Minimax script (VLCP repo 04_evaluation/Minimax/argument.py, more than 100 "
                                    "classes: lr 0.1, wd 1e-4, batch max(128, 64))")
    assert (make_protocol("minimax", "my-folder", 10, num_classes=101).lr,
            make_protocol("minimax", "my-folder", 10, num_classes=101).batch_size) == (0.1, 128)
    hundred = make_protocol("minimax", "imagenette", 10, num_classes=100)  # "> 100": 100 classes keep the defaults
    assert (hundred.lr, hundred.weight_decay, hundred.batch_size, hundred.epochs) == (0.01, 5e-4, 64, 1300)
    assert hundred.sources["lr"].endswith("argument.py defaults)")
    cifar = make_protocol("minimax", "cifar10", 10, num_classes=1000)  # the rule is inside `dataset == 'imagenet'`
    assert (cifar.lr, cifar.weight_decay, cifar.batch_size) == (0.01, 5e-4, 64)
    user = make_protocol("minimax", "imagenet", 10, num_classes=1000, batch_size=32, lr=0.05)
    assert (user.batch_size, user.lr, user.weight_decay) == (32, 0.05, 1e-4)
    assert user.sources["batch_size"] == "user (--batch-size)" and user.sources["lr"] == "user (--lr)"


def test_resnetap10_convolutions_are_he_normal_over_fan_out():
    """resnet_ap.py: every Conv2d `weight.normal_(0, sqrt(2 / (k*k*out_channels)))`, norms weight 1 / bias 0, the
    linear layer left at PyTorch's default. PyTorch's own conv default (kaiming_uniform, a=sqrt(5)) has std
    1/sqrt(3 * fan_in) and no weight beyond sqrt(3) std: e.g. the stem's 0.048 against He's 0.025."""
    torch.manual_seed(0)
    net = networks.build("resnetap10", 3, 10, 224)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 4 * 2 + 3  # stem, two per block, three 1x1 shortcuts
    for conv in convs:
        w = conv.weight.detach().flatten()
        std = math.sqrt(2 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
        assert abs(w.mean().item()) < 0.05 * std
        assert w.std().item() == pytest.approx(std, rel=0.04)
        assert 0.035 < (w.abs() > 2 * std).float().mean().item() < 0.056  # normal: 4.55% beyond 2 std
    for norm in (m for m in net.modules() if isinstance(m, nn.GroupNorm)):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    assert net.fc.weight.abs().max().item() <= 1 / math.sqrt(512)  # nn.Linear's uniform(+-1/sqrt(in)) default


class Recorder(nn.Module):
    """A network that records each batch it sees and whether gradients were on."""

    def __init__(self):
        super().__init__()
        self.seen, self.grad = [], []
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.seen.append(x.detach().clone())
        self.grad.append(torch.is_grad_enabled())
        return x.flatten(1)[:, :10] * self.w


def test_rded_student_runs_without_gradients_on_the_mixed_batch_first():
    """validation/main.py train(): `mix_images, _, _, _ = mix_aug(images, args)` (cutmix writes into `images` and
    returns it) then `pred_label = student_model(images)` under no_grad: the student sees the mixed batch twice."""
    p = make_protocol("rded", "cifar10", 10)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 10, 10).clone()  # image i is filled with i
    y = torch.arange(4)
    seed = next(s for s in range(100) if (lambda m: not torch.equal(m[0], x))(augment.cutmix(
        x, 1.0, torch.Generator().manual_seed(s))))  # a seed whose box moves pixels
    mixed = augment.cutmix(x, 1.0, torch.Generator().manual_seed(seed))[0]
    net, teacher_saw = Recorder(), []
    training._loss(net, x.clone(), y, p, torch.Generator().manual_seed(seed), None,
                   lambda xb: teacher_saw.append(xb.clone()) or torch.zeros(len(xb), 10))
    assert net.grad == [False, True]
    assert torch.equal(net.seen[0], mixed) and torch.equal(net.seen[1], mixed) and torch.equal(teacher_saw[0], mixed)
    minimax = Recorder()  # the Minimax script has no such forward
    training._loss(minimax, x.clone(), y, make_protocol("minimax", "imagenette", 10), torch.Generator(), None, None)
    assert minimax.grad == [True]


def test_rded_batch_norm_statistics_see_the_mixed_batch_twice():
    """CutMix with one box and a permutation keeps each pixel position's values across the batch, so only
    statistics after a convolution tell mixed from unmixed: flat images (image i filled with i) have no horizontal
    edges, mixed ones do at the box's sides. From running_var 1 with momentum 0.5, two updates with the mixed
    batch's variance v give 0.25 + 0.75 v (the unmixed batch's variance is 0)."""
    p = make_protocol("rded", "cifar10", 10)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 10, 10).clone()
    conv = nn.Conv2d(1, 1, (1, 2), bias=False)
    conv.weight.data = torch.tensor([[[[1.0, -1.0]]]])  # horizontal difference
    bn = nn.BatchNorm2d(1, momentum=0.5)
    net = nn.Sequential(conv, bn, nn.Flatten(), nn.LazyLinear(10))
    for seed in range(100):
        mixed = augment.cutmix(x, 1.0, torch.Generator().manual_seed(seed))[0]
        v = conv(mixed).detach().var().item()  # unbiased, as BatchNorm's running_var
        if v > 0.1:
            break
    assert conv(x).detach().var().item() == 0.0
    training._loss(net, x.clone(), torch.arange(4), p, torch.Generator().manual_seed(seed), None,
                   lambda xb: torch.zeros(len(xb), 10))
    assert int(bn.num_batches_tracked) == 2
    assert bn.running_var.item() == pytest.approx(0.25 + 0.75 * v, rel=1e-6)


def _image(w: int, h: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


class _Sample:
    def __init__(self, img, class_idx):
        self.img, self.class_idx = img, class_idx

    def load(self):
        return self.img


@pytest.mark.parametrize("w, h", [(37, 53), (53, 37), (299, 227), (333, 500), (427, 320)])
def test_reference_resize_is_torchvisions_resize_and_center_crop_pixel_for_pixel(w, h):
    """Minimax data.py: Resize(224) + CenterCrop(224) (train and test); RDED main.py: Resize(size // 7 * 8) +
    CenterCrop(size). torchvision's Resize on a PIL image: bilinear, long side int(size * long / short)."""
    from torchvision import transforms as T

    from vlcp.data.imageops import resize_crop

    img = _image(w, h, w * h)
    for size, crop in ((224, 224), (256, 224), (36, 32)):
        expected = np.asarray(T.Compose([T.Resize(size), T.CenterCrop(crop)])(img))
        assert np.array_equal(np.asarray(resize_crop(img, size, crop, "bilinear")), expected)
    imgs = [_Sample(img, 0), _Sample(_image(h, w, 1), 1)]
    rded = make_protocol("rded", "imagenet", 10, num_classes=1000)
    xt, _ = samples.test_tensors(imgs, rded)
    tv = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    assert np.array_equal(xt, np.stack([tv(s.img).numpy() for s in imgs]))
    minimax = make_protocol("minimax", "imagenette", 10)
    xm, _ = samples.train_tensors(imgs, minimax)
    tv = T.Compose([T.Resize(224), T.CenterCrop(224), T.PILToTensor()])
    assert np.array_equal(xm, np.stack([tv(s.img).numpy() for s in imgs]))
    assert np.array_equal(samples.test_tensors(imgs, minimax)[0], xm)


def test_other_reads_keep_vlcps_bicubic_and_every_resample_has_a_source():
    from PIL import Image

    img = _image(40, 30, 0)
    squash = samples.tensors_from_samples([_Sample(img, 0)], 16, 3)[0][0]  # the detector's and DM/DC's reads
    assert np.array_equal(squash, np.asarray(img.resize((16, 16), Image.BICUBIC)).transpose(2, 0, 1))
    rded = make_protocol("rded", "imagenet", 10, num_classes=1000)
    squashed = samples.train_tensors([_Sample(img, 0)], rded)[0][0]  # RDED's training images: squashed, bilinear
    assert np.array_equal(squashed, np.asarray(img.resize((224, 224), Image.BILINEAR)).transpose(2, 0, 1))
    assert rded.sources["resample"] == ("RDED script (VLCP repo 04_evaluation/RDED/validation/main.py "
                                        "transforms.Resize, RandomResizedCrop: torchvision's bilinear)")
    assert make_protocol("minimax", "imagenette", 10).sources["resample"].startswith(
        "Minimax script (VLCP repo 04_evaluation/Minimax/data.py")
    dc = make_protocol("dc", "fashion-mnist", 10)
    assert (dc.resample, dc.sources["resample"]) == ("bicubic", "vlcp's choice")
    from vlcp.data.imageops import resize_crop

    with pytest.raises(ValueError, match=r"^unknown resample 'nearest'; known: bicubic, bilinear$"):
        resize_crop(img, 8, resample="nearest")
