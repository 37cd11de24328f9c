"""``vlcp evaluate``: train a network on a distilled set (or the full real set) under a protocol, test it
on the real test split, and record the result next to the set. Protocols: ``protocols.py``; the loop:
``training.py``. The headline figure is the accuracy after the last epoch; the protocol's own "best"
figure (model selection on the test set, which both reference scripts report) is in its own column.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vlcp.data.datasets import Dataset
from vlcp.evaluation.protocols import (
    DEFAULT_SOURCE,
    Protocol,
    default_protocol,
    make_protocol,
)
from vlcp.evaluation.samples import (
    check_dataset,
    load_test,
    set_classes,
    synthetic_samples,
    test_for,
    test_tensors,
    tested_classes,
    train_tensors,
)
from vlcp.evaluation.teacher import teacher_net
from vlcp.evaluation.training import best_label, summarise, train


@dataclass
class EvalConfig:
    """One ``vlcp evaluate`` call: what to train on, under which protocol, with which overrides."""
    data: str
    synth_dir: str | None = None
    full: bool = False
    data_dir: str = "data"
    protocol: str | None = None
    model: str | None = None
    seeds: int = 3
    epochs: int | None = None
    ipc: int | None = None
    aug: str | None = None
    device: str = "auto"
    teacher: str | None = None
    teacher_epochs: int | None = None
    test_every: int | None = None
    progress: bool = True
    caption_fusion: bool = False  # also the separate caption-concatenation row (vlcp.evaluation.caption_fusion)
    captioner: str | None = None  # --caption-fusion: captioner of the images without a prompt, and of the test set
    clip: str | None = None  # --caption-fusion: the text encoder
    tiny: bool = False  # --caption-fusion: the tiny LLaVA and tiny CLIP
    fusion_prompt: str | None = None  # --caption-fusion: the class-agnostic caption prompt
    soft_labels: str | None = None  # stored soft labels of SYNTH_DIR ("": its only ones; vlcp.evaluation.relabel)


# -- data ---------------------------------------------------------------------------------------
# -- training -----------------------------------------------------------------------------------



def _training_set(cfg: EvalConfig, train_ds: Dataset):
    if cfg.full:
        counts: dict[str, int] = {}
        for s in train_ds.samples:
            folder = train_ds.classes[s.class_idx].folder
            counts[folder] = counts.get(folder, 0) + 1
        return train_ds.samples, counts
    return synthetic_samples(Path(cfg.synth_dir), train_ds, cfg.ipc)


def run(cfg: EvalConfig, cache) -> dict:
    """Evaluate a synthetic ImageFolder (or the full real training set) under one protocol."""
    from vlcp import __version__
    from vlcp.data.datasets import load_dataset
    from vlcp.models.loading import torch_device

    t0 = time.perf_counter()
    train_ds = load_dataset(cfg.data, cfg.data_dir, "train")
    test_ds = load_test(cfg.data, cfg.data_dir)
    check_dataset(test_ds)
    samples, counts = _training_set(cfg, train_ds)
    of = len(train_ds.classes)
    train_ds, samples = set_classes(train_ds, samples)  # a set of a class subset: trained and tested on those
    test_ds = test_for(test_ds, train_ds)
    p = make_protocol(cfg.protocol or default_protocol(cfg.data), cfg.data, min(counts.values()), cfg.model,
                      cfg.epochs, cfg.aug, len(train_ds.classes), test_every=cfg.test_every,
                      teacher_epochs=cfg.teacher_epochs)
    p.sources["name"] = "user (--protocol)" if cfg.protocol else DEFAULT_SOURCE[p.name]
    if cfg.teacher:
        p.teacher, p.sources["teacher"] = str(cfg.teacher), "user (--teacher)"
    dev = torch_device(cfg.device)
    fusion = _fusion_setup(cfg, p, cache, dev)  # models resolved before any training: a missing one fails fast
    soft = None
    if cfg.soft_labels is not None:  # checked against the folder before any image is decoded
        from vlcp.evaluation.relabel import load_soft_labels

        soft = load_soft_labels(cfg.synth_dir, cfg.soft_labels, samples, train_ds)
    x, y = train_tensors(samples, p, cfg.progress)
    test = test_tensors(test_ds.samples, p, cfg.progress)
    tnet, tinfo = None, None
    if p.name == "rded" and soft is None:  # stored soft labels replace the online teacher
        def real():
            return (x, y) if cfg.full else train_tensors(train_ds.samples, p, cfg.progress)

        tnet, tinfo = teacher_net(p, train_ds, real, test, dev, cache, cfg.teacher, cfg.progress)
    runs = []
    for seed in range(cfg.seeds):
        _, res = train(p, (x, y, len(train_ds.classes)), seed, dev, test=test, teacher=tnet, soft=soft,
                       progress=cfg.progress and f"seed {seed}")
        res["seed"] = seed
        res["final_loss"] = round(res["losses"][-1], 4) if res["losses"] else None
        runs.append(res)
    fused = _fused_row(cfg, fusion, cache, (samples, x, y), train_ds, (test_ds, test)) if fusion else None
    return {
        "vlcp_version": __version__, "synthetic": None if cfg.full else str(cfg.synth_dir), "full": cfg.full,
        "dataset": train_ds.identity(), "test_split": tested_classes(test_ds, of),
        "images_per_class": counts, "train_images": len(samples), "protocol": asdict(p),
        "best_label": best_label(p.best_after), "device": dev, "teacher": tinfo, "accuracy": summarise(runs),
        **({"soft_labels": soft.record} if soft else {}),
        "seeds": runs, **({"caption_fusion": fused} if fused else {}), "seconds": round(time.perf_counter() - t0, 2),
    }


def _fusion_setup(cfg: EvalConfig, p: Protocol, cache, device: str):
    """``--caption-fusion``'s resolved models (vlcp.evaluation.caption_fusion.prepare), or None without the flag."""
    if not cfg.caption_fusion:
        return None
    from vlcp.evaluation import caption_fusion

    return caption_fusion.prepare(cfg, p, cache, device)


