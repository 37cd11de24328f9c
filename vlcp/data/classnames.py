"""One class-name lookup: a folder id, the full human name or its first comma-separated name, any case.

``evaluate`` matches synthetic class folders with it; ``datasets`` (``--classes``) and ``refine``
(torchvision categories) match the same three spellings and can share it.
"""
from __future__ import annotations


def spellings(folder: str, name: str) -> list[str]:
    """The lower-cased spellings a class answers to: "n01440764", "tench, tinca tinca", "tench"."""
    return [folder.lower(), name.lower(), name.split(",")[0].strip().lower()]


def class_index(classes) -> dict[str, int]:
    """Lower-cased spelling -> class index; the first class claiming a spelling keeps it."""
    index: dict[str, int] = {}
    for i, c in enumerate(classes):
        for key in spellings(c.folder, c.name):
            index.setdefault(key, i)
    return index


def lookup(index: dict[str, int], spelling: str) -> int | None:
    return index.get(spelling.strip().lower())
