"""Issue 12: what the per-item stages cost at scale, cached or not, with one process and with two.

    nice -n 10 python benchmarks/scale.py [--classes 1000] [--per-class 20] [--px 32] [--nproc 2]

Builds a synthetic ImageFolder (``classes`` x ``per_class`` random PNGs of ``px`` x ``px``, seed 0),
then, each as a separate ``python -m vlcp`` process with ``--tiny`` models (built once beforehand and
copied into every fresh cache, so no row pays for them):
  1. cold ``--until latents`` with one process;
  2. the fully cached rerun of it, and the per-item cost of a cached lookup measured in-process
     (``StageCache.get`` of every latent key: index record, metadata checksum, one ``stat``, no blob);
  3. a cached ``--until clusters`` (outliers and clusters computed on the cached latents);
  4. cold ``--until latents`` with ``--nproc`` processes through ``torchrun`` on a fresh cache.
Peak RSS is the largest resident set of the process tree (``wait4``), start-up and imports included.
"""
import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_folder(root: Path, classes: int, per_class: int, px: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"c{c:04d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            noise = rng.integers(-40, 41, size=(px, px, 3))
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.png")


def run(cmd: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) of the whole process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss // 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lookup_cost(cache_dir: Path) -> tuple[int, float, float]:
    """(latent entries, microseconds per get, microseconds per has), in this process."""
    from vlcp.cache import StageCache

    c = StageCache(cache_dir)
    keys = [k.split("/", 1)[1] for k in c.index.iterkeys() if k.startswith("latents/")]
    t0 = time.perf_counter()
    assert all(c.get("latents", k) is not None for k in keys)
    t_get = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert all(c.has("latents", k) for k in keys)
    t_has = time.perf_counter() - t0
    assert c.blob_reads == 0
    return len(keys), 1e6 * t_get / len(keys), 1e6 * t_has / len(keys)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--px", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    tmp = a.keep or Path(tempfile.mkdtemp(prefix="vlcp-scale-"))
    data, models = tmp / "data", tmp / "models"
    if not data.exists():
        build_folder(data, a.classes, a.per_class, a.px)
    from vlcp.tiny import tiny_models

    tiny_models(models)

    def distill(cache: Path, until: str, nproc: int = 1) -> tuple[float, int, dict]:
        if not (cache / "models").exists():
            shutil.copytree(models, cache / "models")
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(free_port()), "-m", "vlcp"] if nproc > 1 else [sys.executable, "-m", "vlcp"])
        out = tmp / f"out-{until}-{nproc}"
        t, rss = run([*launch, "--cache-dir", str(cache), "-q", "distill", "--data", str(data), "--tiny", "--ipc", "1",
                      "--no-finetune", "--until", until, "--force", "--out", str(out)], env)
        return t, rss, json.loads((out / "manifest.json").read_text())["stages"]

    n = a.classes * a.per_class
    rows = []
    t_cold, rss, st = distill(tmp / "cache1", "latents")
    assert st["latents"]["items_computed"] == n, st["latents"]
    rows.append(("cold --until latents, 1 process", t_cold, rss))
    t_warm, rss, st = distill(tmp / "cache1", "latents")
    assert st["latents"]["items_computed"] == 0 and st["captions"]["items_computed"] == 0
    rows.append(("cached rerun --until latents, 1 process", t_warm, rss))
    entries, us_get, us_has = lookup_cost(tmp / "cache1")
    t_cl, rss, st = distill(tmp / "cache1", "clusters")
    rows.append(("--until clusters on cached latents, 1 process", t_cl, rss))
    if a.nproc > 1:
        t_par, rss, st = distill(tmp / f"cache{a.nproc}", "latents", a.nproc)
        rows.append((f"cold --until latents, {a.nproc} processes (torchrun)", t_par, rss))

    print(f"{a.classes} classes x {a.per_class} PNGs ({a.px} px) = {n} images, --tiny; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| run | seconds | peak RSS (MiB) |\n|---|---:|---:|")
    for name, t, r in rows:
        print(f"| {name} | {t:.1f} | {r} |")
    print(f"\ncached lookup, in-process over {entries} latents: get {us_get:.0f} us/item, has {us_has:.0f} us/item, "
          f"0 blobs read")
    if a.nproc > 1:
        print(f"{a.nproc} processes vs 1 (cold, per-item stages): {t_cold / t_par:.2f}x")
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