def _fused_row(cfg: EvalConfig, fusion, cache, train: tuple, train_ds: Dataset, test: tuple) -> dict:
    """The caption-fusion row: training images (samples, x, y) with their prompts or captions, the test images
    with their captions; separate from the headline."""
    from vlcp.evaluation import caption_fusion as cf

    samples, x, y = train
    test_ds, (xt, yt) = test
    names = [c.name for c in train_ds.classes]
    tr = cf.Split(samples, x, y, [names[s.class_idx] for s in samples],
                  None if cfg.full else cf.folder_prompts(Path(cfg.synth_dir)))
    te = cf.Split(test_ds.samples, xt, yt, [test_ds.classes[s.class_idx].name for s in test_ds.samples])
    return cf.evaluate_fused(fusion, cache, tr, te, len(train_ds.classes), cfg.seeds, cfg.progress)


def written_by_vlcp(folder: Path) -> bool:
    """True when ``folder/manifest.json`` is a manifest vlcp wrote (distill or baseline)."""
    import json

    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "vlcp_version" in manifest


def evaluation_path(folder: Path, res: dict) -> Path:
    """``FOLDER/evaluations/<protocol>-<model>-<hash of the settings>.json``: one file per distinct setting."""
    from vlcp.store.cache import stable_hash

    p = res["protocol"]
    settings = {"protocol": {k: v for k, v in p.items() if k != "sources"}, "seeds": len(res["seeds"]),
                "images_per_class": res["images_per_class"], "teacher": (res["teacher"] or {}).get("source")}
    if res.get("soft_labels"):  # other stored labels, another file
        settings["soft_labels"] = res["soft_labels"]["sha256"]
    if res.get("caption_fusion"):  # its own file: an evaluation without the flag does not overwrite the row
        settings["caption_fusion"] = {k: res["caption_fusion"][k] for k in ("caption_prompt", "captioner", "clip")}
    return Path(folder) / "evaluations" / f"{p['name']}-{p['model']}-{stable_hash(settings, 10)}.json"


def save_in_folder(folder: Path, res: dict) -> Path | None:
    """Write the results next to a vlcp-made synthetic set (for ``vlcp report``); None for other folders."""
    from vlcp.store.output import write_json

    if not written_by_vlcp(folder):
        return None
    path = evaluation_path(folder, res)
    try:
        path.parent.mkdir(exist_ok=True)
        write_json(path, res)
    except OSError as exc:  # a read-only folder must not cost the evaluation that just ran
        import logging

        logging.getLogger("vlcp").warning("could not save the results in %s: %s", path.parent, exc)
        return None
    return path
