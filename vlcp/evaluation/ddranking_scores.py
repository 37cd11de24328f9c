"""``vlcp ddranking``: DD-Ranking's scores of a synthetic set, with vlcp's own evaluation producing the accuracies.

Per run (seed ``i``, and a fresh random real subset of the set's IPC drawn with seed ``i``, as DD-Ranking draws
one per evaluation run) it trains vlcp's protocol network on the synthetic set and on the random subset:

- hard labels (plain cross-entropy) with the protocol's augmentation ("hard-aug") and without ("hard");
- soft labels (the teacher's, KL as ``--protocol rded`` trains: ``training.kd_loss``) with ("soft-aug") and
  without ("soft-naug") augmentation;

and once (seed 0) on the full real training set with hard labels and no augmentation (DD-Ranking's real-data
training has no augmentation either). The scores (``ddranking.lrs`` / ``ddranking.ars``) are then:

- ``lrs-hard``: HLR = full - syn(hard-aug), IOR = syn(hard-aug) - rdm(hard-aug) (metrics/hard_label.py: the
  synthetic and random sets train with the augmentation, the real set without);
- ``lrs-soft``: HLR = full - syn(hard), IOR = syn(soft-aug) - rdm(soft-aug) (metrics/soft_label.py with its
  default ``use_aug_for_hard: false``);
- ``ars``: syn(soft-aug) - rdm(soft-aug) and syn(soft-naug) - rdm(soft-naug) (metrics/aug_robust.py, soft labels).

Where it differs from ddranking 0.2.0 (docs/evaluation.md says the same): the accuracy is vlcp's headline, the
test accuracy after the last epoch, not the best of tests every 10/20 epochs; the learning rate is the
protocol's, not the best of DD-Ranking's search over 0.001-0.1; the full-data accuracy is trained once.
Each accuracy is memoised in the cache (keyed by the training set's content, the protocol, the seed and the
teacher), so a rerun with more runs or another score trains only what is new.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from vlcp.evaluation.ddranking import ars, lrs
from vlcp.evaluation.protocols import EvalError, Protocol

SCORES = ("lrs-hard", "lrs-soft", "ars")
NEEDS = {"lrs-hard": ("syn-hard-aug", "rdm-hard-aug", "full-hard"),
         "lrs-soft": ("full-hard", "syn-hard", "syn-soft-aug", "rdm-soft-aug"),
         "ars": ("syn-soft-aug", "rdm-soft-aug", "syn-soft-naug", "rdm-soft-naug")}
MEMO_VERSION = 1
USER_FULL = "user (--full-accuracy)"  # full_accuracy.source of a value the user gave


@dataclass
class ScoreConfig:
    """One ``vlcp ddranking`` call."""
    out: str
    data: str
    data_dir: str = "data"
    protocol: str = "rded"
    model: str | None = None
    runs: int = 5
    epochs: int | None = None
    full_epochs: int | None = None  # epochs on the full real set [default: the protocol's]
    full_accuracy: float | None = None  # percent: a known full-data accuracy instead of training on the full set
    ipc: int | None = None
    scores: tuple[str, ...] = SCORES
    lrs_weight: float = 0.5  # DD-Ranking's lrs_lambda (w)
    ars_weight: float = 0.5  # DD-Ranking's ars_lambda (gamma)
    teacher: str | None = None
    teacher_epochs: int | None = None
    device: str = "auto"
    progress: bool = True


def variants(p: Protocol) -> dict[str, tuple[Protocol, bool]]:
    """name -> (protocol, trains on the teacher's soft labels)."""
    ce = replace(p, kd_temperature=0.0)
    bare = {"aug": "none", "mix": "torchvision", "cutmix": 0.0, "mixup": 0.0, "no_grad_forward": False}
    return {"hard-aug": (ce, False), "hard": (replace(ce, **bare), False), "soft-aug": (p, True),
            "soft-naug": (replace(p, **bare), True)}


def random_subset(labels: np.ndarray, ipc: int, seed: int) -> list[int]:
    """``ipc`` indices per class, drawn without replacement with ``seed`` (sorted within each class)."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < ipc:
            raise EvalError(f"class {c} has {len(idx)} real training images, fewer than the set's IPC {ipc}")
        out += sorted(int(i) for i in rng.choice(idx, ipc, replace=False))
    return out


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _summary(values: list[float], scale: float = 100.0) -> dict:
    """mean and population std (``np.std``, as DD-Ranking) of per-run values, times ``scale``."""
    v = np.array(values, dtype=float) * scale
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4),
            "per_run": [round(float(x), 4) for x in v]}


def scores_of(runs: list[dict[str, float]], which, lrs_weight: float, ars_weight: float) -> dict:
    """The scores of each run's accuracies (fractions), summarised: HLR/IOR/differences in percentage points,
    LRS/ARS in percent of their [0, 1] range."""
    out = {}
    for s in which:
        if s == "ars":
            per = [ars(a["syn-soft-aug"], a["rdm-soft-aug"], a["syn-soft-naug"], a["rdm-soft-naug"], ars_weight)
                   for a in runs]
        elif s == "lrs-hard":  # the synthetic set's hard-label accuracy is both HLR's and IOR's
            per = [lrs(a["full-hard"], a["syn-hard-aug"], a["syn-hard-aug"], a["rdm-hard-aug"], lrs_weight)
                   for a in runs]
        else:
            per = [lrs(a["full-hard"], a["syn-hard"], a["syn-soft-aug"], a["rdm-soft-aug"], lrs_weight) for a in runs]
        out[s] = {k: _summary([r[k] for r in per]) for k in per[0]}
    return out


@dataclass
class _Trainings:
    """The final test accuracy (fraction) of one training of ``run``, memoised in the cache; counts what it
    trained and what it found (``trained``: {"new", "cached"})."""
    cfg: ScoreConfig
    cache: object
    kinds: dict
    base: dict
    n: int
    dev: str
    test: tuple
    tnet: object
    trained: dict = field(default_factory=lambda: {"new": 0, "cached": 0})

    def __call__(self, name: str, seed: int, data_key, data) -> float:
        from vlcp.evaluation.training import train
        from vlcp.store.cache import stable_hash

        cfg, trained = self.cfg, self.trained
        variant, uses_teacher = self.kinds[name.split("-", 1)[1]]
        if name == "full-hard" and cfg.full_epochs:
            variant = replace(variant, epochs=cfg.full_epochs)
        proto = {k: v for k, v in asdict(variant).items() if k != "sources"}
        key = stable_hash({**self.base, "what": name, "protocol": proto, "train": data_key, "seed": seed,
                           "teacher": self.base["teacher"] if uses_teacher else None})

        def compute() -> float:
            trained["new"] += 1
            _, res = train(variant, (*data(), self.n), seed, self.dev, test=self.test,
                           teacher=self.tnet if uses_teacher else None,
                           progress=cfg.progress and f"{name} run {seed}", curve=f"ddranking/{name}/run{seed}")
            return float(res["accuracy"])

        before = trained["new"]
        value = self.cache.memo("ddranking", key, compute)
        trained["cached"] += trained["new"] == before
        return float(value)


def run(cfg: ScoreConfig, cache) -> dict:
    """Train what the requested scores need, ``cfg.runs`` times, and score it."""
    from vlcp.data.datasets import load_dataset
    from vlcp.evaluation.protocols import make_protocol
    from vlcp.evaluation.samples import (
        check_dataset,
        load_test,
        synthetic_samples,
        test_for,
        test_tensors,
        train_tensors,
    )
    from vlcp.evaluation.teacher import teacher_net
    from vlcp.models.loading import torch_device
    from vlcp.store.cache import stable_hash

    t0 = time.perf_counter()
    unknown = [s for s in cfg.scores if s not in SCORES]
    if unknown:
        raise EvalError(f"unknown score {unknown[0]!r}; known: {', '.join(SCORES)}")
    train_ds, test_ds = load_dataset(cfg.data, cfg.data_dir, "train"), load_test(cfg.data, cfg.data_dir)
    check_dataset(test_ds)
    samples, counts = synthetic_samples(Path(cfg.out), train_ds, cfg.ipc)
    held = {s.class_idx for s in samples}
    if len(held) < len(train_ds.classes):  # the real subsets and the full set would be of other classes than it
        missing = [c.folder for i, c in enumerate(train_ds.classes) if i not in held]
        raise EvalError(f"{train_ds.name} has {len(train_ds.classes)} classes; the set lacks "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: DD-Ranking's scores compare "
                        "it with random real images and the full real set of every class (vlcp evaluate tests a "
                        "set of a class subset on its own classes)")
    test_ds = test_for(test_ds, train_ds)
    ipc, n = min(counts.values()), len(train_ds.classes)
    p = make_protocol(cfg.protocol, cfg.data, ipc, cfg.model, cfg.epochs, None, n, teacher_epochs=cfg.teacher_epochs)
    soft = any(s != "lrs-hard" for s in cfg.scores)
    if soft and not p.kd_temperature:
        raise EvalError(f"lrs-soft and ars train on a teacher's soft labels: --protocol rded, not {p.name}")
    dev = torch_device(cfg.device)
    syn = train_tensors(samples, p, cfg.progress)
    test = test_tensors(test_ds.samples, p, cfg.progress)
    real_labels = np.array([s.class_idx for s in train_ds.samples])
    tnet, tinfo = None, None
    if soft:
        tnet, tinfo = teacher_net(p, train_ds, lambda: train_tensors(train_ds.samples, p, cfg.progress), test, dev,
                                  cache, cfg.teacher, cfg.progress)
    base = {"v": MEMO_VERSION, "test": test_ds.identity()["digest"], "classes": n,
            "teacher": {k: (tinfo or {}).get(k) for k in ("source", "key", "sha256")}}
    accuracy = _Trainings(cfg, cache, variants(p), base, n, dev, test, tnet)

    needed = [k for s in cfg.scores for k in NEEDS[s]]
    needed = [k for i, k in enumerate(needed) if k not in needed[:i]]
    full = None
    if "full-hard" in needed:
        full = cfg.full_accuracy / 100 if cfg.full_accuracy is not None else accuracy(
            "full-hard", 0, {"dataset": train_ds.identity()["digest"]},
            lambda: train_tensors(train_ds.samples, p, cfg.progress))
    syn_key = _digest(*syn)
    runs = []
    for i in range(cfg.runs):
        chosen = random_subset(real_labels, ipc, i)
        rdm: list = []

        def rdm_data():
            if not rdm:
                rdm.append(train_tensors([train_ds.samples[j] for j in chosen], p, False))
            return rdm[0]

        rdm_key = {"dataset": train_ds.identity()["digest"], "indices": stable_hash(chosen)}
        accs = {"full-hard": full} if full is not None else {}
        for name in needed:
            if name.startswith("syn-"):
                accs[name] = accuracy(name, i, syn_key, lambda: syn)
            elif name.startswith("rdm-"):
                accs[name] = accuracy(name, i, rdm_key, rdm_data)
        runs.append(accs)
    return _record(cfg, p, train_ds, test_ds, counts, ipc, dev, tinfo, full, runs, accuracy.trained, t0)


def _record(cfg: ScoreConfig, p: Protocol, train_ds, test_ds, counts: dict, ipc: int, dev: str, tinfo: dict | None,
            full: float | None, runs: list[dict], trained: dict, t0: float) -> dict:
    """What ``vlcp ddranking`` saves: the setting, every accuracy (percent) and the scores."""
    from vlcp import __version__

    full_source = None if full is None else USER_FULL if cfg.full_accuracy is not None else \
        f"vlcp: trained once (seed 0), {cfg.full_epochs or p.epochs} epochs, hard labels, no augmentation"
    return {
        "kind": "ddranking", "vlcp_version": __version__, "synthetic": str(cfg.out), "dataset": train_ds.identity(),
        "test_split": {"split": test_ds.split, "images": len(test_ds.samples)}, "images_per_class": counts, "ipc": ipc,
        "protocol": asdict(p), "device": dev, "teacher": tinfo, "runs": cfg.runs,
        "weights": {"lrs": cfg.lrs_weight, "ars": cfg.ars_weight},
        "full_accuracy": {"value": None if full is None else round(full * 100, 4), "source": full_source},
        "accuracies": [{k: round(v * 100, 4) for k, v in a.items()} for a in runs],
        "scores": scores_of(runs, cfg.scores, cfg.lrs_weight, cfg.ars_weight),
        "units": "accuracies, hlr, ior, with_aug, without_aug, alpha, beta: percentage points (scores computed on "
                 "fractions); lrs, ars: percent of their [0, 1] range",
        "trainings": trained, "seconds": round(time.perf_counter() - t0, 2),
    }


def result_path(folder: Path, res: dict) -> Path:
    """``FOLDER/evaluations/ddranking-<hash of the settings>.json``. A user's ``--full-accuracy`` is a setting
    by its value (as recorded, percent to 4 decimals): 80 and 90 are two results, 80 again the same file. The
    full-data accuracy vlcp trains is named by its source, which holds its epochs (the name files of that
    path always had); the value it reached is a result, not a setting."""
    from vlcp.store.cache import stable_hash

    full = res["full_accuracy"]
    settings = {"protocol": {k: v for k, v in res["protocol"].items() if k != "sources"}, "runs": res["runs"],
                "images_per_class": res["images_per_class"], "scores": sorted(res["scores"]),
                "weights": res["weights"], "teacher": (res["teacher"] or {}).get("source"),
                "full": [full["source"], full["value"]] if full["source"] == USER_FULL else full["source"]}
    return Path(folder) / "evaluations" / f"ddranking-{stable_hash(settings, 10)}.json"
