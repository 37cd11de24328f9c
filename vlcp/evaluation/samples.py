"""Reading image sets as arrays: a synthetic ImageFolder matched to a dataset's classes, and tensors at a protocol's size."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from vlcp.data.datasets import Dataset, DatasetError
from vlcp.evaluation.protocols import EvalError, Protocol

NOT_CLASSES = {"evaluations", "ranks", "soft_labels"}  # what vlcp adds next to an old-layout set's class folders


def to_array(img, size: int, channels: int, crop_to: int | None = None, resample: str = "bicubic") -> np.ndarray:
    """PIL image -> uint8 (C, H, W) at the protocol's size (``imageops.resize_crop``)."""
    from vlcp.data.imageops import resize_crop

    a = np.asarray(resize_crop(img.convert("L" if channels == 1 else "RGB"), size, crop_to, resample), np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def tensors_from_samples(samples, size: int, channels: int, crop_to: int | None = None, progress: bool = False,
                         resample: str = "bicubic"):
    """uint8 (N, C, H, W) and int64 labels, decoded once and kept in memory."""
    from tqdm.auto import tqdm

    xs, ys = [], []
    for s in tqdm(samples, desc="loading images", leave=False, disable=not progress or len(samples) < 2000):
        xs.append(to_array(s.load(), size, channels, crop_to, resample))
        ys.append(s.class_idx)
    return np.stack(xs), np.array(ys, np.int64)


def train_tensors(samples, p: Protocol, progress: bool = False):
    return tensors_from_samples(samples, p.load_size, p.channels, p.load_size if p.load_crop else None, progress,
                                p.resample)


def test_tensors(samples, p: Protocol, progress: bool = False):
    if p.test_resize:
        return tensors_from_samples(samples, p.test_resize, p.channels, p.image_size, progress, p.resample)
    return train_tensors(samples, p, progress)


def match_classes(folders: list[str], ds: Dataset) -> dict[str, int]:
    """Map synthetic class folders to dataset classes by canonical id or human name (case-insensitive)."""
    from vlcp.data.classnames import class_index, lookup

    index = class_index(ds.classes)
    mapping = {f: lookup(index, f) for f in folders}
    unmatched = [f for f, i in mapping.items() if i is None]
    if unmatched:
        raise EvalError(f"class folder(s) {', '.join(sorted(unmatched))} match no class of {ds.name} "
                        f"(expected ids like {', '.join(c.folder for c in ds.classes[:3])} or their names)")
    return mapping


def synthetic_samples(folder: Path, ds: Dataset, ipc: int | None):
    """The first ``ipc`` images (by file name) of each class folder, as Samples labelled for ``ds``. ``folder`` is
    a set vlcp wrote (its class folders in ``train/``, or at its root before issue 23) or any ImageFolder."""
    from vlcp.data.datasets import Sample, _image_files
    from vlcp.data.images import is_class_dir
    from vlcp.store.output import images_dir

    if not Path(folder).is_dir():
        raise EvalError(f"{folder} is not a directory")
    folder = images_dir(Path(folder))
    subdirs = sorted(d for d in folder.iterdir() if is_class_dir(d)
                     and d.name not in NOT_CLASSES)
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


def check_dataset(ds: Dataset) -> None:
    if not ds.samples:
        raise DatasetError(f"{ds.name} has no images in split {ds.split}")


def load_test(data: str, data_dir) -> Dataset:
    """The real test split of ``data``; EvalError (exit code 2) for a folder without one, whose only images are
    the training images (``datasets.NoTestSplit``)."""
    from vlcp.data.datasets import NoTestSplit, load_dataset

    try:
        return load_dataset(data, data_dir, "test")
    except NoTestSplit as exc:
        raise EvalError(str(exc)) from None


def only_classes(ds: Dataset, folders: list[str]) -> Dataset:
    """A copy of ``ds`` with the classes ``folders`` (canonical ids) only, labelled 0..k-1 in that order."""
    index = {c.folder: i for i, c in enumerate(ds.classes)}
    missing = [f for f in folders if f not in index]
    if missing:
        raise EvalError(f"the {ds.split} split of {ds.name} has no class {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    new = {index[f]: i for i, f in enumerate(folders)}
    return replace(ds, classes=[ds.classes[index[f]] for f in folders],
                   samples=[replace(s, class_idx=new[s.class_idx]) for s in ds.samples if s.class_idx in new])


def set_classes(ds: Dataset, samples: list) -> tuple[Dataset, list]:
    """(``ds``, ``samples``) over the classes the set's ``samples`` hold (a set distilled with ``--classes``):
    unchanged (the same objects) when they hold every class of ``ds``; else ``ds`` restricted to those classes,
    in its order, and the samples relabelled alike, so a network has one output per class of the set."""
    keep = sorted({s.class_idx for s in samples})
    if len(keep) == len(ds.classes):
        return ds, samples
    new = {old: i for i, old in enumerate(keep)}
    return (only_classes(ds, [ds.classes[i].folder for i in keep]),
            [replace(s, class_idx=new[s.class_idx]) for s in samples])


def test_for(test_ds: Dataset, train_ds: Dataset) -> Dataset:
    """The test split over the classes of ``train_ds`` (those of a set of a class subset, ``set_classes``):
    ``test_ds`` itself when it has the same classes; EvalError when it lacks one of them."""
    folders = [c.folder for c in train_ds.classes]
    return test_ds if [c.folder for c in test_ds.classes] == folders else only_classes(test_ds, folders)


def tested_classes(test_ds: Dataset, of: int) -> dict:
    """What the results record of the test split: its images, the classes tested and the dataset's count."""
    return {"split": test_ds.split, "images": len(test_ds.samples), "classes": [c.folder for c in test_ds.classes],
            "dataset_classes": of}
