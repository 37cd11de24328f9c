"""Throughput and peak memory of vlcp's stages on the real model shapes, with random weights (no download).

LLaVA-1.5-7B, Stable Diffusion v1.5 (UNet, VAE, CLIP text encoder) and the refinement detector are
built from their published configurations (``benchmarks/configs/*.json``) and run through vlcp's own
code paths: ``captions.caption_images`` (greedy, ``--caption-max-tokens``; random weights never stop
early, so this is the worst case), ``latents.encode_images`` at 512 px, ``finetune.train`` (full and
LoRA, with and without gradient checkpointing, batch 8) and ``synthesis.generate`` (50 steps x
strength 0.7, guidance on). From the rates it estimates ``vlcp distill --data imagenette --ipc 10``.

    python benchmarks/real_shapes.py                      # CUDA: the real sizes, fp16 as vlcp runs them
    nice -n 10 python benchmarks/real_shapes.py --device cpu --quick   # a reduced smoke run, < 5 min on 2 cores

``--quick`` is REDUCED and says so: 2 transformer layers in LLaVA's language and vision towers, 32 new
tokens, batch 1, UNet work at 256 px with 10 denoising steps, LoRA only (full fine-tuning needs ~17 GB of state
before activations). Its figures check the code path; they are not the real stage times.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = Path(__file__).parent / "configs"
IMAGENETTE_IMAGES = 9469
IMAGENETTE_CLASSES = 10


class Rows(list):
    """The measured rows, each printed as it comes (a long run shows its progress)."""

    def append(self, row) -> None:
        super().append(row)
        print(f"  {row[0]}: {row[1]}, peak {row[2]:.1f} GB", flush=True)


@dataclass
class Setup:
    device: str
    quick: bool
    dtype: object
    rows: list = field(default_factory=Rows)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


def _reset_peak(s: Setup) -> None:
    import torch

    if s.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(s: Setup) -> float:
    """CUDA: peak allocated since the stage began; CPU: the process's peak resident set so far."""
    import torch

    if s.cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _timed(s: Setup, fn, repeats: int = 1) -> float:
    import torch

    if s.cuda:
        fn()  # warm-up (kernels, allocator); a CPU needs none
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if s.cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _images(n: int, size: int = 500):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# -- captions ---------------------------------------------------------------------------------------
def build_llava(s: Setup):
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vlcp.models.tiny import LLAVA_CHAT_TEMPLATE, word_tokenizer

    cfg = _config("llava-1.5-7b-hf.json")
    tok = word_tokenizer()  # stands in for LLaVA's tokenizer (ids < 32064); the prompt is a few tokens shorter
    cfg["image_token_index"] = tok.convert_tokens_to_ids("<image>")
    cfg["pad_token_id"] = tok.pad_token_id
    if s.quick:
        cfg["text_config"]["num_hidden_layers"] = cfg["vision_config"]["num_hidden_layers"] = 2
    config = LlavaConfig(**cfg)
    with torch.device(s.device):
        torch.set_default_dtype(s.dtype)
        try:
            model = LlavaForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None  # random weights: decode to max_new_tokens (the worst case)
    vis = cfg["vision_config"]["image_size"]
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": vis},
                                                                  crop_size={"height": vis, "width": vis}),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1)
    processor.tokenizer.padding_side = "left"
    return model, processor


def bench_captions(s: Setup, max_tokens: int) -> dict:
    from vlcp.models.captioner import PROMPT, caption_images

    _reset_peak(s)
    model, processor = build_llava(s)
    out = {}
    for b in ([1] if s.quick else [8, 16, 32]):
        imgs = _images(b)
        _reset_peak(s)
        sec = _timed(s, lambda imgs=imgs, b=b: caption_images(model, processor, imgs, ["tench"] * b, PROMPT,
                                                              max_tokens))
        out[b] = (b / sec, _peak_gb(s))
        s.rows.append((f"captions, batch {b}, {max_tokens} new tokens", f"{b / sec:.2f} captions/s", out[b][1]))
    return out


