"""Robust image I/O: any file PIL can read becomes an upright RGB image; anything else is BadImage."""
from __future__ import annotations

import re
from pathlib import Path

IMG_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}


def is_class_dir(d: Path) -> bool:
    """A sub-folder that is a class: not hidden, not the ``__MACOSX`` folder macOS adds to a zip file."""
    return d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX"


class BadImage(Exception):
    """A file that cannot be decoded as an image (truncated, empty, not an image)."""


def to_rgb(img):
    """EXIF orientation applied; grayscale, palette, CMYK, 16-bit and alpha images become RGB."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray(to_8bit(img))
    elif img.mode == "F":
        import numpy as np

        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def to_8bit(img):
    """A 16-bit grey image as uint8 by the format's full range, not the image's own maximum: level v of 0..65535
    becomes round(v / 257), so 65535 -> 255, mid-grey 32767 -> 127, 32768 -> 128, and a dark image stays dark.
    257 = 65535 / 255: an 8-bit level k stored as 16 bits the usual way (k * 257, which maps 255 to 65535)
    comes back as k exactly; rounding (not ``v >> 8``, which truncates) keeps every level within half a step.
    Mode ``I`` (32-bit) is what Pillow makes of a 16-bit PGM/PPM (its levels scaled to 0..65535), so it is read
    on the same scale, values outside 0..65535 clipped."""
    import numpy as np

    a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    return ((a + 128) // 257).astype(np.uint8)  # == round(a / 257): a / 257 never ends in exactly .5


def open_rgb(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise BadImage(f"{Path(path).name}: {exc}") from None


# a quoted absolute path (POSIX, ~, or a drive letter), as PIL and the OS quote the file they failed on
_QUOTED_PATH = re.compile(r"""(['"])(?:/|~|[A-Za-z]:[\\/])(?:(?!\1).)*?((?:(?!\1)[^\\/])+)\1""")


def shown_path(path: str | Path, root: str | Path | None) -> str:
    """``path`` relative to ``root`` (the folder the user gave), else its file name where it is absolute: what a
    stored message names, so that the user still finds the file and a published manifest names no local folder
    (``vlcp publish`` hides only values that are a whole path)."""
    p = Path(path)
    if root is not None and p.is_relative_to(root):
        return p.relative_to(root).as_posix()
    return p.name if p.is_absolute() else p.as_posix()


def without_paths(text: str) -> str:
    """``text`` with each quoted absolute path cut to its file name: a decoder's message stored as a warning or
    a skipped image's error (a cached one may quote the path of another file with the same bytes)."""
    return _QUOTED_PATH.sub(lambda m: f"{m[1]}{m[2]}{m[1]}", text)
