"""The evaluation networks of the dataset-distillation literature, at any input size.

- ``convnet3`` / ``convnet6``: DC/IDC's ConvNet (width 128, instance norm as GroupNorm(C, C), ReLU,
  2x2 average pooling per layer, one linear layer); grayscale inputs get padding 3 on the first conv,
  as DC does for 28 px MNIST-like data.
- ``resnetap10``: IDC's ResNet-AP (strided convs replaced by 2x2 average pooling, instance norm), its
  convolutions re-initialised He-normal over fan-out as Minimax's ``train_models/resnet_ap.py`` does.
- ``resnet18``: torchvision's ResNet-18 with instance norm (Minimax/IDC's ImageNet-subset evaluation).
- ``resnet18-modified``: ResNet-18 for 32 px (3x3 stride-1 stem, no max-pool, batch norm), as RDED's
  ``resnet18_modified`` (RDED ``synthesize/utils.py:load_model``).
- ``resnet18-bn``: torchvision's ResNet-18 unchanged (batch norm, 7x7 stem, max-pool): RDED's ImageNet-1K
  student and teacher (``thmodels.resnet18``), so torchvision's ImageNet weights load into it as they are.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ["convnet3", "convnet6", "resnetap10", "resnet18", "resnet18-modified", "resnet18-bn"]


def instance_norm(c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True)


class ConvNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, depth: int, im_size: int, width: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for d in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=3 if channels == 1 and d == 0 else 1), instance_norm(width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            c = width
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            n = self.features(torch.zeros(1, channels, im_size, im_size)).numel()
        self.classifier = nn.Linear(n, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


class _BlockAP(nn.Module):
    """Basic residual block whose downsampling is 2x2 average pooling, not a strided conv."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.n1 = instance_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.n2 = instance_norm(cout)
        self.stride = stride
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(stride, stride),
                                       instance_norm(cout))

    def forward(self, x):
        out = F.relu(self.n1(self.conv1(x)))
        if self.stride != 1:
            out = F.avg_pool2d(out, self.stride, self.stride)
        out = self.n2(self.conv2(out))
        return F.relu(out + (self.short(x) if self.short is not None else x))


class ResNetAP10(nn.Module):
    def __init__(self, channels: int, num_classes: int, im_size: int, width: int = 64):
        super().__init__()
        # IDC's intro block: 7x7 conv + 4x4 pool above 128 px, 3x3 conv + 2x2 pool above 64 px, 3x3 conv below
        k, pool = (7, 4) if im_size > 128 else (3, 2) if im_size > 64 else (3, 1)
        self.stem = nn.Sequential(nn.Conv2d(channels, width, k, padding=k // 2, bias=False), instance_norm(width),
                                  nn.ReLU(inplace=True), nn.AvgPool2d(pool, pool) if pool > 1 else nn.Identity())
        chans = [width, width * 2, width * 4, width * 8]
        blocks, c = [], width
        for i, cout in enumerate(chans):
            blocks.append(_BlockAP(c, cout, 1 if i == 0 else 2))
            c = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():  # Minimax resnet_ap.py: normal(0, sqrt(2 / (k*k*out))); norms 1 / 0, fc untouched
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)

    def forward(self, x):
        return self.fc(self.embed(x))


def _resnet18(channels: int, num_classes: int, modified: bool, batch_norm: bool = False) -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes, norm_layer=None if modified or batch_norm else instance_norm)
    if modified or channels != 3:
        stride, k = (1, 3) if modified else (2, 7)
        net.conv1 = nn.Conv2d(channels, 64, k, stride, k // 2, bias=False)
    if modified:
        net.maxpool = nn.Identity()
    return net


def build(name: str, channels: int, num_classes: int, im_size: int) -> nn.Module:
    if name == "convnet3":
        return ConvNet(channels, num_classes, 3, im_size)
    if name == "convnet6":
        return ConvNet(channels, num_classes, 6, im_size)
    if name == "resnetap10":
        return ResNetAP10(channels, num_classes, im_size)
    if name in ("resnet18", "resnet18-modified", "resnet18-bn"):
        return _resnet18(channels, num_classes, modified=name == "resnet18-modified", batch_norm=name == "resnet18-bn")
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def embed(net: nn.Module, x):
    """Penultimate features of any of the networks above (herding and k-center use them)."""
    if hasattr(net, "embed"):
        return net.embed(x)
    fc = net.fc
    net.fc = nn.Identity()
    try:
        return net(x)
    finally:
        net.fc = fc


def feature_dim(net: nn.Module) -> int:
    """Size of the penultimate features ``embed`` returns: the input size of the final linear layer."""
    head = net.classifier if hasattr(net, "classifier") else net.fc
    return head.in_features


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
