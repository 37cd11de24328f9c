"""Algorithm 2 at ImageNet-1K scale: 1000 classes x 1281 captions of ~60 words, IPC 10.

    python benchmarks/text_prototypes.py [--classes 1000] [--per-class 1281] [--ipc 10]

Captions are synthetic (words drawn from a 3000-word vocabulary with a Zipf-like law, as real
captions are): the point is the cost of tokenising, counting and scoring, not the text. The digest of
every record (picks, scores, R_w, N) shows that a faster implementation chooses the same captions.
"""
import argparse
import hashlib
import json
import os
import time

import numpy as np

from vlcp.method.text_prototypes import class_prototypes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=1281)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--words", type=int, default=60)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = np.array(["w" + letters[i // 676] + letters[i // 26 % 26] + letters[i % 26] for i in range(3000)])
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    t0 = time.perf_counter()
    classes = []
    for _ in range(a.classes):
        ids = rng.choice(len(vocab), size=(a.per_class, a.words), p=p)
        classes.append([" ".join(row) for row in vocab[ids]])
    t_gen = time.perf_counter() - t0
    import sklearn.feature_extraction.text  # noqa: F401  (import cost is paid once per run, not per class)

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    records = []
    for caps in classes:
        labels = rng.integers(0, a.ipc, len(caps))
        members = [list(np.flatnonzero(labels == c)) for c in range(a.ipc)]
        records.append(class_prototypes(caps, members, "some class name", beta=0.2, top_k=35))
    t = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps(records, default=int).encode()).hexdigest()[:16]
    n = a.classes * a.per_class
    print(f"captions: {n:,} ({a.classes} classes x {a.per_class}), {a.words} words each; IPC {a.ipc}")
    print(f"generating the captions: {t_gen:.1f} s (not part of vlcp)")
    print(f"text prototypes: {t:.1f} s total, {t / a.classes * 1000:.1f} ms per class, {n / t:,.0f} captions/s")
    print(f"records digest: {digest}; {os.cpu_count()} CPUs, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
