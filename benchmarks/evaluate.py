"""The `dc` protocol on Fashion-MNIST: random real images at IPC 1/10/50, 3 seeds each.

    sudo apt-get install dataset-fashion-mnist      # Debian's copy: /usr/share/datasets/fashion-mnist
    python benchmarks/evaluate.py [--aug dsa|none] [--epochs N] [--ipcs 1 10 50] [--seeds 3]

Runs `vlcp baseline --method random` then `vlcp evaluate --protocol dc` for each IPC, in one cache,
and prints a table next to the Random column of the DC paper (Zhao et al., ICLR 2021, Table 1).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# DC paper, Table 1, "Random" selection on FashionMNIST (ConvNet, mean ± std)
PUBLISHED = {1: "51.4 ± 3.8", 10: "73.8 ± 0.7", 50: "82.5 ± 0.7"}


def vlcp(*args):
    subprocess.run([sys.executable, "-m", "vlcp", "-q", *map(str, args)], check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--aug", default="dsa", choices=["dsa", "none"])
    ap.add_argument("--epochs", type=int, help="default: the protocol's (1000 with DSA, 300 without)")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for ipc in a.ipcs:
            out = tmp / f"random-{ipc}"
            vlcp("--cache-dir", tmp / "cache", "baseline", "--method", "random", "--data", "fashion-mnist",
                 "--ipc", ipc, "--out", out)
            extra = ["--epochs", a.epochs] if a.epochs else []
            t0 = time.perf_counter()
            vlcp("--cache-dir", tmp / "cache", "evaluate", out, "--data", "fashion-mnist", "--protocol", "dc",
                 "--aug", a.aug, "--seeds", a.seeds, "--json", tmp / "r.json", *extra)
            r = json.loads((tmp / "r.json").read_text())
            acc = r["accuracy"]
            rows.append((str(ipc), f"{acc['mean']:.1f} ± {acc['std']:.1f}", " ".join(f"{v:.1f}" for v in acc["per_seed"]),
                         PUBLISHED.get(ipc, "-"), str(r["protocol"]["epochs"]), f"{time.perf_counter() - t0:.0f}"))
            print("  ".join(rows[-1]), flush=True)
    head = ("IPC", "vlcp random (final epoch)", "per seed", "DC paper random", "epochs", "seconds")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print(f"\nFashion-MNIST, dc protocol, ConvNet-3, aug={a.aug}, {a.seeds} seeds (selection seed 0)")
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
