"""DM, DM + threshold masks and DC on Fashion-MNIST, evaluated with the `dc` protocol (ConvNet-3).

    sudo apt-get install dataset-fashion-mnist      # Debian's copy: /usr/share/datasets/fashion-mnist
    python benchmarks/matching.py --cache-dir bench-cache --results bench.json \
        --run dm:10:150 --run dm-threshold:10:150 --run dc:1:50 --seeds 2

Each ``--run NAME:IPC:ITERATIONS`` runs `vlcp baseline --method dm|dc [--masks threshold]` (in one
persistent cache: a later run with more iterations continues from the last checkpoint of a shorter
one) and `vlcp evaluate --protocol dc --aug none` (300 epochs) with ``--seeds`` training seeds.
Every finished row is appended to ``--results`` at once, so a killed benchmark keeps its rows;
``--table`` prints the table of a results file next to the published DC and DSA numbers
(Zhao et al., ICLR 2021, Table 1; Zhao & Bilen, ICML 2021, Table 1).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PUBLISHED = {"DC": {1: "70.5 ± 0.6", 10: "82.3 ± 0.4"}, "DSA": {1: "70.6 ± 0.6", 10: "84.6 ± 0.3"}}
RANDOM = {1: "51.4 ± 3.8", 10: "73.8 ± 0.7"}  # DC paper's random real images
METHODS = {"dm": ["--method", "dm"], "dm-threshold": ["--method", "dm", "--masks", "threshold"],
           "dc": ["--method", "dc"]}


def vlcp(cache: Path, *args) -> None:
    subprocess.run([sys.executable, "-m", "vlcp", "-q", "--cache-dir", str(cache), *map(str, args)], check=True)


def run_one(spec: str, a, tmp: Path) -> dict:
    name, ipc, iters = spec.split(":")
    out = tmp / f"{name}-{ipc}-{iters}"
    t0 = time.perf_counter()
    vlcp(a.cache_dir, "baseline", *METHODS[name], "--data", "fashion-mnist", "--ipc", ipc, "--iterations", iters,
         "--out", out, "--checkpoint-every", a.checkpoint_every, *a.extra.split())
    opt_s = time.perf_counter() - t0
    m = json.loads((out / "manifest.json").read_text())["matching"]
    t0 = time.perf_counter()
    vlcp(a.cache_dir, "evaluate", out, "--data", "fashion-mnist", "--protocol", "dc", "--aug", "none",
         "--seeds", a.seeds, "--json", tmp / "r.json")
    r = json.loads((tmp / "r.json").read_text())
    return {"run": name, "ipc": int(ipc), "iterations": int(iters), "accuracy": r["accuracy"],
            "optimise_seconds": round(opt_s, 1), "seconds_per_iteration": m["seconds_per_iteration"],
            "resumed_from": m["resumed_from"], "cached": m["cached"], "final_loss": m["final_loss"],
            "batch_real": m["config"]["batch_real"], "masks": m["masks"],
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "epochs": r["protocol"]["epochs"]}


def table(rows: list[dict]) -> None:
    head = ("method", "IPC", "iterations", "vlcp (final epoch)", "per seed", "DC paper", "DSA paper",
            "random (DC paper)", "s/iteration")
    lines = [head]
    for r in rows:
        acc = r["accuracy"]
        lines.append((r["run"], str(r["ipc"]), str(r["iterations"]), f"{acc['mean']:.1f} ± {acc['std']:.1f}",
                      " ".join(f"{v:.1f}" for v in acc["per_seed"]), PUBLISHED["DC"].get(r["ipc"], "-"),
                      PUBLISHED["DSA"].get(r["ipc"], "-"), RANDOM.get(r["ipc"], "-"),
                      f"{r['seconds_per_iteration']:.2f}"))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    print("Fashion-MNIST, ConvNet-3, dc protocol --aug none (300 epochs), 2 shared CPU cores")
    for x in lines:
        print("  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", default=[], help="NAME:IPC:ITERATIONS, NAME in " + ", ".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=Path("bench-cache"))
    ap.add_argument("--results", type=Path, default=Path("bench-matching.json"))
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--extra", default="", help="more `vlcp baseline` options, e.g. '--batch-real 128'")
    ap.add_argument("--table", action="store_true", help="only print the table of --results")
    a = ap.parse_args()
    rows = json.loads(a.results.read_text()) if a.results.exists() else []
    if not a.table:
        with tempfile.TemporaryDirectory() as tmp:
            for spec in a.run:
                rows.append(run_one(spec, a, Path(tmp)))
                a.results.write_text(json.dumps(rows, indent=2) + "\n")
                print(json.dumps(rows[-1]), flush=True)
    table(rows)


if __name__ == "__main__":
    main()
