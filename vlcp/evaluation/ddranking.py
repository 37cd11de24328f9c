"""DD-Ranking (``ddranking`` 0.2.0, NUS-HPC-AI-Lab/DD-Ranking): a synthetic set exported so that it reads the
right labels, vlcp's teacher in its model format, and its scores as pure functions on accuracies.

How DD-Ranking numbers classes (``ddranking/utils/data.py``, ``get_dataset``): CIFAR-10/100 are torchvision's
``CIFAR10``/``CIFAR100`` (labels 0..n-1 as in the files, which vlcp's binary-version loader reads too);
ImageNet1K and the ImageNet subsets read a full ImageNet root with ``ImageFolder`` (sorted wnids -> 0..999),
and a subset's class ``c`` is ImageNet index ``ImageNetSubsets.<subset>[c]`` (lines 151-157: ``class_map``):
ImageWoof in Minimax's order, not sorted. A synthetic set given as ``image_path`` is read with a plain
``ImageFolder(root=image_path)`` (``metrics/hard_label.py`` line 232, ``soft_label.py`` lines 273, 338):
label = position of the class folder in sorted order, used as is (``class_map`` is applied to the test
labels only). So ``export`` names folders ``<DD-Ranking index, 5 digits>_<class id>``: sorted order is
DD-Ranking's index order for every dataset, whatever the ids sort like.

Scores: vlcp has the formulas here and ``tests/test_ddranking.py`` runs ddranking's own lines (taken from
the released wheel with ``ast``) on the same accuracies and checks the numbers agree. A separate
environment with the package was not chosen: ddranking 0.2.0 pins numpy<2 and scipy<1.16 (vlcp's
environment has newer ones) and imports kornia and timm, and its training (lr search over five rates, its
own data loaders) would not be vlcp's evaluation anyway; the accuracies come from vlcp's protocols
(``ddranking_scores.py``), the arithmetic is DD-Ranking's.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from vlcp.data.images import is_class_dir
from vlcp.evaluation.protocols import EvalError

DDRANKING = "ddranking 0.2.0"
# vlcp dataset -> DD-Ranking's name (ddranking/utils/data.py get_dataset, lines 58-159); the others it knows,
# TinyImageNet, ImageMeow, ImageSquawk, ImageFruit, ImageYellow, are not vlcp datasets.
DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "imagenette": "ImageNette", "imagewoof": "ImageWoof",
            "imagenet": "ImageNet1K"}
NUM_CLASSES = {"CIFAR10": 10, "CIFAR100": 100, "ImageNette": 10, "ImageWoof": 10, "ImageNet1K": 1000}
# ddranking/utils/data.py lines 15 and 17 (class ImageNetSubsets): ImageNet-1K indices, in DD-Ranking's class order
SUBSETS = {"ImageNette": (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
           "ImageWoof": (193, 182, 258, 162, 155, 167, 159, 273, 207, 229)}
# those indices' wnids: positions in the sorted ImageNet-1K wnid list (torchvision's ImageNet category names at
# these indices are the classes' names: tests/test_ddranking.py checks it)
WNID_AT = {0: "n01440764", 217: "n02102040", 482: "n02979186", 491: "n03000684", 497: "n03028079",
           566: "n03394916", 569: "n03417042", 571: "n03425413", 574: "n03445777", 701: "n03888605",
           155: "n02086240", 159: "n02087394", 162: "n02088364", 167: "n02089973", 182: "n02093754",
           193: "n02096294", 207: "n02099601", 229: "n02105641", 258: "n02111889", 273: "n02115641"}
TEACHER_DIRS = {"teacher": True, "teacher-ddranking-resnet": False}  # folder -> its tea_use_torchvision


def ddranking_name(dataset: str) -> str:
    """DD-Ranking's name of a vlcp dataset; EvalError for one it does not know."""
    if dataset not in DATASETS:
        raise EvalError(f"DD-Ranking ({DDRANKING}) has no dataset for vlcp's {dataset!r}; it knows "
                        + ", ".join(f"{v} ({k})" for k, v in DATASETS.items()))
    return DATASETS[dataset]


def class_order(dataset: str, vlcp_classes: list[str] | None = None) -> list[str]:
    """Class ids (wnids, CIFAR labels) in DD-Ranking's index order. ImageNette/ImageWoof: its fixed lists;
    CIFAR and ImageNet-1K: the label order vlcp uses too (``vlcp_classes``, the dataset's class order)."""
    name = ddranking_name(dataset)
    if name in SUBSETS:
        return [WNID_AT[i] for i in SUBSETS[name]]
    if not vlcp_classes or len(vlcp_classes) != NUM_CLASSES[name]:
        raise EvalError(f"DD-Ranking's {name} has {NUM_CLASSES[name]} classes; the set names "
                        f"{len(vlcp_classes or [])}")
    return list(vlcp_classes)


