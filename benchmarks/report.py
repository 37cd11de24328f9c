"""Building OUT/report.html for an ImageNette IPC 50 sized folder (10 classes x 50 images of 256 px).

    python benchmarks/report.py [--classes 10] [--ipc 50] [--size 256] [--repeats 5]

The folder is made by hand the way ``vlcp distill --refine`` writes it (manifest with stages and
refinement, prototypes.json with ~60-word captions, 30 R_w words and 15 N words per cluster, an
8000-step loss CSV, three evaluation files); each build runs in a fresh process, so the time
includes importing vlcp.report.html (and jinja2, and compiling its templates), and the script checks
that torch was never imported.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make(root: Path, classes: int, ipc: int, size: int) -> None:
    rng = np.random.default_rng(0)
    vocab = [f"word{i}" for i in range(400)]
    folders = [f"n{i:08d}" for i in range(classes)]
    protos, replacements = {}, {}
    for c, f in enumerate(folders):
        (root / f).mkdir(parents=True)
        clusters = []
        for j in range(ipc):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f / f"{j:04d}.png")
            caption = " ".join(rng.choice(vocab, 60))
            clusters.append({"caption": caption, "member": f"train/{f}/{j}.JPEG", "score": float(j),
                             "fallback": False, "cluster_size": 26,
                             "representative_words": {w: int(rng.integers(1, 30)) for w in rng.choice(vocab, 30)},
                             "non_representative": list(rng.choice(vocab, 15)), "prompt": caption})
            if j % 5 == 0:
                replacements[str(c * ipc + j)] = {"candidate": 3, "how": "valid", "pool": [1, 3], "p_before": 0.4,
                                                  "p_after": 0.97, "class": f, "cluster": j}
        protos[f] = {"name": f"class {c}", "clusters": clusters}
    stages = {s: {"cached": False, "items_computed": 500, "items_cached": 0, "model_loaded": True, "seconds": 1.0}
              for s in ("images", "captions", "latents", "outliers", "clusters", "text_prototypes", "prompts",
                        "finetune", "synthesis", "output")}
    manifest = {"vlcp_version": "0.2.0", "parameters": {"data": "imagenette", "ipc": ipc, "text_strategy": "dcs"},
                "dataset": {"name": "imagenette", "images": 9469}, "stages": stages,
                "classes": [{"folder": f, "name": protos[f]["name"]} for f in folders],
                "refinement": {"replacements": replacements, "per_class": {}}, "warnings": [], "skipped_images": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "prototypes.json").write_text(json.dumps({"classes": protos}))
    (root / "finetune_loss.csv").write_text("step,loss\n" + "".join(f"{i},{1 / (i + 1)}\n" for i in range(8000)))
    (root / "evaluations").mkdir()
    for m in ("convnet6", "resnetap10", "resnet18"):
        (root / "evaluations" / f"minimax-{m}.json").write_text(json.dumps({
            "protocol": {"name": "minimax", "model": m, "epochs": 1500}, "images_per_class": {f: ipc for f in folders},
            "accuracy": {"mean": 80.0, "std": 1.0, "per_seed": [79.0, 80.0, 81.0]}, "seeds": [{}, {}, {}]}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ipc", type=int, default=50)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "out"
        make(root, a.classes, a.ipc, a.size)
        code = ("import sys, time; t = time.perf_counter(); from vlcp.report.html import build; "
                f"build({str(root)!r}); print(time.perf_counter() - t, 'torch' in sys.modules)")
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            wall = time.perf_counter() - t0
            build_s, torch = out.split()
            assert torch == "False", "vlcp.report.html imported torch"
            times.append((float(build_s), wall))
        size = (root / "report.html").stat().st_size
    builds = sorted(t for t, _ in times)
    walls = sorted(w for _, w in times)
    print(f"{a.classes} classes x {a.ipc} images of {a.size} px: report.html {size / 1024:.0f} KiB; "
          f"import + build median {builds[len(builds) // 2]:.3f} s (max {builds[-1]:.3f}); "
          f"whole process median {walls[len(walls) // 2]:.3f} s; torch imported: no")


if __name__ == "__main__":
    main()
