"""What the cache buys: a cold run, then reruns that change one thing, on digits with --tiny.

    python benchmarks/rerun.py [--ipc 10] [--steps 50]

Each run is a separate `python -m vlcp` process (start-up and imports included), sharing one fresh
cache. Prints wall time, the ratio to the cold run, and which stages computed / loaded a model.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cache: Path, out: Path, args: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "vlcp", "--cache-dir", str(cache), "-q", "distill", "--data", "digits", "--tiny",
           "--force", "--out", str(out), *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0, json.loads((out / "manifest.json").read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args()
    base = ["--ipc", str(a.ipc), "--steps", str(a.steps)]
    cases = [("cold run", base), ("--ipc changed", ["--ipc", str(a.ipc - 1), "--steps", str(a.steps)]),
             ("--beta changed", base + ["--beta", "0.5"]), ("--strength changed", base + ["--strength", "0.6"]),
             ("identical rerun", base)]
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        rows, cold = [], None
        for name, args in cases:
            t, m = run(cache, out, args)
            cold = cold or t
            computed = [f"{s}({r['items_computed']})" for s, r in m["stages"].items()
                        if r["items_computed"] and s != "output"]
            loaded = [s for s, r in m["stages"].items() if r["model_loaded"]]
            rows.append((name, f"{t:.1f}", f"{t / cold:.3f}", " ".join(computed) or "-", " ".join(loaded) or "-"))
    head = ("case", "seconds", "vs cold", "stages computed (items)", "models loaded")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    print(f"digits --tiny, IPC {a.ipc}, {a.steps} steps, 1438 training images")
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
