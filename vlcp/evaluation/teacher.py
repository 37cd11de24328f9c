"""RDED's teacher for soft labels: the user's weights, torchvision's ImageNet ResNet-18, or one vlcp trains
once and caches."""
from __future__ import annotations

from dataclasses import asdict, replace

from vlcp.data.datasets import Dataset
from vlcp.evaluation.protocols import EvalError, Protocol
from vlcp.evaluation.training import accuracy, train

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
    from vlcp.evaluation import networks
    from vlcp.store.cache import stage_key
    from vlcp.store.tensors import numpy_to_state, state_to_numpy

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
        tp = replace(p, kd_temperature=0.0, mix="torchvision", cutmix=0.0, mixup=0.0, no_grad_forward=False,
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
