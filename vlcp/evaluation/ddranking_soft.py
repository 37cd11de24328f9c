"""DD-Ranking's soft-label mode S for ``vlcp export --format ddranking``: the ``image_logits`` of ``vlcp relabel``
in the export's image and class order.

What ddranking 0.2.0 takes (``metrics/soft_label.py``): ``compute_metrics(image_tensor, image_path, soft_labels)``
(line 495) requires ``soft_labels`` in mode S (line 499) and uses them only with ``image_tensor``:
``_compute_soft_label_metrics`` builds ``TensorDataset(image_tensor, soft_labels)`` (lines 334-340), while an
``image_path`` is read with ``ImageFolder`` and its hard labels (line 338), the soft labels dropped. They are
teacher logits, one row per image of ``image_tensor`` (its own random-set labels are the teacher's raw outputs,
lines 444-456), softened by the loss's own temperature (``loss/kl.py`` lines 12-15); the hard-label runs on the
same ``image_tensor`` label it in blocks of ``ipc`` by class index (lines 504-505).
"""
from __future__ import annotations

import json
from pathlib import Path

from vlcp.evaluation.protocols import EvalError


def mode_s_labels(out: Path, dataset: str, vlcp_classes: list[str], name: str | None, exported: list[Path],
                  order: list[str]):
    """(a float32 [N, C] tensor: the ``image_logits`` of ``out``'s soft labels ``name`` (``vlcp relabel``; its only
    ones when None), row i = ``exported[i]``, column j = DD-Ranking's class ``order[j]``; their record), or None
    when none is named and ``out`` has none or several (the export says which to name). Checked as ``vlcp evaluate --soft-labels`` checks them (``load_soft_labels``: the
    file's sha256, the classes, the image list, each image's sha256): EvalError for labels of other images."""
    from safetensors import safe_open

    from vlcp.data.datasets import KNOWN, ClassInfo, Dataset
    from vlcp.evaluation import relabel as rl

    if name is None and len(rl.soft_label_names(out)) != 1:  # none, or several and none named: the set alone
        return None
    names = dict(getattr(KNOWN.get(dataset), "classes", None) or ())
    ds = Dataset(dataset, "train", None, [ClassInfo(c, names.get(c, c)) for c in vlcp_classes], [])
    name = rl.load_soft_labels(out, name or "", rl.set_samples(out, ds)[0], ds).record["name"]
    weights, side = rl.soft_paths(out, name)
    meta = json.loads(side.read_text())
    if "image_logits" not in (meta["labels"].get("tensors") or []):
        raise EvalError(f"soft labels {name!r} have no image_logits: rerun vlcp relabel {out} --name {name} --force")
    row_of = {r: i for i, r in enumerate(meta["images"])}
    rel = [rl.relative(p, out) for p in exported]
    if any(r not in row_of for r in rel):
        raise EvalError(f"{next(r for r in rel if r not in row_of)} has no soft label in {name!r}: rerun vlcp "
                        f"relabel {out} --name {name} --force")
    if sorted(meta["classes"]) != sorted(order):
        raise EvalError(f"soft labels {name!r} are over the classes {meta['classes'][:3]}...; DD-Ranking's {order[:3]}...")
    cols = [meta["classes"].index(c) for c in order]
    with safe_open(str(weights), "numpy") as f:
        logits = f.get_tensor("image_logits").astype("float32")
    import torch

    return torch.from_numpy(logits[[row_of[r] for r in rel]][:, cols].copy()), {
        "file": "soft_labels.pt", "name": name, "sha256": meta["sha256"], "shape": [len(rel), len(cols)],
        "columns": cols, "temperature": meta.get("temperature")}


def readme_lines(record: dict) -> list[str]:
    """The export README's soft-label paragraph: the file and how DD-Ranking takes it, or which to name."""
    sl = record.get("soft_labels")
    if not sl:
        choices = record.get("soft_label_choices")
        return [f"Soft labels (`soft_label_mode: S`): OUT has several ({', '.join(choices)}); export again with "
                "`--soft-labels NAME` to write one as `soft_labels.pt`.", ""] if choices else []
    n, c = sl["shape"]
    return [f"Soft labels (`soft_label_mode: S`): `{sl['file']}`, float32 [{n}, {c}], the teacher logits of "
            f"vlcp's soft labels `{sl['name']}` (`vlcp relabel`): row i = image i of `ImageFolder(\"train\")`, "
            f"column j = DD-Ranking's class j (vlcp's column {sl['columns']}). DD-Ranking uses them only with "
            "`image_tensor` (with `image_path` its `ImageFolder` gives hard labels), so pass "
            f"`soft_labels=torch.load(\"{sl['file']}\", weights_only=True)` and `image_tensor=torch.stack([x for "
            "x, _ in ImageFolder(\"train\", transform=T)])`, T resizing, `ToTensor` and `Normalize` as its "
            "`custom_train_trans` would; the random baseline is still labelled by the teacher."
            + ("" if all(k["images"] == record["ipc"] for k in record["classes"]) else
               " Its hard labels of `image_tensor` are `ipc`-long blocks: each class needs exactly `ipc` images."),
            ""]
