"""Datasets: names, ImageFolders with awkward files, offline downloads, class naming."""
import gzip
import struct
import urllib.error

import numpy as np
import pytest
from PIL import Image

from vlcp.data import datasets, downloads
from vlcp.data.datasets import DatasetError, check_image, load_dataset


def make_awkward_folder(root):
    """One class of every awkward kind of file, plus a clean class."""
    a, b = root / "n01440764", root / "n02102040"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    rgb(16, 16).save(a / "rgb.jpg")
    rgb(16, 16).convert("L").save(a / "gray.png")
    rgb(16, 16).convert("CMYK").save(a / "cmyk.jpg")
    rgb(16, 16).convert("RGBA").save(a / "rgba.png")
    p = rgb(16, 16).convert("P")
    p.info["transparency"] = 0
    p.save(a / "palette.png", transparency=0)
    rgb(1, 1).save(a / "tiny.png")
    Image.fromarray((rng.integers(0, 65535, (8, 8))).astype(np.uint16)).save(a / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rgb(20, 10).save(a / "rotated.jpg", exif=exif)
    (a / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (a / "empty.png").write_bytes(b"")
    good = (a / "rgb.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (a / "notes.txt").write_text("not an image, ignored")
    for i in range(3):
        rgb(16, 16).save(b / f"{i}.png")
    return root


def test_awkward_image_folder(tmp_path):
    ds = load_dataset(str(make_awkward_folder(tmp_path / "folder")), tmp_path)
    assert [c.folder for c in ds.classes] == ["n01440764", "n02102040"]
    checks = {s.source.rsplit("/", 1)[-1]: check_image(s) for s in ds.samples}
    assert "notes.txt" not in checks
    bad = sorted(k for k, v in checks.items() if not v["ok"])
    assert bad == ["corrupt.jpg", "empty.png", "truncated.jpg"]
    assert checks["rotated.jpg"]["width"] == 10 and checks["rotated.jpg"]["height"] == 20  # EXIF applied
    for name in ("gray.png", "cmyk.jpg", "rgba.png", "palette.png", "tiny.png", "deep16.png"):
        s = next(s for s in ds.samples if s.source.endswith(name))
        assert s.load().mode == "RGB"


def test_stored_messages_name_files_without_the_users_folders(tmp_path):
    """A stored warning names the file under the folder the user gave (or by its name), and a decoder's message
    loses the absolute path PIL quotes: ``vlcp publish`` hides only values that are a whole path."""
    from vlcp.data.images import shown_path, without_paths

    root = make_awkward_folder(tmp_path / "folder")
    err = check_image(next(s for s in load_dataset(str(root), tmp_path).samples
                           if s.source.endswith("corrupt.jpg")))["error"]
    assert str(root) in err  # PIL quotes the path it was given
    assert without_paths(err) == "corrupt.jpg: cannot identify image file 'corrupt.jpg'"
    assert without_paths("[Errno 13] Permission denied: \"/home/me/it's.png\" and '~/a/b.jpg', 'C:\\\\u\\\\c.png'") == (
        "[Errno 13] Permission denied: \"it's.png\" and 'b.jpg', 'c.png'")
    assert without_paths("Truncated File Read; 'a/b.png' '/'") == "Truncated File Read; 'a/b.png' '/'"
    assert shown_path(root / "n01440764" / "corrupt.jpg", root) == "n01440764/corrupt.jpg"
    assert shown_path(str(root / "n01440764" / "corrupt.jpg"), str(root)) == "n01440764/corrupt.jpg"
    assert shown_path("/elsewhere/x.jpg", root) == "x.jpg" and shown_path("/a/x.jpg", None) == "x.jpg"
    assert shown_path("digits/train/3", None) == "digits/train/3"  # not a file: as it is


def test_empty_class_is_a_clear_error(tmp_path):
    (tmp_path / "f" / "cat").mkdir(parents=True)
    (tmp_path / "f" / "dog").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "f" / "dog" / "1.png")
    with pytest.raises(DatasetError, match="class 'cat'.*no image files"):
        load_dataset(str(tmp_path / "f"), tmp_path)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'imagenett'.*imagenette"):
        load_dataset("imagenett", tmp_path)


def test_digits_split_classes_and_subsets(tmp_path):
    train, test = load_dataset("digits", tmp_path), load_dataset("digits", tmp_path, "test")
    assert len(train.samples) + len(test.samples) == 1797 and len(test.samples) == 359
    assert [c.folder for c in train.classes] == [str(i) for i in range(10)]
    assert train.classes[3].name == "handwritten digit 3"
    sub = load_dataset("digits", tmp_path, classes=["7", "2"], max_per_class=5)
    assert [c.folder for c in sub.classes] == ["2", "7"] and len(sub.samples) == 10
    assert {s.class_idx for s in sub.samples} == {0, 1}
    assert sub.samples[0].load().size == (8, 8)
    with pytest.raises(DatasetError, match="unknown class"):
        load_dataset("digits", tmp_path, classes=["11"])
    assert load_dataset("digits", tmp_path).identity() == train.identity()


def test_missing_download_names_url_and_folder(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(downloads.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenette", tmp_path / "data")
    msg = str(err.value)
    assert "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz" in msg
    assert str(tmp_path / "data" / "imagenette2-320.tgz") in msg
    assert not list((tmp_path / "data").glob("*.part"))


def test_imagenette_layout_gets_wnid_folders_and_imagenet_names(tmp_path):
    root = tmp_path / "data" / "imagenette2-320" / "train"
    make_awkward_folder(root)
    ds = load_dataset("imagenette", tmp_path / "data")
    assert ds.classes[0].folder == "n01440764" and ds.classes[0].name == "tench, Tinca tinca"
    assert ds.classes[1].name == "English springer, English springer spaniel"
    sub = load_dataset("imagenette", tmp_path / "data", classes=["tench"])
    assert [c.folder for c in sub.classes] == ["n01440764"]


def _idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_debian_files(tmp_path, monkeypatch):
    deb = tmp_path / "usr-share-datasets-fashion-mnist"
    deb.mkdir()
    imgs = np.arange(6 * 28 * 28).reshape(6, 28, 28) % 256
    _idx(deb / "train-images-idx3-ubyte.gz", imgs)
    _idx(deb / "train-labels-idx1-ubyte.gz", np.array([0, 9, 0, 3, 9, 1]))
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", deb)
    ds = load_dataset("fashion-mnist", tmp_path / "data")
    assert [s.class_idx for s in ds.samples] == [0, 9, 0, 3, 9, 1]
    assert ds.classes[0].folder == "0-t-shirt-top" and ds.classes[0].name == "T-shirt/top"
    folders = [c.folder for c in ds.classes]
    assert folders == sorted(folders)  # ImageFolder's sorted order = label order
    assert np.array_equal(np.asarray(ds.samples[1].load())[..., 0], imgs[1])


def test_cifar10_binary_reader(tmp_path):
    root = tmp_path / "data" / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    (root / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.zeros((2, 3073), np.uint8)
        rec[:, 0] = [3, 8]
        rec[1, 1:1025] = 255  # red channel of the second image
        rec.tofile(root / f)
    ds = load_dataset("cifar10", tmp_path / "data")
    assert len(ds.samples) == 10 and ds.classes[3].folder == "cat"
    assert [c.folder for c in ds.classes] == sorted(names)
    px = np.asarray(ds.samples[1].load())
    assert px.shape == (32, 32, 3) and px[0, 0].tolist() == [255, 0, 0]


def test_a_folder_with_train_and_val_gives_val_as_the_test_split(tmp_path):
    """ImageNet-style folders (train/, val/): `vlcp evaluate --data DIR` tests on val/, and a folder with
    train/ alone says which split is missing instead of reading train/ as one more class."""
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            for j in range(n):
                (tmp_path / "d" / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4), (j * 40, 0, 0)).save(tmp_path / "d" / split / c / f"{j}.png")
    train = load_dataset(str(tmp_path / "d"), tmp_path, "train")
    test = load_dataset(str(tmp_path / "d"), tmp_path, "test")
    assert [c.folder for c in test.classes] == ["a", "b"] and len(train.samples) == 6 and len(test.samples) == 4
    assert all("/val/" in s.source for s in test.samples)
    (tmp_path / "d" / "val").rename(tmp_path / "d" / "elsewhere")
    with pytest.raises(DatasetError, match=r"has a train/ folder but no test/ or val/ or validation/ for the test split"):
        load_dataset(str(tmp_path / "d"), tmp_path, "test")


def test_a_macos_zip_folder_is_not_a_class(tmp_path):
    """Unzipping a folder zipped on a Mac leaves __MACOSX/ (resource forks named like images) beside the classes."""
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "ds" / c / "0.png")
    (tmp_path / "ds" / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "ds" / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    ds = load_dataset(str(tmp_path / "ds"), tmp_path)
    assert [c.folder for c in ds.classes] == ["cat", "dog"] and len(ds.samples) == 2
