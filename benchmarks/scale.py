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

``--cluster-memory`` measures per-class streaming instead (issue 12 item 1): after a cold ``--until
latents`` at ``--resolution`` (128 px gives the tiny VAE 4x64x64 latents, 64 KiB each like SD v1.5 at
512 px), a fresh process runs the cached stages up to the latents, then the outliers and clusters
stages alone (their entries cleared first, so both compute), and reports its resident set before them
and its peak during each (VmHWM, reset through ``/proc/self/clear_refs`` just before each; sklearn is
imported and warmed up on data of the latents' size before): what the clustering stages add. With
``--synthesis PX`` it goes on through text prototypes, prompts, synthesis and the output's files, the
diffusion call replaced by seeded random PX x PX images: the RSS after synthesis is what the run keeps of
its synthetic images (``vlcp/store/arrays.py``: references, not pixels).
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
    from vlcp.store.cache import StageCache

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


def _vm(field: str) -> int:
    """A VmRSS / VmHWM figure of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_clusters(cache_dir: str, data: str, resolution: int, ipc: int, synthesis_px: int = 0) -> dict:
    """In this process: the cached stages up to the latents, then outliers + clusters with the peak RSS reset
    just before them; with ``synthesis_px`` then text prototypes and prompts, synthesis (stub images of that
    size, computed afresh) and the output's writing. Returns MiB figures and seconds (printed as JSON by
    ``--_measure``)."""
    import gc

    from vlcp.pipeline.config import DistillConfig
    from vlcp.pipeline.loop import _run_stages, start
    from vlcp.pipeline.run import Step
    from vlcp.pipeline.table import STAGE_NAMES, STAGES
    from vlcp.store.cache import StageCache

    cfg = DistillConfig(data=data, tiny=True, ipc=ipc, resolution=resolution, finetune=False, until="latents",
                        steps=2, out=Path(cache_dir).parent / "out-memory", progress=False)
    cache = StageCache(cache_dir)
    run = start(cfg, cache)
    _run_stages(run)
    assert all(r.items_computed == 0 for r in run.reports), "the latents must be cached first"
    cache.clear("outliers")  # computed in the window, every time
    cache.clear("clusters")
    import numpy as np  # noqa: F811
    from sklearn.cluster import KMeans
    from sklearn.neighbors import LocalOutlierFactor

    dim = cache.get("latents", run.st.lat_keys[0]).tensors["latent"].size  # a separate entry: not kept
    # sklearn's imports, thread pools and BLAS buffers (about 130 MiB at this size) before the window
    warm = np.random.default_rng(0).normal(size=(12, dim))
    LocalOutlierFactor(n_neighbors=5).fit_predict(warm)
    KMeans(n_clusters=2, random_state=0, n_init=10).fit(warm)
    gc.collect()
    out = {"rss_before_mib": _vm("VmRSS") / 1024, "images": len(run.st.samples), "latent_kib": dim * 4 / 1024}
    reads = cache.blob_reads
    t0 = time.perf_counter()
    for name in ("outliers", "clusters"):
        stage = STAGES[STAGE_NAMES.index(name)]
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
        stage.run(run, Step(run, stage))
        out[f"{name}_peak_mib"] = _vm("VmHWM") / 1024
    out = {**out, "seconds": time.perf_counter() - t0, "blob_reads": cache.blob_reads - reads,
           "rss_after_mib": _vm("VmRSS") / 1024}
    if synthesis_px:
        out.update(measure_synthesis(run, cache, synthesis_px))
    return out


def measure_synthesis(run, cache, px: int) -> dict:
    """After the clusters: text prototypes and prompts, then synthesis and the output's files with the peak
    RSS reset before each and the RSS after synthesis (what the run holds), the synthesis entries cleared
    first. The diffusion call is replaced by seeded random ``px`` x ``px`` images (SD v1.5 makes 512 px): what
    is measured is what the run keeps of its images, not the UNet's activations (the tiny UNet would take
    ~0.4 s an image here)."""
    import tempfile

    from vlcp.method import synthesis
    from vlcp.pipeline.run import Step
    from vlcp.pipeline.table import STAGE_NAMES, STAGES

    synthesis.sample = lambda pipe, lat, prompts, seeds, s: np.stack(
        [np.random.default_rng(seed).integers(0, 256, (px, px, 3), np.uint8) for seed in seeds])
    cache.clear("synthesis")
    for name in ("text_prototypes", "prompts"):
        stage = STAGES[STAGE_NAMES.index(name)]
        stage.run(run, Step(run, stage))
    run.models["synth"]()  # the pipeline loaded before the window: what synthesis adds is images
    out = {"rss_before_synthesis_mib": _vm("VmRSS") / 1024}
    t0 = time.perf_counter()
    for name in ("synthesis", "output"):
        stage = STAGES[STAGE_NAMES.index(name)]
        Path("/proc/self/clear_refs").write_text("5")
        stage.run(run, Step(run, stage))
        if name == "output":
            with tempfile.TemporaryDirectory() as tmp:
                for write in run.writers:
                    write(Path(tmp))
        out[f"{name}_peak_mib"] = _vm("VmHWM") / 1024
        if name == "synthesis":
            out["rss_after_synthesis_mib"] = _vm("VmRSS") / 1024
    image = np.asarray(run.st.images[0])
    cache.clear("synthesis")  # stub images under real synthesis keys: never left for a real run to reuse
    return {**out, "synthesis_seconds": time.perf_counter() - t0, "synthetic_images": len(run.st.items),
            "image_kib": image.nbytes / 1024}


def cluster_memory(a, env: dict, tmp: Path, models: Path, data: Path) -> None:
    """Cold --until latents at --resolution, then the clustering stages' memory in a fresh process."""
    cache = tmp / f"cache-r{a.resolution}"
    if not (cache / "models").exists():
        shutil.copytree(models, cache / "models")
    t, rss = run([sys.executable, "-m", "vlcp", "--cache-dir", str(cache), "-q", "distill", "--data", str(data),
                  "--tiny", "--ipc", str(a.ipc), "--no-finetune", "--resolution", str(a.resolution), "--until",
                  "latents", "--force", "--out", str(tmp / "out-latents")], env)
    print(f"cold --until latents at {a.resolution} px: {t:.1f} s, peak RSS {rss} MiB")
    proc = subprocess.run([sys.executable, __file__, "--_measure", str(cache), str(data), str(a.resolution),
                           str(a.ipc), str(a.synthesis)], env=env, capture_output=True, text=True, check=True)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    base = m["rss_before_mib"]
    print(f"{a.classes} classes x {a.per_class} images ({m['images']}), latents of {m['latent_kib']:.0f} KiB, "
          f"IPC {a.ipc}: outliers + clusters {m['seconds']:.1f} s, {m['blob_reads']} blob reads; RSS {base:.0f} MiB "
          f"before, peak during outliers {m['outliers_peak_mib']:.0f} (+{m['outliers_peak_mib'] - base:.0f}) MiB, "
          f"during clusters {m['clusters_peak_mib']:.0f} (+{m['clusters_peak_mib'] - base:.0f}) MiB, "
          f"after {m['rss_after_mib']:.0f} MiB")
    if a.synthesis:
        base = m["rss_before_synthesis_mib"]
        print(f"synthesis of {m['synthetic_images']} stub images of {m['image_kib']:.0f} KiB: "
              f"{m['synthesis_seconds']:.1f} s with the output; RSS {base:.0f} MiB before, peak during synthesis "
              f"{m['synthesis_peak_mib']:.0f} (+{m['synthesis_peak_mib'] - base:.0f}) MiB, after it "
              f"{m['rss_after_synthesis_mib']:.0f} (+{m['rss_after_synthesis_mib'] - base:.0f}) MiB, while writing "
              f"the output {m['output_peak_mib']:.0f} (+{m['output_peak_mib'] - base:.0f}) MiB")


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "--_measure":
        print(json.dumps(measure_clusters(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                                          int(sys.argv[6]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--px", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    ap.add_argument("--cluster-memory", action="store_true", help="only the clustering stages' memory (see above)")
    ap.add_argument("--resolution", type=int, default=128, help="with --cluster-memory: the VAE's input size")
    ap.add_argument("--ipc", type=int, default=2, help="with --cluster-memory: clusters per class")
    ap.add_argument("--synthesis", type=int, default=0, metavar="PX", help="with --cluster-memory: then "
                    "synthesis (random PX x PX stub images instead of the diffusion call) and the output's files")
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    tmp = a.keep or Path(tempfile.mkdtemp(prefix="vlcp-scale-"))
    data, models = tmp / "data", tmp / "models"
    if not data.exists():
        build_folder(data, a.classes, a.per_class, a.px)
    from vlcp.models.tiny import tiny_models

    tiny_models(models)
    if a.cluster_memory:
        cluster_memory(a, env, tmp, models, data)
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        return

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