def folder_name(index: int, class_id: str) -> str:
    """``00003_n02088364``: sorts at DD-Ranking's index, still says which class it is."""
    return f"{index:05d}_{class_id}"


# -- scores -----------------------------------------------------------------------------------------------
def _normalise(x: float) -> float:
    """DD-Ranking's (e^x - e^-1) / (e - e^-1): 0 at x = -1, 1 at x = 1."""
    return (math.exp(x) - math.exp(-1)) / (math.exp(1) - math.exp(-1))


def lrs(full_hard: float, syn_hard: float, syn_any: float, rdm_any: float, weight: float = 0.5) -> dict:
    """Label-Robust Score (ddranking metrics/hard_label.py lines 380-383, soft_label.py lines 561-564):
    HLR = full_hard - syn_hard, IOR = syn_any - rdm_any, alpha = w IOR - (1 - w) HLR,
    LRS = (e^alpha - e^-1) / (e - e^-1). Hard mode: syn_any/rdm_any are hard-label accuracies (syn_any is
    syn_hard); soft mode: the soft-label (teacher) accuracies. Accuracies as fractions, as the paper's
    normalisation to [0, 1] needs (ddranking 0.2.0 itself feeds percentages: see the docs)."""
    hlr, ior = full_hard - syn_hard, syn_any - rdm_any
    alpha = weight * ior - (1 - weight) * hlr
    return {"hlr": hlr, "ior": ior, "alpha": alpha, "lrs": _normalise(alpha)}


def ars(syn_aug: float, rdm_aug: float, syn_naug: float, rdm_naug: float, weight: float = 0.5) -> dict:
    """Augmentation-Robust Score (ddranking metrics/aug_robust.py lines 577-580): with = syn_aug - rdm_aug,
    without = syn_naug - rdm_naug, beta = w with + (1 - w) without, ARS = (e^beta - e^-1) / (e - e^-1)."""
    with_aug, without_aug = syn_aug - rdm_aug, syn_naug - rdm_naug
    beta = weight * with_aug + (1 - weight) * without_aug
    return {"with_aug": with_aug, "without_aug": without_aug, "beta": beta, "ars": _normalise(beta)}


# -- export -----------------------------------------------------------------------------------------------
def _set_dataset(manifest: dict) -> dict:
    d = manifest.get("dataset")
    return d if isinstance(d, dict) else {}


def _vlcp_classes(manifest: dict, dataset: str, folders: list[str]) -> list[str]:
    """vlcp's class order for ``dataset`` (a teacher's output rows): the set's manifest, else the loader's
    (sorted ids: vlcp's ImageNet-subset tables, else the folder names, which are ids for CIFAR and ImageNet)."""
    from vlcp.data.datasets import KNOWN

    ident = _set_dataset(manifest)
    if ident.get("name") == dataset and isinstance(ident.get("classes"), list):
        return list(ident["classes"])
    spec = KNOWN.get(dataset)
    return sorted(c for c, _ in spec.classes) if spec and spec.classes else sorted(folders)


