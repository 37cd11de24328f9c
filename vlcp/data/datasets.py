"""Datasets: names users know (ImageNette, CIFAR-10, ...) or any ImageFolder path, as one list of samples.

Each class has a canonical *folder* id (ImageNet wnid, CIFAR label, source folder name): output
folders are named by it, so torchvision's ImageFolder, the Minimax/IDC scripts and DD-Ranking assign
the same labels (they sort folder names). The human *name* feeds the caption prompt, as the reference
code does: the full ImageNet class string ("tench, Tinca tinca") for ImageNet subsets, the plain label
for CIFAR.

Nothing here imports torch: a fully cached run only needs the samples' content hashes.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from vlcp.data.downloads import download, extract
from vlcp.data.errors import DatasetError
from vlcp.data.images import IMG_EXTENSIONS, BadImage, is_class_dir, open_rgb
from vlcp.store.cache import file_digest, stable_hash


@dataclass(frozen=True)
class ClassInfo:
    folder: str  # canonical id: output folder name
    name: str  # human-readable: goes into the caption prompt


@dataclass
class Sample:
    class_idx: int
    source: str  # file path, or "<dataset>/<split>/<index>" for array datasets
    digest: str  # sha256 of the file bytes or of the pixel array
    array: np.ndarray | None = None

    def load(self):
        """The image as RGB PIL; raises BadImage for files PIL cannot read."""
        if self.array is None:
            return open_rgb(self.source)
        from PIL import Image

        a = self.array
        return Image.fromarray(a).convert("RGB")


@dataclass
class Dataset:
    name: str
    split: str
    root: str | None
    classes: list[ClassInfo]
    samples: list[Sample]
    skipped: list[dict] = field(default_factory=list)
    source: dict = field(default_factory=dict)  # url / package the data came from

    def identity(self) -> dict:
        return {"name": self.name, "split": self.split, "root": self.root, "classes": [c.folder for c in self.classes],
                "images": len(self.samples), "digest": stable_hash([s.digest for s in self.samples]), **self.source}


# -- class tables ---------------------------------------------------------------------------------
IMAGENETTE = [
    ("n01440764", "tench, Tinca tinca"),
    ("n02102040", "English springer, English springer spaniel"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw, chainsaw"),
    ("n03028079", "church, church building"),
    ("n03394916", "French horn, horn"),
    ("n03417042", "garbage truck, dustcart"),
    ("n03425413", "gas pump, gasoline pump, petrol pump, island dispenser"),
    ("n03445777", "golf ball"),
    ("n03888605", "parachute, chute"),
]
IMAGEWOOF = [
    ("n02086240", "Shih-Tzu"),
    ("n02087394", "Rhodesian ridgeback"),
    ("n02088364", "beagle"),
    ("n02089973", "English foxhound"),
    ("n02093754", "Border terrier"),
    ("n02096294", "Australian terrier"),
    ("n02099601", "golden retriever"),
    ("n02105641", "Old English sheepdog, bobtail"),
    ("n02111889", "Samoyed, Samoyede"),
    ("n02115641", "dingo, warrigal, warragal, Canis dingo"),
]
# ImageIDC: the first 10 classes of the ImageNet-100 list (CMC, Tian et al.), as in IDC and VLCP.
IMAGEIDC = [
    ("n02869837", "bonnet, poke bonnet"),
    ("n01749939", "green mamba"),
    ("n02488291", "langur"),
    ("n02107142", "Doberman, Doberman pinscher"),
    ("n13037406", "gyromitra"),
    ("n02091831", "Saluki, gazelle hound"),
    ("n04517823", "vacuum, vacuum cleaner"),
    ("n04589890", "window screen"),
    ("n03062245", "cocktail shaker"),
    ("n01773797", "garden spider, Aranea diademata"),
]
FASHION_MNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # digits | idx | cifar | fastai | imagenet
    description: str
    url: str | None = None
    checksum: str | None = None  # "md5:..." or "sha256:..."
    folder: str | None = None  # what the archive extracts to, under --data-dir
    classes: tuple = ()


KNOWN: dict[str, Spec] = {s.name: s for s in [
    Spec("digits", "digits", "scikit-learn's 8x8 handwritten digits (embedded, offline); 4/5 train, every 5th image test"),
    Spec("fashion-mnist", "idx", "Fashion-MNIST 28x28 (Zalando); also read from Debian's dataset-fashion-mnist",
         "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", None, "fashion-mnist"),
    Spec("cifar10", "cifar", "CIFAR-10 32x32 (binary version)", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
         "md5:c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin"),
    Spec("cifar100", "cifar", "CIFAR-100 32x32 (binary version, fine labels)",
         "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "md5:03b5dce01913d631647c71ecec9e9cb8",
         "cifar-100-binary"),
    Spec("imagenette", "fastai", "ImageNette v2, 320px (fast.ai)",
         "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz", "md5:3df6f0d01a2c9592104656642f5e78a3",
         "imagenette2-320", tuple(IMAGENETTE)),
    Spec("imagewoof", "fastai", "ImageWoof v2, 320px (fast.ai)",
         "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-320.tgz",
         "sha256:4e4905ed7643120daaf9bf3b2ef7f3a7e8396d9bdaf254a38c6f01f618b4973d", "imagewoof2-320", tuple(IMAGEWOOF)),
    Spec("imageidc", "imagenet", "ImageIDC: 10 ImageNet classes, read from a local ImageNet root", None, None,
         "imagenet", tuple(IMAGEIDC)),
    Spec("imagenet", "imagenet", "ImageNet-1K, read from a local ImageNet root (train/<wnid>/, val/<wnid>/)", None,
         None, "imagenet"),
]}
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
              "train-labels-idx1-ubyte.gz", "md5:25c81989df183df01b3e8a0aad5dffbe"),
    "test": ("t10k-images-idx3-ubyte.gz", "md5:bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz", "md5:bb300cfdad3c16e7a12a480ee83cd310"),
}


def location(spec: Spec, data_dir: Path) -> Path | None:
    """Where a named dataset is (or would be) stored."""
    if spec.kind == "digits":
        return None
    if spec.kind == "idx" and not (data_dir / spec.folder).exists() and DEBIAN_FASHION_MNIST.exists():
        return DEBIAN_FASHION_MNIST
    return data_dir / spec.folder


def is_present(spec: Spec, data_dir: Path) -> bool:
    loc = location(spec, data_dir)
    if loc is None:
        return True
    if spec.kind == "idx":
        return all((loc / f).exists() for f in FMNIST_FILES["train"][::2])
    if spec.kind == "imagenet":
        return (loc / "train").is_dir()
    return loc.exists()


# -- loading --------------------------------------------------------------------------------------
def load_dataset(data: str, data_dir: str | os.PathLike, split: str = "train", classes: list[str] | None = None,
                 max_per_class: int | None = None, digest: Callable[[str], str] | None = None) -> Dataset:
    """Resolve a name or ImageFolder path into a Dataset; ``digest`` may memoise file hashes."""
    data_dir = Path(data_dir)
    digest = digest or file_digest
    if data in KNOWN:
        spec = KNOWN[data]
        ds = _LOADERS[spec.kind](spec, data_dir, split, digest)
    elif Path(data).is_dir():
        root = _split_folder(Path(data), split)
        ds = _image_folder(str(root), root, None, digest, data_name=str(Path(data).resolve()), split=split)
    else:
        check_data(data)  # neither a name nor a folder: it raises, saying which
        raise DatasetError(f"--data {data}: no such folder")
    return _select(ds, classes, max_per_class)


SPLIT_FOLDERS = {"test": ("test", "val", "validation")}  # ImageNet-style folders call the test split val/


class NoTestSplit(DatasetError):
    """``--data DIR`` has no test split folder: testing on DIR would test on the images it trains on."""


def _split_folder(root: Path, split: str) -> Path:
    """``root/<split>`` (for the test split also ``val/`` or ``validation/``) when ``root`` holds split folders.
    A folder without them (its classes at the top) is training data only: its train split is ``root`` itself
    (what ``vlcp distill`` reads), and its test split raises NoTestSplit, as does a ``train/`` without a test
    folder: a test on ``root`` would test on the very images a set was distilled from."""
    names = SPLIT_FOLDERS.get(split, (split,))
    loose = bool(_image_files(root))  # image files at the top: root is one ImageFolder, whatever its sub-folders
    found = None if loose else next((root / n for n in names if (root / n).is_dir()), None)
    if found is not None:
        return found
    if split == "train":
        return root
    folders = " or ".join(n + "/" for n in names)
    if (root / "train").is_dir() and not loose:
        raise NoTestSplit(f"--data {root} has a train/ folder but no {folders} for the {split} split (an "
                          f"ImageFolder of the same classes)")
    raise NoTestSplit(f"--data {root} has no {split} split (no {folders} folder): its class folders are the "
                      f"training images vlcp distill reads, and testing on them would test on the images a set was "
                      f"distilled from; give a folder with train/ and {names[0]}/"
                      + (f" (or {names[1]}/)" if len(names) > 1 else "") + " split folders, one sub-folder per class "
                      "in each")


def check_data(data: str) -> None:
    """Raise DatasetError unless ``data`` is a known name or an existing folder; reads no image. A value that
    looks like a path (``./x``, ``a/b``, ``~/x``) and is missing is "no such folder", not an unknown name."""
    path = Path(data)
    if data in KNOWN or path.is_dir():
        return
    if path.exists():
        raise DatasetError(f"--data {data} is a file, not a folder (an ImageFolder: one sub-folder per class)")
    if "/" in data or os.sep in data or data.startswith((".", "~")):
        raise DatasetError(f"--data {data}: no such folder")
    names = ", ".join(KNOWN)
    raise DatasetError(f"unknown dataset {data!r}: give one of {names}, or a path to an ImageFolder directory")


def _select(ds: Dataset, classes: list[str] | None, max_per_class: int | None) -> Dataset:
    if classes:
        from vlcp.data.classnames import class_index, lookup

        index = class_index(ds.classes)
        unknown = [c for c in classes if lookup(index, c) is None]
        if unknown:
            raise DatasetError(f"unknown class(es) {', '.join(unknown)} in {ds.name}; known: "
                               + ", ".join(c.folder for c in ds.classes))
        keep = sorted({lookup(index, c) for c in classes})
        remap = {old: new for new, old in enumerate(keep)}
        ds.classes = [ds.classes[i] for i in keep]
        ds.samples = [Sample(remap[s.class_idx], s.source, s.digest, s.array) for s in ds.samples if s.class_idx in remap]
    if max_per_class:
        seen: dict[int, int] = {}
        kept = []
        for s in ds.samples:
            if seen.get(s.class_idx, 0) < max_per_class:
                seen[s.class_idx] = seen.get(s.class_idx, 0) + 1
                kept.append(s)
        ds.samples = kept
    return ds


def _array_samples(name: str, split: str, images: np.ndarray, labels: np.ndarray) -> list[Sample]:
    out = []
    for i, (img, y) in enumerate(zip(images, labels)):
        img = np.ascontiguousarray(img)
        h = hashlib.sha256(str(img.shape).encode() + img.tobytes()).hexdigest()
        out.append(Sample(int(y), f"{name}/{split}/{i}", h, img))
    return out


def _digits(spec: Spec, data_dir: Path, split: str, digest) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    idx = np.arange(len(images))
    keep = idx % 5 != 4 if split == "train" else idx % 5 == 4
    classes = [ClassInfo(str(i), f"handwritten digit {i}") for i in range(10)]
    return Dataset("digits", split, None, classes, _array_samples("digits", split, images[keep], d.target[keep]),
                   source={"source": "sklearn.datasets.load_digits"})


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = struct.unpack(">HBB", data[:4])
    if dtype != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(spec: Spec, data_dir: Path, split: str, digest) -> Dataset:
    img_name, img_sum, lab_name, lab_sum = FMNIST_FILES["train" if split == "train" else "test"]
    root = data_dir / spec.folder
    if not (root / img_name).exists() and DEBIAN_FASHION_MNIST.exists():
        root = DEBIAN_FASHION_MNIST  # Debian recompresses the files: trust dpkg, not our md5s
    else:
        for name, checksum in ((img_name, img_sum), (lab_name, lab_sum)):
            download(spec.url + name, root / name, checksum, hint="or install Debian's dataset-fashion-mnist package")
    images, labels = _read_idx(root / img_name), _read_idx(root / lab_name)
    classes = [ClassInfo(f"{i}-{re.sub(r'[^a-z0-9]+', '-', n.lower()).strip('-')}", n) for i, n in
               enumerate(FASHION_MNIST)]  # index prefix: sorted folder names keep the label order
    return Dataset("fashion-mnist", split, str(root), classes, _array_samples("fashion-mnist", split, images, labels),
                   source={"url": spec.url})


def _archive_root(spec: Spec, data_dir: Path) -> Path:
    """The extracted folder of a tarball dataset, downloading and extracting it on first use."""
    root = data_dir / spec.folder
    if not root.exists():
        archive = data_dir / Path(spec.url).name
        download(spec.url, archive, spec.checksum)
        extract(archive, data_dir)
    return root


def _cifar(spec: Spec, data_dir: Path, split: str, digest) -> Dataset:
    root = _archive_root(spec, data_dir)
    if spec.name == "cifar10":
        files = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
        names = [n for n in (root / "batches.meta.txt").read_text().split() if n]
        label_bytes, label_at = 1, 0
    else:
        files = ["train.bin" if split == "train" else "test.bin"]
        names = [n for n in (root / "fine_label_names.txt").read_text().split() if n]
        label_bytes, label_at = 2, 1
    rec = label_bytes + 3072
    raw = np.concatenate([np.fromfile(root / f, np.uint8) for f in files]).reshape(-1, rec)
    labels = raw[:, label_at]
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    classes = [ClassInfo(n, n.replace("_", " ")) for n in names]  # CIFAR labels are already alphabetical
    return Dataset(spec.name, split, str(root), classes, _array_samples(spec.name, split, images, labels),
                   source={"url": spec.url, "checksum": spec.checksum})


def _fastai(spec: Spec, data_dir: Path, split: str, digest) -> Dataset:
    folder = _archive_root(spec, data_dir) / ("train" if split == "train" else "val")
    return _image_folder(spec.name, folder, dict(spec.classes), digest, split=split,
                         source={"url": spec.url, "checksum": spec.checksum})


def _imagenet(spec: Spec, data_dir: Path, split: str, digest) -> Dataset:
    root = data_dir / spec.folder
    folder = root / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DatasetError(f"{spec.name} reads a local ImageNet copy: expected {folder}/<wnid>/*.JPEG "
                           f"(download ILSVRC2012 from https://image-net.org and sort val/ into wnid folders; "
                           f"set --data-dir to the folder holding imagenet/)")
    names = dict(spec.classes) or _synset_names(root)
    wanted = [w for w, _ in spec.classes] or None
    return _image_folder(spec.name, folder, names, digest, split=split, only=wanted)


def _synset_names(root: Path) -> dict[str, str]:
    for fname in ("LOC_synset_mapping.txt", "synset_words.txt"):
        p = root / fname
        if p.exists():
            return {line[:9]: line[10:].strip() for line in p.read_text().splitlines() if line.strip()}
    return {}


_LOADERS = {"digits": _digits, "idx": _fashion_mnist, "cifar": _cifar, "fastai": _fastai, "imagenet": _imagenet}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMG_EXTENSIONS)


def _image_folder(name: str, folder: Path, names: dict[str, str] | None, digest, split: str = "train",
                  source: dict | None = None, only: list[str] | None = None, data_name: str | None = None) -> Dataset:
    """One sub-folder per class, as torchvision's ImageFolder; unreadable files are skipped later."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a directory")
    subdirs = sorted(d for d in folder.iterdir() if is_class_dir(d))
    if only is not None:
        missing = [w for w in only if not (folder / w).is_dir()]
        if missing:
            raise DatasetError(f"{folder} lacks class folder(s) {', '.join(missing)}")
        subdirs = [folder / w for w in sorted(only)]
    if not subdirs:
        raise DatasetError(f"{folder} has no class sub-folders: an ImageFolder needs one folder per class")
    classes, samples = [], []
    for ci, d in enumerate(subdirs):
        human = (names or {}).get(d.name, d.name.replace("_", " "))
        classes.append(ClassInfo(d.name, human))
        files = _image_files(d)
        if not files:
            raise DatasetError(f"class {d.name!r} in {folder} has no image files")
        for p in files:
            samples.append(Sample(ci, str(p), digest(str(p))))
    return Dataset(data_name or name, split, str(folder), classes, samples, source=source or {})


# -- downloads ------------------------------------------------------------------------------------
def check_image(sample: Sample) -> dict:
    """Decode once; the images stage caches this so a rerun never decodes again."""
    try:
        img = sample.load()
    except BadImage as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "width": img.width, "height": img.height}
