"""The hardware's limits, from the vendors' datasheets, and the share of them a measured rate reaches.

``benchmarks/real_shapes.py`` prints, next to every throughput, its fraction of the limit that binds it:

- decoding (captions) is bound by memory bandwidth: a step reads the weights once and every sequence's KV
  cache, so the floor of a step is (weights + batch x KV bytes per token x mean context) / bandwidth;
- the UNet, the VAE and the detector are bound by arithmetic: FLOPs per image (counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on one call) x images per second / dense fp16 FLOP/s.

The table holds each GPU's peak memory bandwidth and dense FP16/BF16 tensor-core FLOP/s (FP32 accumulate,
what PyTorch's fp16 matmuls use), as the datasheets print them; a figure the datasheet gives "with
sparsity" is halved. Nothing here is measured. Below the table: the estimates of ``vlcp distill`` from the
rates, the printed report and the measuring helpers real_shapes.py shares.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # bytes/s
    flops: float  # dense fp16/bf16 tensor FLOP/s
    source: str  # the datasheet's own words


def _gpu(name, tbps, tflops, source) -> Gpu:
    return Gpu(name, tbps * 1e12, tflops * 1e12, source)


# (words the CUDA device name must contain, words it must not contain, figures)
GPUS: list[tuple[tuple[str, ...], tuple[str, ...], Gpu]] = [
    (("H200",), ("NVL",), _gpu("H200 SXM", 4.8, 1979 / 2, 'NVIDIA H200 Tensor Core GPU datasheet: "GPU Memory '
                                                          'Bandwidth 4.8TB/s", "FP16 Tensor Core 1,979 TFLOPS" '
                                                          '(with sparsity)')),
    (("H100", "PCIe"), (), _gpu("H100 PCIe", 2.0, 1513 / 2, 'NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe): '
                                                            '"GPU memory bandwidth 2TB/s", "FP16 Tensor Core 1,513 '
                                                            'teraFLOPS" (with sparsity)')),
    (("H100",), ("PCIe", "NVL"), _gpu("H100 SXM", 3.35, 1979 / 2, 'NVIDIA H100 Tensor Core GPU datasheet (H100 '
                                                                  'SXM): "GPU memory bandwidth 3.35TB/s", "FP16 '
                                                                  'Tensor Core 1,979 teraFLOPS" (with sparsity)')),
    (("A100", "80GB", "PCIe"), (), _gpu("A100 80GB PCIe", 1.935, 312, 'NVIDIA A100 Tensor Core GPU datasheet: '
                                                                      '"GPU Memory Bandwidth 1,935GB/s" (80GB PCIe), '
                                                                      '"FP16 Tensor Core 312 TFLOPS | 624 TFLOPS*"')),
    (("A100", "80GB"), ("PCIe",), _gpu("A100 80GB SXM", 2.039, 312, 'NVIDIA A100 Tensor Core GPU datasheet: "GPU '
                                                                    'Memory Bandwidth 2,039GB/s" (80GB SXM), "FP16 '
                                                                    'Tensor Core 312 TFLOPS | 624 TFLOPS*"')),
    (("A100",), ("80GB",), _gpu("A100 40GB", 1.555, 312, 'NVIDIA A100 Tensor Core GPU datasheet: "GPU Memory '
                                                         'Bandwidth 1,555GB/s" (40GB), "FP16 Tensor Core 312 '
                                                         'TFLOPS | 624 TFLOPS*"')),
    (("RTX A6000",), (), _gpu("RTX A6000", 0.768, 309.7 / 2, 'NVIDIA RTX A6000 datasheet: "Memory Bandwidth 768 '
                                                             'GB/s", "Tensor Performance 309.7 TFLOPS" (with '
                                                             'sparsity)')),
    (("L40S",), (), _gpu("L40S", 0.864, 362.05, 'NVIDIA L40S datasheet: "Memory Bandwidth 864GB/s", "FP16 Tensor '
                                                'Core 362.05 | 733* TFLOPS" (* with sparsity)')),
    (("4090",), (), _gpu("GeForce RTX 4090", 1.008, 165.2, 'NVIDIA Ada GPU architecture whitepaper, GeForce RTX '
                                                           '4090: "Memory Bandwidth 1008 GB/sec", "Peak FP16 Tensor '
                                                           'TFLOPS with FP32 Accumulate 165.2/330.4" (dense/sparse)')),
]


def find_gpu(device_name: str) -> Gpu | None:
    """The table's row for a CUDA device name (``torch.cuda.get_device_name``) or a row's own name."""
    for must, must_not, gpu in GPUS:
        if device_name == gpu.name or (all(w in device_name for w in must)
                                       and not any(w in device_name for w in must_not)):
            return gpu
    return None


def decode_fraction(gpu: Gpu, weights_bytes: float, kv_bytes_per_token: float, batch: int, mean_context: float,
                    step_seconds: float) -> float:
    """Share of the bandwidth floor a decoding step reaches: bytes it must read / bandwidth / its time."""
    return (weights_bytes + batch * kv_bytes_per_token * mean_context) / gpu.bandwidth / step_seconds


def compute_fraction(gpu: Gpu, flops_per_item: float, items_per_second: float) -> float:
    """Share of the dense tensor-core peak a rate reaches."""
    return flops_per_item * items_per_second / gpu.flops


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, forward and any backward it runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f} %"


# -- `vlcp distill` time from the measured rates -------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    name: str
    images: int
    classes: int


IMAGENETTE = Dataset("ImageNette", 9469, 10)
IMAGENET = Dataset("ImageNet-1K", 1281167, 1000)


def distill_hours(rates: dict, finetune_sec: float, ds: Dataset, ipc: int = 10, gpus: int = 1, epochs: int = 8,
                  micro_batch: int = 8) -> dict[str, float]:
    """Hours per stage of ``vlcp distill --ipc IPC`` (default recipe: centre-crop pairs, 8 epochs): captions
    and latents per image, the fine-tuning pairs (crop and mirror: two encodes per image), ``finetune_sec``
    per micro-batch of ``micro_batch``, synthesis per image. On ``gpus`` GPUs every stage is taken as
    ``gpus`` times faster (vlcp deals per-item batches to processes, fine-tuning runs DDP): an ideal, not
    a measurement."""
    micro = epochs * math.ceil(ds.images / micro_batch)
    seconds = {"captions": ds.images / rates["captions"], "latents": ds.images / rates["latents"],
               "training latents": 2 * ds.images / rates["latents"], "fine-tuning": micro * finetune_sec,
               "synthesis": ds.classes * ipc / rates["synthesis"]}
    hours = {k: v / 3600 / gpus for k, v in seconds.items()}
    return {**hours, "total": sum(hours.values())}


# -- what real_shapes.py prints ------------------------------------------------------------------------
def decode_limit(s, model, batch: int, prompt: int, tokens: int, sec: float, prefill: tuple,
                 static: bool = False) -> str:
    """The decoding step's share of the bandwidth floor, and the prefill's of the FLOP peak (``prefill``: its
    seconds and FLOPs; ``sec``: one call of ``batch`` rows and ``tokens`` new tokens). A ``static`` cache's
    attention reads all of its preallocated length at every step, not the mean context."""
    import torch

    from vlcp.models.captioner import kv_bytes_per_token

    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    kv = kv_bytes_per_token(model.config.get_text_config(), torch.finfo(model.dtype).bits // 8)
    pre = fraction(s, lambda g: compute_fraction(g, prefill[1], 1 / prefill[0]))
    if sec <= prefill[0] or tokens < 2:
        return f"decode: within the timer's noise, prefill {percent(pre)} of FLOP/s"
    step = (sec - prefill[0]) / (tokens - 1)
    context = prompt + tokens if static else prompt + tokens / 2
    dec = fraction(s, lambda g: decode_fraction(g, weights, kv, batch, context, step))
    return f"step {1000 * step:.1f} ms: decode {percent(dec)} of bandwidth, prefill {percent(pre)} of FLOP/s"


def scaled_estimates(rates: dict, ft: dict) -> list[tuple[str, int, dict]]:
    """(dataset, GPUs, hours per stage) for ImageNette and ImageNet-1K at IPC 10 on 1 and 8 GPUs."""
    now = [v for k, v in ft.items() if k[0] == "full" and k[1] not in (True, False, "old")]  # --compare: the fastest
    (sec, _) = min(now) if now else next(iter(sorted(ft.items(), key=lambda kv: kv[0] != ("full", True))))[1]
    plain = {k: v[0] for k, v in rates.items()}
    return [(ds.name, g, distill_hours(plain, sec, ds, 10, g)) for ds in (IMAGENETTE, IMAGENET)
            for g in (1, 8)]


def report(s, name: str, rates: dict, ft: dict, quick: bool) -> dict:
    print(f"\n| stage (measured on {name}) | throughput | peak memory (GB) | share of the limit |\n|---|---|---|---|")
    for label, rate, peak, limit in s.rows:
        print(f"| {label} | {rate} | {peak:.1f} | {limit} |")
    if s.gpu:
        print(f"\nlimits of {s.gpu.name}: {s.gpu.bandwidth / 1e12:.2f} TB/s, {s.gpu.flops / 1e12:.1f} dense FP16 "
              f"TFLOP/s ({s.gpu.source})")
    if s.compare:
        print("\n| old -> new | old | new | new / old | agreement |\n|---|---|---|---|---|")
        for what, old, new, unit, agree in s.compare:
            print(f"| {what} | {old:.3g} {unit} | {new:.3g} {unit} | {new / old:.2f}x | {agree} |")
    if len(rates) < 3 or not ft:
        print("\n(no `vlcp distill` estimate: it needs the captions, latents, fine-tuning and synthesis rates)")
        return {"device": name, "quick": quick, "rows": s.rows, "compare": s.compare}
    warn = " -- REDUCED SHAPES, NOT REAL FIGURES" if quick else ""
    scaled = scaled_estimates(rates, ft)
    stages = list(scaled[0][2])
    print(f"\nEstimated `vlcp distill --ipc 10` hours from these rates (N GPUs: ideal 1/N){warn}:\n\n"
          f"| dataset | GPUs | {' | '.join(stages)} |\n|---|---|{'---|' * len(stages)}")
    for ds, g, hours in scaled:
        print(f"| {ds} | {g} | {' | '.join(f'{hours[k]:.2f}' for k in stages)} |")
    return {"device": name, "quick": quick, "rows": s.rows, "compare": s.compare, "scaled": scaled}


# -- measuring --------------------------------------------------------------------------------------------
class Rows(list):
    """The measured rows (label, rate, peak GB, share of the limit), each printed as it comes."""

    def append(self, row) -> None:
        row = (*row, "-")[:4]
        super().append(row)
        print(f"  {row[0]}: {row[1]}, peak {row[2]:.1f} GB, {row[3]}", flush=True)


@dataclass
class Setup:
    device: str
    quick: bool
    dtype: object
    gpu: Gpu | None = None
    rows: list = field(default_factory=Rows)
    compare: list = field(default_factory=list)  # (what, old, new, unit, agreement)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def release(s: Setup) -> None:
    """Collect what was deleted (a model held in a reference cycle, as a compiled call makes one) and give its
    memory back: the next section sees the free memory a fresh ``vlcp distill`` stage would."""
    import gc

    import torch

    gc.collect()
    if s.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_peak(s: Setup) -> None:
    import torch

    if s.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(s: Setup) -> float:
    """CUDA: peak allocated since the stage began; CPU: the process's peak resident set so far."""
    import torch

    if s.cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def timed(s: Setup, fn, repeats: int = 1, warm=None) -> float:
    """Seconds per call; on CUDA after a warm-up call (``warm``, or ``fn`` itself: kernels, compilation)."""
    import torch

    if s.cuda:
        (warm or fn)()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if s.cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def images(n: int, size: int = 500):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def fraction(s: Setup, fn) -> float | None:
    """``fn(gpu)`` when the GPU's figures are known, else None."""
    return fn(s.gpu) if s.gpu else None