def _match_folders(folders: list[str], dataset: str, order: list[str]) -> dict[str, str]:
    """Class folder -> class id, by id or human name (ImageNette/ImageWoof names from vlcp's tables)."""
    from vlcp.data.classnames import class_index, lookup
    from vlcp.data.datasets import KNOWN, ClassInfo

    names = dict(KNOWN[dataset].classes) if dataset in KNOWN else {}
    classes = [ClassInfo(c, names.get(c, c)) for c in order]
    index = class_index(classes)
    found = {f: lookup(index, f) for f in folders}
    bad = sorted(f for f, i in found.items() if i is None)
    if bad:
        raise EvalError(f"class folder(s) {', '.join(bad)} are no class of {ddranking_name(dataset)}")
    ids = [order[i] for i in found.values()]
    twice = sorted({c for c in ids if ids.count(c) > 1})
    if twice:
        raise EvalError(f"several class folders are class {', '.join(twice)}")
    missing = [c for c in order if c not in ids]
    if missing:
        raise EvalError(f"DD-Ranking's {ddranking_name(dataset)} has {len(order)} classes; the set lacks "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return {f: order[i] for f, i in found.items()}


def export(out: Path, dest: Path, *, dataset: str | None = None, teacher: Path | None = None, force: bool = False,
           cache_dir: Path | None = None, soft_labels: str | None = None) -> dict:
    """Write ``dest/train/<index>_<id>/`` (hard links, or copies across file systems), ``dest/classes.json``,
    ``dest/README.md`` and, when vlcp has a teacher (``teacher``, else the one ``--protocol rded`` trained for
    this dataset: an evaluation of ``out`` or a named file under ``cache_dir``), ``dest/teacher/<Dataset>/
    <Model>/ckpt_best.pt`` with its classifier rows in DD-Ranking's class order, and ``dest/soft_labels.pt`` when
    ``out`` has soft labels (``soft_labels``: their name; its only ones when None). Atomic; ``force`` replaces."""
    from vlcp.data.images import IMG_EXTENSIONS
    from vlcp.evaluation.samples import NOT_CLASSES
    from vlcp.store.output import check_export, images_dir, publish, read_manifest

    out, dest = Path(out), Path(dest)
    if not out.is_dir():
        raise EvalError(f"{out} is not a directory")
    check_export(out, dest, force)

    manifest = read_manifest(out)
    dataset = dataset or _set_dataset(manifest).get("name")
    if not dataset:
        raise EvalError(f"{out} has no vlcp manifest naming its dataset: pass --dataset NAME")
    name = ddranking_name(dataset)
    src = images_dir(out)
    folders = sorted(x.name for x in src.iterdir() if is_class_dir(x) and x.name not in NOT_CLASSES)
    vlcp_classes = _vlcp_classes(manifest, dataset, folders)
    order = class_order(dataset, vlcp_classes)
    ids = _match_folders(folders, dataset, order)
    files = {f: sorted((p for p in (src / f).iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS),
                       key=lambda p: p.name) for f in folders}  # ImageFolder's order: sorted file names
    empty = [f for f, v in files.items() if not v]
    if empty:
        raise EvalError(f"class folder(s) {', '.join(empty)} in {src} hold no images")
    weights = vlcp_teacher(out, dataset, manifest, teacher, cache_dir, vlcp_classes)
    by_id = {c: f for f, c in ids.items()}
    record = {"format": "vlcp-ddranking/1", "ddranking": DDRANKING, "dataset": name, "vlcp_dataset": dataset,
              "source": str(out), "image_path": "train", "classes": [
                  {"index": i, "folder": folder_name(i, c), "id": c, "from": by_id[c], "images": len(files[by_id[c]])}
                  for i, c in enumerate(order)]}
    record["ipc"] = min(c["images"] for c in record["classes"])
    from vlcp.evaluation.ddranking_soft import mode_s_labels

    soft = mode_s_labels(out, dataset, vlcp_classes, soft_labels, [p for c in order for p in files[by_id[c]]], order)
    record["soft_labels"] = soft and soft[1]
    if soft is None:
        from vlcp.evaluation.relabel import soft_label_names

        names = soft_label_names(out)
        record["soft_label_choices"] = names if len(names) > 1 else []
    states = None
    if weights is not None:
        states, record["teacher"] = teacher_files(weights, order, name)
    else:
        record["teacher"] = None

    def build(tmp: Path) -> None:
        for c in record["classes"]:
            d = tmp / "train" / c["folder"]
            d.mkdir(parents=True)
            for p in files[c["from"]]:
                _link_or_copy(p, d / p.name)
        saved = {**(states or {}), **({soft[1]["file"]: soft[0]} if soft else {})}  # soft[0]: a torch tensor
        if saved:
            import torch

            for rel, obj in saved.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                torch.save(obj, tmp / rel)
        (tmp / "classes.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(record))

    publish(dest, build)
    return {**record, "dest": str(dest)}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


# -- the teacher ------------------------------------------------------------------------------------------
def vlcp_teacher(out: Path, dataset: str, manifest: dict, path: Path | None, cache_dir: Path | None,
                 vlcp_classes: list[str]) -> dict | None:
    """{"state", "classes" (its output rows), "source", "image_size"} of the teacher to export, or None.
    Without ``path``: the named file of a ``--protocol rded`` evaluation of ``out`` (newest first), else the
    most accurate named teacher file under the cache (``cache_dir``, $VLCP_CACHE_DIR or ./cache) trained on
    the set's dataset (same name, classes and image digest as ``out/manifest.json`` records)."""
    from vlcp.evaluation.teacher import TEACHERS_DIR, read_teacher_meta

    if path is None:
        for res in _rded_evaluations(out, dataset):
            f = res["teacher"].get("file") or res["teacher"].get("source")
            if f and Path(f).is_file():
                path = Path(f)
                break
    if path is None:
        ident = _set_dataset(manifest)
        root = Path(cache_dir or os.environ.get("VLCP_CACHE_DIR") or "cache") / TEACHERS_DIR
        found = []
        for side in sorted(root.glob("*.json")) if ident.get("digest") else []:
            try:
                meta = read_teacher_meta(side)
            except EvalError:
                continue
            mine = meta.get("dataset", {}) if meta else {}
            if meta and side.with_suffix(".safetensors").is_file() and all(
                    mine.get(k) == ident.get(k) for k in ("name", "classes", "digest")):
                found.append((-(meta.get("accuracy") or 0.0), side.name, side.with_suffix(".safetensors")))
        path = min(found)[2] if found else None
    if path is None:
        return None
    meta = read_teacher_meta(path) if Path(path).suffix == ".safetensors" else None
    classes = (meta or {}).get("classes") or vlcp_classes  # a user's own weights: vlcp's class order
    return {"state": load_state(Path(path)), "classes": list(classes), "source": str(path),
            "image_size": (meta or {}).get("protocol", {}).get("image_size")}


def _rded_evaluations(out: Path, dataset: str) -> list[dict]:
    found = []
    for p in (out / "evaluations").glob("*.json"):
        try:
            res = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(res, dict) and isinstance(res.get("teacher"), dict) and \
                (res.get("protocol") or {}).get("name") == "rded" and (res.get("dataset") or {}).get("name") == dataset:
            found.append((p.stat().st_mtime, p.name, res))
    return [r for _, _, r in sorted(found, reverse=True, key=lambda t: t[:2])]


def load_state(path: Path) -> dict:
    """A state dict from safetensors, or from a ``.pt``/``.pth`` read with ``weights_only=True`` (never a pickle)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle weights_only refuses, not weights at all
        raise EvalError(f"cannot read teacher weights {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EvalError(f"{path} is not a state dict (name -> tensor)")
    return state


def architecture(state: dict) -> tuple[str, str]:
    """(DD-Ranking model name, classifier key prefix) of a vlcp teacher's state dict; EvalError for networks
    DD-Ranking cannot build. vlcp's ``convnet3``/``convnet6`` are DD-Ranking's ``ConvNet-3``/``-6`` key for key
    (``features.<4d>`` conv, ``features.<4d+1>`` GroupNorm(C, C), ``classifier``); ``resnet18-modified`` (32 px) and
    ``resnet18-bn`` (224 px) are torchvision's ResNet-18, which DD-Ranking builds for ``ResNet-18-BN`` with
    ``tea_use_torchvision: true`` (utils/model.py get_resnet: 3x3 stem, no max-pool at 32 or 64 px)."""
    if "stem.0.weight" in state:
        raise EvalError("resnetap10 has no DD-Ranking model: its build_model makes 'ResNet-*' with utils/networks.py "
                        "ResNet (3x3 stride-1 stem, strided blocks), never the ResNet_AP classes")
    first = state.get("features.0.weight", state.get("conv1.weight"))
    if first is not None and first.shape[1] != 3:
        raise EvalError(f"the teacher takes {first.shape[1]}-channel images; DD-Ranking builds every model with 3 "
                        "(utils/model.py build_model: channel=3)")
    if "features.0.weight" in state and "classifier.weight" in state:
        if any(k.endswith("running_mean") for k in state):
            raise EvalError("a batch-norm ConvNet is not a vlcp network")
        depth = sum(1 for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4)
        return f"ConvNet-{depth}", "classifier"
    if "conv1.weight" in state and "fc.weight" in state:
        if "bn1.running_mean" not in state:
            raise EvalError("vlcp's resnet18 (instance norm, torchvision's 7x7 stride-2 stem and max-pool) has no "
                            "DD-Ranking model: its 'ResNet-18' has a 3x3 stride-1 stem and no max-pool")
        if "layer4.1.conv2.weight" not in state or "layer4.2.conv1.weight" in state:
            raise EvalError("only ResNet-18 teachers are exported")
        return "ResNet-18-BN", "fc"
    raise EvalError("the teacher is none of vlcp's networks (convnet3/6, resnet18-modified, resnet18-bn)")


def permuted(state: dict, head: str, rows: list[int]) -> dict:
    """A copy of ``state`` whose classifier output ``j`` is the old output ``rows[j]``."""
    import torch

    out = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    idx = torch.tensor(rows)
    for k in (f"{head}.weight", f"{head}.bias"):
        out[k] = out[k][idx].contiguous()
    return out


def ddranking_resnet_keys(state: dict) -> dict:
    """torchvision ResNet-18 names -> DD-Ranking's own ``ResNet`` (``tea_use_torchvision: false``): ``fc`` is
    ``classifier``, ``downsample`` is ``shortcut``; same layers otherwise (utils/networks.py lines 388-479)."""
    return {("classifier." + k[3:] if k.startswith("fc.") else k).replace(".downsample.", ".shortcut."): v
            for k, v in state.items()}


def teacher_files(weights: dict, order: list[str], name: str) -> tuple[dict[str, dict], dict]:
    """{path under dest: state dict} and the record of the exported teacher."""
    state, classes = weights["state"], weights["classes"]
    model, head = architecture(state)
    if state[f"{head}.weight"].shape[0] != len(classes) or sorted(classes) != sorted(order):
        raise EvalError(f"the teacher ({weights['source']}) has {state[f'{head}.weight'].shape[0]} outputs for the "
                        f"classes {classes[:3]}...; DD-Ranking's {name} has {order[:3]}...")
    rows = [classes.index(c) for c in order]
    ours = permuted(state, head, rows)
    files = {f"teacher/{name}/{model}/ckpt_best.pt": ours}
    size = weights.get("image_size")
    stem3 = model == "ResNet-18-BN" and state["conv1.weight"].shape[-1] == 3
    if stem3 and size in (None, 32):  # DD-Ranking's own ResNet is the same network at 32 px (at 64 its stem strides)
        files[f"teacher-ddranking-resnet/{name}/{model}/ckpt_best.pt"] = ddranking_resnet_keys(ours)
    return files, {"source": weights["source"], "model": model, "rows": rows, "image_size": size,
                   "files": list(files), "tea_use_torchvision": model.startswith("ResNet"),
                   "note": "ResNet-18-BN at 224 px: only tea_use_torchvision: true builds it" if
                   model.startswith("ResNet") and not stem3 else None}


def readme(record: dict) -> str:
    """README.md of an export: the mapping and the DD-Ranking settings that read it right."""
    t = record["teacher"]
    rows = "\n".join(f"| {c['index']} | `{c['folder']}` | `{c['id']}` | `{c['from']}` | {c['images']} |"
                     for c in record["classes"])
    real = ("a full ImageNet root (train/ and val/ with the 1000 wnid folders: DD-Ranking selects the subset's "
            "classes by ImageNet index)" if record["dataset"] in SUBSETS or record["dataset"] == "ImageNet1K"
            else "where torchvision's CIFAR files are (or get downloaded)")
    lines = [f"# {record['dataset']} for DD-Ranking ({DDRANKING})", "",
             f"Exported by vlcp from `{record['source']}`. `train/` is the `image_path` of DD-Ranking's "
             "`compute_metrics`: it reads it with `ImageFolder`, whose sorted folder order is DD-Ranking's class "
             "index (the 5-digit prefix).", "",
             "Settings: `dataset: " + record["dataset"] + f"`, `ipc: {record['ipc']}`, `real_data_path`: {real}; "
             "`custom_train_trans` must end in `ToTensor` + `Normalize` (without it `ImageFolder` yields PIL images).",
             ""]
    if t:
        size = f", `im_size: [{t['image_size']}, {t['image_size']}]`" if t["image_size"] else ""
        lines += [f"Teacher: `{t['files'][0]}` ({t['model']}, from `{t['source']}`, classifier rows permuted "
                  f"into DD-Ranking's order: row j = vlcp's row {t['rows']}). Set `teacher_dir: <this folder>/"
                  f"teacher`, `teacher_model_names: [{t['model']}]`, `tea_use_torchvision: "
                  f"{str(t['tea_use_torchvision']).lower()}`{size}, and "
                  "`soft_label_mode: M` (labels from the teacher during training; `S` needs a soft-label tensor"
                  + (": below)." if record.get("soft_labels") or record.get("soft_label_choices") else
                     ": run `vlcp relabel` and export again).")]
        if len(t["files"]) > 1:
            lines += ["", "`teacher-ddranking-resnet/` holds the same weights named for DD-Ranking's own ResNet "
                      "(`tea_use_torchvision: false`, 32 px only)."]
        lines += [""]
    else:
        lines += ["No teacher: run `vlcp evaluate OUT --protocol rded` first, or pass a teacher.", ""]
    from vlcp.evaluation.ddranking_soft import readme_lines

    lines += readme_lines(record)
    return "\n".join(lines + ["| index | folder | class | from | images |", "|---|---|---|---|---|", rows, ""])
