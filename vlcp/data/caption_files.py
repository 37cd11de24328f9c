"""Caption files in the reference's format: one JSON object per line, ``{"file_name": ..., "text": ...}``.

The VLCP repository publishes its LLaVA captions of ImageNette, ImageWoof and ImageIDC this way
(``03_distiilation/text_description/*.jsonl``, written by ``01_text_generation/llava_result_sum.py``).
``file_name`` is ``<class folder>/<file>``, with every ``_`` of the file part replaced by ``MM`` (its
``rename.sh`` renamed the images to match); the text is already cleaned (no ``"``, no ``'s``). The same
layout is Hugging Face's ``imagefolder`` ``metadata.jsonl``, which ``write_jsonl`` produces.
"""
from __future__ import annotations

import json
from pathlib import Path


class CaptionFileError(Exception):
    """A caption file that cannot be read as the reference format (bad JSON, missing keys)."""


def undo_rename(file_name: str) -> str:
    """``"n01440764/n01440764MM10026.JPEG"`` -> ``"n01440764/n01440764_10026.JPEG"`` (file part only)."""
    folder, _, name = file_name.replace("\\", "/").rpartition("/")
    name = name.replace("MM", "_")
    return f"{folder}/{name}" if folder else name


def read_reference_jsonl(path: str | Path) -> dict[str, str]:
    """``{"<class folder>/<file>": caption}`` with the ``MM`` rename undone; a later line wins."""
    table: dict[str, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionFileError(f"cannot read caption file {path}: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            table[undo_rename(str(row["file_name"]))] = str(row["text"])
        except (ValueError, KeyError, TypeError):
            raise CaptionFileError(f"{path}, line {n}: expected {{\"file_name\": ..., \"text\": ...}}, "
                                   f"got {line[:80]!r}") from None
    return table


def match_captions(samples_relpaths: list[str], table: dict[str, str]) -> tuple[dict[int, str], list[str]]:
    """(sample index -> caption, relative paths without one): by relative path, then by file name.

    A file name shared by several entries of the table (the same name in two class folders) is not
    used for the fallback, so an image never gets another class's caption.
    """
    by_name: dict[str, str | None] = {}
    for key, text in table.items():
        name = key.rpartition("/")[2]
        by_name[name] = text if name not in by_name else None
    found, missing = {}, []
    for i, rel in enumerate(samples_relpaths):
        key = undo_rename(rel)
        text = table.get(key)
        if text is None:
            text = by_name.get(key.rpartition("/")[2])
        if text is None:
            missing.append(rel)
        else:
            found[i] = text
    return found, missing


def write_jsonl(path: str | Path, rows) -> int:
    """Write ``{"file_name", "text"}`` rows, one JSON object per line, atomically; returns the row count."""
    from vlcp.store.cache import atomic_write_text

    lines = [json.dumps({"file_name": r["file_name"], "text": r["text"]}, ensure_ascii=False) for r in rows]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)
