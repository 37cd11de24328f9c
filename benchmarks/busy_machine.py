"""The README's main job on a busy machine: quiet vs one busy neighbour, before vs after the thread fix.

    python benchmarks/busy_machine.py [--workdir DIR] [--cap SECONDS] [--max-per-class N] [--repeat N]

Cold runs of ``python -m vlcp -q --cache-dir C distill --data digits --ipc 10 --tiny --out O``, each a
fresh process with a fresh cache (the tiny models, built once beforehand, copied in), in this order:
quiet before, quiet after, busy after, busy before. "before" is ``VLCP_SPIN_WAIT=1``: the libraries'
spinning waits, as vlcp ran until issue 26; "after" is vlcp's passive wait (``vlcp/cli/threads.py``).
"busy" is one other process spinning in a Python loop (``while True: pass``), started by this script
for the length of the run and stopped after it. Every run gets the environment without its OMP_*,
KMP_*, GOMP_* and MKL_* settings, so both variants run at torch's default thread count. A run longer
than --cap seconds is stopped and reported as ">= cap".

Prints, per run: seconds, ratio to the quiet run of the same variant, the seconds of the identical rerun
that follows it (``--force``, same conditions: the README's rerun), the 1-minute load average at its start
and end, and whether its PNGs (images, preview, loss plot) are byte-identical to the quiet "before" run's. The goal of issue
26: busy after <= 2x quiet after, with identical PNGs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREAD_VARS = ("OMP_", "KMP_", "GOMP_", "MKL_", "VLCP_SPIN_WAIT")


VARIANTS = {"before": {"VLCP_SPIN_WAIT": "1"}, "after": {}}


def child_env(variant: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(THREAD_VARS)}
    return {**env, **VARIANTS[variant]}


def pngs(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.png"))}


def run(work: Path, models: Path, name: str, variant: str, busy: bool, cap: float, extra: list[str]) -> dict:
    cache, out = work / f"cache-{name}", work / f"out-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(models, cache / "models")
    cmd = [sys.executable, "-m", "vlcp", "-q", "--cache-dir", str(cache), "distill", "--data", "digits", "--ipc",
           "10", "--tiny", "--out", str(out), *extra]
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    rerun = None
    try:
        proc = subprocess.run(cmd, env=child_env(variant), capture_output=True, text=True, timeout=cap)
        rc, seconds = proc.returncode, time.perf_counter() - t0
        if rc:
            print(proc.stderr[-2000:], file=sys.stderr)
        else:  # the README's identical rerun (--force: OUT exists), in the same conditions
            t1 = time.perf_counter()
            again = subprocess.run([*cmd, "--force"], env=child_env(variant), capture_output=True, timeout=cap)
            rerun = time.perf_counter() - t1 if again.returncode == 0 else None
    except subprocess.TimeoutExpired:
        rc, seconds = None, cap
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    load1 = os.getloadavg()[0]
    files = pngs(out) if rc == 0 else {}
    shutil.rmtree(cache, ignore_errors=True)
    return {"name": name, "variant": variant, "busy": busy, "rc": rc, "seconds": seconds, "load": (load0, load1),
            "pngs": files, "rerun": rerun}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, help="Where caches and outputs go [default: a temporary folder].")
    ap.add_argument("--cap", type=float, default=1200, help="Stop a run after this many seconds.")
    ap.add_argument("--max-per-class", type=int, help="A smaller job (not the README's): N images per class.")
    ap.add_argument("--repeat", type=int, default=1, help="Run the four cases this many times.")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE,...",
                    help="Also compare this environment (quiet, then busy), e.g. t1:OMP_NUM_THREADS=1,VLCP_SPIN_WAIT=1.")
    args = ap.parse_args()
    for spec in args.variant:
        name, _, assignments = spec.partition(":")
        VARIANTS[name] = dict(a.split("=", 1) for a in assignments.split(",") if a)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlcp-busy-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = ["--max-per-class", str(args.max_per_class)] if args.max_per_class else []
    models = work / "models"
    if not models.exists():
        from vlcp.models.tiny import tiny_models

        tiny_models(models)
    print(f"CPUs: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))}); python {sys.version.split()[0]}; "
          f"job: distill --data digits --ipc 10 --tiny {' '.join(extra)}".rstrip(), flush=True)
    print(f"{'case':<14} {'seconds':>8} {'vs quiet':>9} {'rerun s':>8} {'load 1 min':>13}  PNGs vs quiet before",
          flush=True)
    results = []
    extra_names = [v for v in VARIANTS if v not in ("before", "after")]
    cases = [("quiet-before", "before", False), ("quiet-after", "after", False),
             *((f"quiet-{v}", v, False) for v in extra_names), ("busy-after", "after", True),
             *((f"busy-{v}", v, True) for v in extra_names), ("busy-before", "before", True)]
    for _ in range(args.repeat):
        for name, variant, busy in cases:
            r = run(work, models, name, variant, busy, args.cap, extra)
            results.append(r)
            quiet = next((q for q in results if q["variant"] == variant and not q["busy"] and q["rc"] == 0), None)
            ref = next((q for q in results if q["name"] == "quiet-before" and q["rc"] == 0), None)
            ratio = f"{r['seconds'] / quiet['seconds']:.2f}x" if quiet else "-"
            same = ("stopped" if r["rc"] is None else f"failed ({r['rc']})" if r["rc"] else
                    "identical" if ref and r["pngs"] == ref["pngs"] else "DIFFERENT")
            secs = f">={r['seconds']:.0f}" if r["rc"] is None else f"{r['seconds']:.1f}"
            rerun = f"{r['rerun']:.1f}" if r["rerun"] is not None else "-"
            print(f"{name:<14} {secs:>8} {ratio:>9} {rerun:>8} {r['load'][0]:>6.2f}->{r['load'][1]:<5.2f}  "
                  f"{same} ({len(r['pngs'])} PNGs)", flush=True)
    after_q = [r["seconds"] for r in results if r["name"] == "quiet-after" and r["rc"] == 0]
    after_b = [r["seconds"] for r in results if r["name"] == "busy-after" and r["rc"] == 0]
    if after_q and after_b:
        ratio = max(after_b) / min(after_q)
        print(f"goal (busy after <= 2x quiet after): {ratio:.2f}x, {'met' if ratio <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