# -- latents ----------------------------------------------------------------------------------------
def build_sd(s: Setup, dtype=None):
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from vlcp.models.tiny import byte_vocab

    dtype = dtype or s.dtype
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_config("sd-v1-5-unet.json"))
    vae = AutoencoderKL(**_config("sd-v1-5-vae.json"))
    te = CLIPTextModel(CLIPTextConfig(**_config("sd-v1-5-text_encoder.json")))
    tmp = Path(tempfile.mkdtemp())
    vocab = byte_vocab()  # ids < 49408; the real BPE merges are not needed for timing
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)
    sched = PNDMScheduler.from_config(_config("sd-v1-5-scheduler.json"))  # (from_config skips unused keys)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(s.device, dtype)


def bench_latents(s: Setup, pipe) -> float:
    from vlcp.method.latents import encode_images

    b = 1 if s.quick else 16
    imgs = _images(b)
    _reset_peak(s)
    sec = _timed(s, lambda: encode_images(pipe.vae, imgs, 512))
    s.rows.append((f"VAE encode, 512 px, batch {b}", f"{b / sec:.2f} images/s", _peak_gb(s)))
    return b / sec


# -- fine-tuning ------------------------------------------------------------------------------------
def bench_finetune(s: Setup, pipe, method: str, checkpointing: bool, res: int) -> float | None:
    import torch

    from vlcp.method import finetune
    from vlcp.store.cache import StageCache

    b = 1 if s.quick else 8
    steps = 1 if s.quick else 6
    lat = np.random.default_rng(0).normal(size=(b * (steps + 1), 4, res // 8, res // 8)).astype(np.float32)
    caps = ["a tench, a large fish held by a man in a green field"] * len(lat)
    unet0 = pipe.unet
    master = None
    if method == "full":
        master = type(unet0)(**_config("sd-v1-5-unet.json")).to(s.device, torch.float32)  # the fp32 master
    else:
        pipe.unet = type(unet0)(**_config("sd-v1-5-unet.json")).to(s.device, s.dtype)  # a fresh base per run
    p = finetune.FinetuneParams(method=method, epochs=1, batch_size=b, accumulation=1, max_steps=steps + 1,
                                gradient_checkpointing=checkpointing, checkpoint_every=10 ** 9)
    with tempfile.TemporaryDirectory() as d:
        _reset_peak(s)
        t = {}

        def clock(step_fn=finetune._optimizer_step):
            def wrapped(st, pp):
                step_fn(st, pp)
                if s.cuda:
                    torch.cuda.synchronize()
                t.setdefault("steps", []).append(time.perf_counter())
            return wrapped

        finetune._optimizer_step, real = clock(), finetune._optimizer_step
        try:
            finetune.train(pipe, lat, caps, p, StageCache(d), "bench", progress=False, master_unet=master)
        finally:
            finetune._optimizer_step = real
        sec = float(np.mean(np.diff(t["steps"])))  # the first step (warm-up) is left out
        peak = _peak_gb(s)
    pipe.unet = unet0
    del master
    label = f"fine-tune {method}, batch {b}, {res} px, gradient checkpointing {'on' if checkpointing else 'off'}"
    s.rows.append((label, f"{sec:.2f} s/step", peak))
    return sec


# -- synthesis & detector ---------------------------------------------------------------------------
def bench_synthesis(s: Setup, pipe, res: int, steps: int) -> float:
    from vlcp.method.synthesis import generate

    b = 1 if s.quick else 8
    lat = np.random.default_rng(0).normal(size=(b, 4, res // 8, res // 8)).astype(np.float32)
    _reset_peak(s)
    sec = _timed(s, lambda: generate(pipe, lat, ["a tench"] * b, list(range(b)), "", 0.7, 10.0, steps))
    s.rows.append((f"img2img, batch {b}, {res} px, {steps} steps x strength 0.7", f"{b / sec:.3f} images/s",
                   _peak_gb(s)))
    return b / sec


def bench_detector(s: Setup) -> float:
    import torch

    from vlcp.evaluation import networks

    net = networks.build("resnet18", 3, IMAGENETTE_CLASSES, 224).to(s.device).eval()
    b = 8 if s.quick else 64
    x = torch.randn(b, 3, 224, 224, device=s.device)
    _reset_peak(s)

    def score():
        with torch.inference_mode():
            net(x).softmax(1)

    sec = _timed(s, score)
    s.rows.append((f"detector (ResNet-18, instance norm) scores, batch {b}, 224 px", f"{b / sec:.1f} images/s",
                   _peak_gb(s)))
    return b / sec


# -- the estimate -----------------------------------------------------------------------------------
def estimate(rates: dict, ft_sec: dict, ipc: int = 10) -> list[tuple[str, float, float]]:
    """(stage, hours, peak GB) for `vlcp distill --data imagenette --ipc 10` from the measured rates."""
    from vlcp.method.finetune import FinetuneParams

    p = FinetuneParams()
    micro = p.micro_batches(IMAGENETTE_IMAGES)  # 8 epochs x ceil(9469 / 8) micro-batches of 8
    out = [("captions", IMAGENETTE_IMAGES / rates["captions"][0] / 3600, rates["captions"][1]),
           ("latents", IMAGENETTE_IMAGES / rates["latents"][0] / 3600, rates["latents"][1])]
    for (method, ckpt), (sec, peak) in ft_sec.items():
        out.append((f"finetune {method} (ckpt {'on' if ckpt else 'off'}; {micro} micro-batches)",
                    micro * sec / 3600, peak))
    n = ipc * IMAGENETTE_CLASSES
    out.append((f"synthesis ({n} images)", n / rates["synthesis"][0] / 3600, rates["synthesis"][1]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="reduced shapes (see the module docstring)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    a = ap.parse_args(argv)
    import torch

    from vlcp.models.loading import half_precision, torch_device

    dev = torch_device(a.device)
    if not a.quick and not half_precision(dev):
        ap.error("the real sizes need a CUDA GPU (LLaVA-7B in fp32 is 28 GB); use --quick on CPU")
    s = Setup(dev, a.quick, torch.float16 if half_precision(dev) else torch.float32)
    name = torch.cuda.get_device_name(torch.device(dev)) if s.cuda else f"CPU, {torch.get_num_threads()} threads"
    mode = ("REDUCED (--quick): 2-layer LLaVA towers, 32 new tokens, batch 1, UNet at 256 px, 10 steps, LoRA only"
            if a.quick
            else "real sizes")
    print(f"device: {name}; {mode}", flush=True)
    t_all = time.perf_counter()
    rates = {}
    cap = bench_captions(s, 32 if a.quick else 256)  # --caption-max-tokens: 256
    rates["captions"] = cap[max(cap)]
    pipe = build_sd(s)
    rates["latents"] = (bench_latents(s, pipe), s.rows[-1][2])
    res = 256 if a.quick else 512
    ft = {}
    for method in (["lora"] if a.quick else ["full", "lora"]):
        for ckpt in (True, False):
            sec = bench_finetune(s, pipe, method, ckpt, res)
            ft[(method, ckpt)] = (sec, s.rows[-1][2])
    rates["synthesis"] = (bench_synthesis(s, pipe, res, 10 if a.quick else 50), s.rows[-1][2])
    bench_detector(s)
    print(f"\n| stage (measured on {name}) | throughput | peak memory (GB) |\n|---|---|---|")
    for label, rate, peak in s.rows:
        print(f"| {label} | {rate} | {peak:.1f} |")
    warn = " -- REDUCED SHAPES, NOT REAL FIGURES" if a.quick else ""
    print(f"\nEstimate for `vlcp distill --data imagenette --ipc 10` ({IMAGENETTE_IMAGES} images){warn}:\n\n"
          "| stage | hours | peak memory (GB) |\n|---|---|---|")
    est = estimate(rates, ft)
    for stage, hours, peak in est:
        print(f"| {stage} | {hours:.2f} | {peak:.1f} |")
    note = "" if s.cuda else "; CPU peak = process peak RSS so far, not per stage"
    print(f"\nbenchmark wall time: {time.perf_counter() - t_all:.0f} s{note}")
    if a.json:
        a.json.write_text(json.dumps({"device": name, "quick": a.quick, "rows": s.rows, "estimate": est}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
