"""Throughput, peak memory and share of the hardware's limit of vlcp's stages on the real model shapes, with
random weights (no download).

LLaVA-1.5-7B, Stable Diffusion v1.5 (UNet, VAE, CLIP text encoder) and the refinement detector are built
from their published configurations (``benchmarks/configs/*.json``) and run through vlcp's own code paths:
``captioner.caption_images`` (greedy, 256 new tokens; random weights never stop early, so this is the worst
case) with ``--caption-engine hf-static`` at the batch ``captioner.batch_for_model`` takes from memory,
``latents.encode_images`` at 512 px, ``finetune.train`` (full and LoRA, gradient checkpointing on and off,
batch 8) and ``synthesis.sample`` as ``vlcp distill`` runs it (``speed_for``: batch 32, channels_last, the
memory fit; 50 steps x strength 0.7, guidance on). Every row prints its share of the limit that binds it
(``benchmarks/roofline.py``: decoding against memory bandwidth, the UNet, VAE and detector against dense
FP16 FLOP/s, from the GPU's datasheet), and the estimates of ``vlcp distill --ipc 10`` on ImageNette and
ImageNet-1K, on 1 and 8 GPUs, follow from the rates.

    python benchmarks/real_shapes.py                      # CUDA: the real sizes, fp16 as vlcp runs them
    python benchmarks/real_shapes.py --compare            # ... and the old paths beside the new, with ratios
    python benchmarks/real_shapes.py --compare --stages captions   # one part of it (a time limit per run)
    nice -n 10 python benchmarks/real_shapes.py --device cpu --quick   # a reduced smoke run, ~2 min on 2 cores

``--compare`` runs, in one process, the paths vlcp ran before issue 25 (greedy at batch 32 with the dynamic
cache, reference captions one image per call, the VAE and img2img in NCHW, img2img in calls of 8) next to the new
ones (batch from memory, hf and hf-static; reference batched with a generator per row; img2img in calls of
32 with channels_last, then with the compiled UNet; full fine-tuning as 8 x 4 passes with checkpointing and
AdamW's foreach kernel next to ``micro_batch.speed_for``'s plan from memory and fused AdamW, then with
channels_last, then compiled), prints the ratios and how many captions / pixels agree.

``--quick`` is REDUCED and says so: LLaVA with 2 narrow layers per tower, 8 new tokens, batch 2; the UNet,
VAE and fine-tuning at 64 px with 3 denoising steps, LoRA with checkpointing only. Its figures check the
code paths; they are not the real stage times, and a CPU has no roofline row.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline as rf  # noqa: E402  (benchmarks/roofline.py)

CONFIGS = Path(__file__).parent / "configs"
IMAGENETTE_IMAGES = 9469
IMAGENETTE_CLASSES = 10
STAGES = ["captions", "latents", "finetune", "synthesis", "detector"]


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


# -- captions ---------------------------------------------------------------------------------------
def build_llava(s: rf.Setup):
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
        cfg["text_config"].update(num_hidden_layers=2, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                                  num_key_value_heads=4)
        cfg["vision_config"].update(num_hidden_layers=2)
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


def bench_captions(s: rf.Setup, model, processor, images: list, batch: int, tokens: int, engine, label: str,
                   mode: str = "greedy") -> tuple[float, float, list[str]]:
    """(captions/s, peak GB, captions) of ``images`` in calls of ``batch`` (reference mode without an engine:
    ``caption_images`` makes one generate call per image, and the decode limit is that of batch 1)."""
    from vlcp.models.captioner import PROMPT, caption_images, format_prompt

    chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
    seeds = list(range(len(images)))
    out: list[str] = []

    def run(n=tokens, parts=chunks):
        out.clear()
        for part in parts:
            out.extend(caption_images(model, processor, part, ["tench"] * len(part), PROMPT, n, mode,
                                      seeds[len(out):len(out) + len(part)], engine))

    rf.reset_peak(s)
    sec = rf.timed(s, run, warm=lambda: run(parts=chunks[:1]))
    texts = list(out)
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": format_prompt(PROMPT, "tench")}]}], add_generation_prompt=True)
    prompt = processor(images=images[:1], text=[text], return_tensors="pt")["input_ids"].shape[1]
    pre_sec = rf.timed(s, lambda: run(1, chunks[:1]))
    pre_flops = rf.count_flops(lambda: run(1, chunks[:1]))
    calls = len(chunks[0]) if mode == "reference" and engine is None else 1  # generate calls per chunk
    limit = rf.decode_limit(s, model, len(chunks[0]) // calls, prompt, tokens, sec / len(chunks) / calls,
                            (pre_sec / calls, pre_flops / calls), static=engine == "hf-static")
    s.rows.append((f"captions {label}, batch {batch}, {tokens} new tokens", f"{len(images) / sec:.2f} captions/s",
                   rf.peak_gb(s), limit))
    return len(images) / sec, s.rows[-1][2], texts


def captions_section(s: rf.Setup, compare: bool) -> tuple[float, float]:
    """The new path's (captions/s, peak GB); with ``compare`` the old ones beside it."""
    from vlcp.models.captioner import Engine, batch_for_model

    model, processor = build_llava(s)
    tokens = 8 if s.quick else 256
    batch = 2 if s.quick or not s.cuda else batch_for_model(model, tokens)
    imgs = rf.images(batch)
    new = bench_captions(s, model, processor, imgs, batch, tokens, "hf-static", "greedy, hf-static")
    if compare:
        old_b = 2 if s.quick else 32
        old = bench_captions(s, model, processor, imgs, old_b, tokens, Engine(), "greedy, hf (old)")
        hf = bench_captions(s, model, processor, imgs, batch, tokens, "hf", "greedy, hf")
        how = " (from memory)" if s.cuda and not s.quick else ""
        s.compare.append((f"captions greedy: batch {old_b} -> {batch}{how}, hf", old[0], hf[0], "captions/s",
                          f"{sum(a == b for a, b in zip(old[2], hf[2]))}/{len(imgs)} captions identical"))
        s.compare.append(("captions greedy: hf -> hf-static, same batch", hf[0], new[0], "captions/s",
                          f"{sum(a == b for a, b in zip(hf[2], new[2]))}/{len(imgs)} captions identical"))
        n, t = (2, 8) if s.quick else (8, 128)
        ref = [bench_captions(s, model, processor, imgs[:n], n, t, e, f"reference, {what}", "reference")
               for e, what in ((None, "one image per call (old)"), ("hf", "batched, hf"))]
        s.compare.append((f"captions reference ({t} tokens): one per call -> batch {n}", ref[0][0], ref[1][0],
                          "captions/s", f"{sum(a == b for a, b in zip(ref[0][2], ref[1][2]))}/{n} identical"))
    del model, processor
    rf.release(s)  # transformers keeps the compiled call on the model (a cycle): LLaVA stays until collected
    return new[0], new[1]


# -- Stable Diffusion -------------------------------------------------------------------------------
def build_sd(s: rf.Setup, dtype=None):
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


def bench_latents(s: rf.Setup, pipe, res: int, channels_last: bool | None = None, tag: str = "") -> float:
    """Images/s of ``latents.encode_images`` (``channels_last`` None: as vlcp runs it, NHWC on CUDA)."""
    from vlcp.method.latents import encode_images

    b = 1 if s.quick else 16
    imgs = rf.images(b)
    rf.reset_peak(s)
    sec = rf.timed(s, lambda: encode_images(pipe.vae, imgs, res, channels_last=channels_last))
    flops = rf.count_flops(lambda: encode_images(pipe.vae, imgs[:1], res, channels_last=channels_last))
    s.rows.append((f"VAE encode, {res} px, batch {b}{tag}", f"{b / sec:.2f} images/s", rf.peak_gb(s),
                   f"{rf.percent(rf.fraction(s, lambda g: rf.compute_fraction(g, flops, b / sec)))} of FLOP/s"))
    return b / sec


def latents_section(s: rf.Setup, pipe, res: int, compare: bool) -> float:
    """The VAE encoding rate as vlcp runs it; with ``compare``, first the NCHW path it ran before issue 25
    (timed before the VAE is turned NHWC: the switch is one-way per model)."""
    old = bench_latents(s, pipe, res, channels_last=False, tag=" (old: NCHW)") if compare else None
    new = bench_latents(s, pipe, res)
    if old:
        s.compare.append(("VAE encode (channels_last on CUDA)", old, new, "images/s", "1e-5 on CPU "
                          "(tests/test_throughput.py)"))
    return new


def bench_finetune(s: rf.Setup, pipe, method: str, checkpointing: bool | None, res: int, speed=None,
                   accumulation: int = 1, tag: str = "") -> float | None:
    """Seconds per micro-batch of ``b`` samples (an optimizer step of ``accumulation`` of them, divided), the
    first step (warm-up, the memory probe, compilation) left out. ``speed``: a ``micro_batch.TrainSpeed``
    (default: the plain eager path); ``checkpointing`` None lets ``micro_batch.plan`` choose."""
    import torch

    from vlcp.method import finetune
    from vlcp.method.micro_batch import TrainSpeed
    from vlcp.store.cache import StageCache

    b = 1 if s.quick else 8
    steps = 1 if s.quick else 6
    lat = np.random.default_rng(0).normal(size=(b * accumulation * (steps + 1), 4, res // 8, res // 8))
    lat = lat.astype(np.float32)
    caps = ["a tench, a large fish held by a man in a green field"] * len(lat)
    unet0 = pipe.unet
    master = None
    if method == "full":
        master = type(unet0)(**_config("sd-v1-5-unet.json")).to(s.device, torch.float32)  # the fp32 master
    else:
        pipe.unet = type(unet0)(**_config("sd-v1-5-unet.json")).to(s.device, s.dtype)  # a fresh base per run
    p = finetune.FinetuneParams(method=method, epochs=1, batch_size=b, accumulation=accumulation,
                                max_steps=steps + 1, gradient_checkpointing=checkpointing, checkpoint_every=10 ** 9,
                                speed=speed or TrainSpeed())
    with tempfile.TemporaryDirectory() as d:
        rf.reset_peak(s)
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
            _, meta = finetune.train(pipe, lat, caps, p, StageCache(d), "bench", progress=False, master_unet=master)
        finally:
            finetune._optimizer_step = real
        sec = float(np.mean(np.diff(t["steps"]))) / accumulation  # the first step (warm-up) is left out
        peak = rf.peak_gb(s)
    pipe.unet = unet0
    del master
    fwd = _unet_flops(pipe, b, res)
    ran = meta["passes"]
    k = 4 if ran["gradient_checkpointing"] else 3  # backward ~ 2 forwards; checkpointing recomputes the forward
    share = rf.fraction(s, lambda g: rf.compute_fraction(g, k * fwd, 1 / sec))
    label = f"fine-tune {method}, batch {b}, {res} px, gradient checkpointing " \
            f"{'on' if ran['gradient_checkpointing'] else 'off'}"
    if accumulation > 1:
        label = f"fine-tune {method}, {b} x {accumulation} per step as {ran['micro_batch']} per pass, {res} px, " \
                f"checkpointing {'on' if ran['gradient_checkpointing'] else 'off'}{tag}"
    s.rows.append((label, f"{sec:.2f} s/step" if accumulation == 1 else f"{b / sec:.1f} samples/s", peak,
                   f"{rf.percent(share)} of FLOP/s ({k}x forward FLOPs)"))
    return sec


def finetune_section(s: rf.Setup, pipe, res: int, compare: bool, compiled: bool = True) -> dict:
    """{(method, checkpointing): (seconds per micro-batch of 8, peak GB)}: the rows of the stage table; with
    ``compare``, full fine-tuning as it ran before issue 25 (8 x 4 passes, checkpointing on, eager, AdamW's
    foreach kernel) and as ``vlcp distill`` runs it now (``micro_batch.speed_for``: the plan from memory, fused
    AdamW), then with channels_last and compiled (the opt-in flags); their key is (method, "old"/"new"/...)."""
    from vlcp.method.micro_batch import speed_for

    ft = {}
    for method in ["lora"] if s.quick else ["full", "lora"]:
        for ckpt in (True,) if s.quick else (True, False):
            ft[(method, ckpt)] = (bench_finetune(s, pipe, method, ckpt, res), s.rows[-1][2])
    if not compare:
        return ft
    method, acc, b = ("lora", 2, 1) if s.quick else ("full", 4, 8)
    dev = s.device.split(":")[0]
    runs = [("old", True, None, ""), ("new", None, speed_for(dev), " (new)"),
            ("channels_last", None, speed_for(dev, channels_last=True), " (new, --finetune-channels-last)")]
    if not s.quick and compiled:  # inductor on a CPU compiles for minutes: the reduced run checks eager paths
        runs.append(("compiled", None, speed_for(dev, compile_unet=True), " (new, --finetune-compile)"))
    for name, ckpt, speed, tag in runs:
        ft[(method, name)] = (bench_finetune(s, pipe, method, ckpt, res, speed, acc, tag or " (old)"), s.rows[-1][2])
    old = ft[(method, "old")][0]
    for name in [r[0] for r in runs[1:]]:
        s.compare.append((f"fine-tuning {method} ({name})", b / old, b / ft[(method, name)][0], "samples/s",
                          "the same update (tests/test_micro_batch.py)"))
    return ft


def _unet_flops(pipe, batch: int, res: int) -> int:
    import torch

    x = torch.zeros(batch, 4, res // 8, res // 8, device=pipe.device, dtype=pipe.unet.dtype)
    emb = torch.zeros(batch, 77, pipe.text_encoder.config.hidden_size, device=pipe.device, dtype=pipe.unet.dtype)
    with torch.no_grad():
        return rf.count_flops(lambda: pipe.unet(x, 10, encoder_hidden_states=emb))


def plain_layout(pipe) -> None:
    """The UNet and VAE back in NCHW, as before issue 25, and forgotten by vlcp's one-way layout switches."""
    import torch

    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.vae.to(memory_format=torch.contiguous_format)
    pipe.vae._vlcp_channels_last = False  # latents._encode
    pipe._vlcp_prepared = set()  # synthesis.prepare


def bench_synthesis(s: rf.Setup, pipe, res: int, steps: int, n: int, per_call: int, speed, label: str):
    """(images/s, peak GB, images) of ``n`` images in calls of ``per_call`` with ``speed``."""
    from vlcp.method.synthesis import Sampling, sample

    lat = np.random.default_rng(0).normal(size=(n, 4, res // 8, res // 8)).astype(np.float32)
    sampling = Sampling("", 0.7, 10.0, steps)
    out = []

    def run(k=n):
        out.clear()
        for i in range(0, k, per_call):
            part = lat[i:i + per_call]
            out.append(sample(pipe, part, ["a tench"] * len(part), list(range(i, i + len(part))), sampling, speed))

    rf.reset_peak(s)
    sec = rf.timed(s, run, warm=lambda: run(per_call))
    imgs = np.concatenate(out)
    flops = rf.count_flops(lambda: sample(pipe, lat[:1], ["a tench"], [0], sampling, speed))
    share = rf.fraction(s, lambda g: rf.compute_fraction(g, flops, n / sec))
    s.rows.append((f"img2img {label}, {per_call} per call, {res} px, {steps} steps x strength 0.7",
                   f"{n / sec:.3f} images/s", rf.peak_gb(s), f"{rf.percent(share)} of FLOP/s"))
    return n / sec, s.rows[-1][2], imgs


def synthesis_section(s: rf.Setup, pipe, res: int, compare: bool, compiled: bool = True) -> tuple[float, float]:
    from vlcp.method.synthesis import Speed, speed_for

    steps, n = (3, 2) if s.quick else (50, 32)
    dev = "cuda" if s.cuda else "cpu"
    if compare:  # the old path first, in NCHW: the new one (and the latents stage) turn it channels_last in place
        plain_layout(pipe)
        old = bench_synthesis(s, pipe, res, steps, n, 1 if s.quick else 8, Speed(), "plain (old)")
    new = bench_synthesis(s, pipe, res, steps, n, n, speed_for(dev, max_batch=n), "channels_last + memory fit")
    if compare:
        runs = [("calls of 8 -> 32, channels_last", new)]
        if s.cuda and compiled:  # inductor compiles the real UNet for minutes on a CPU
            runs.append(("... + compiled UNet", bench_synthesis(s, pipe, res, steps, n, n, speed_for(dev, True, n),
                                                                "+ compiled UNet")))
        for what, res_ in runs:
            diff = np.abs(old[2].astype(int) - res_[2].astype(int))
            s.compare.append((f"img2img: {what}", old[0], res_[0], "images/s",
                              f"uint8 max abs diff {diff.max()}, {100 * (diff > 0).mean():.3f} % of values differ"))
    return new[0], new[1]


def bench_detector(s: rf.Setup) -> float:
    import torch

    from vlcp.evaluation import networks

    net = networks.build("resnet18", 3, IMAGENETTE_CLASSES, 224).to(s.device).eval()
    b = 8 if s.quick else 64
    x = torch.randn(b, 3, 224, 224, device=s.device)
    rf.reset_peak(s)

    def score():
        with torch.inference_mode():
            net(x).softmax(1)

    sec = rf.timed(s, score)
    gflops = rf.count_flops(score) / b / 1e9
    s.rows.append((f"detector (ResNet-18, instance norm) scores, batch {b}, 224 px", f"{b / sec:.1f} images/s",
                   rf.peak_gb(s), f"- (fp32, {gflops:.1f} GFLOP/image: the FP16 peak does not apply)"))
    return b / sec


# -- the estimates ----------------------------------------------------------------------------------
def estimate(rates: dict, ft_sec: dict, ipc: int = 10) -> list[tuple[str, float, float]]:
    """(stage, hours, peak GB) for `vlcp distill --data imagenette --ipc 10` from the measured rates."""
    from vlcp.method.finetune import FinetuneParams

    p = FinetuneParams()
    micro = p.micro_batches(IMAGENETTE_IMAGES)  # 8 epochs x ceil(9469 / 8) micro-batches of 8
    out = [("captions", IMAGENETTE_IMAGES / rates["captions"][0] / 3600, rates["captions"][1]),
           ("latents", IMAGENETTE_IMAGES / rates["latents"][0] / 3600, rates["latents"][1])]
    for (method, how), (sec, peak) in ft_sec.items():
        how = {True: "ckpt on", False: "ckpt off"}.get(how, how)  # or old / new / compiled (--compare)
        out.append((f"finetune {method} ({how}; {micro} micro-batches)", micro * sec / 3600, peak))
    n = ipc * IMAGENETTE_CLASSES
    out.append((f"synthesis ({n} images)", n / rates["synthesis"][0] / 3600, rates["synthesis"][1]))
    return out


def figures(s: rf.Setup, name: str, rates: dict, ft: dict) -> dict:
    """What ``--json`` writes after every section (a run cut short keeps what it measured) and ``--estimate``
    reads back: the rows, the comparisons, and the rates the estimates are made of."""
    return {"device": name, "quick": s.quick, "rows": list(s.rows), "compare": list(s.compare),
            "rates": rates, "finetune": [[m, how, sec, peak] for (m, how), (sec, peak) in ft.items()]}


def merged(paths: list[Path]) -> tuple[str, bool, dict, dict]:
    """(device, quick, rates, fine-tuning) of several ``--json`` files of one device (a run per time limit)."""
    rates, ft, devices, quick = {}, {}, set(), False
    for path in paths:
        d = json.loads(path.read_text())
        devices.add(d["device"])
        quick |= bool(d.get("quick"))
        rates.update({k: tuple(v) for k, v in d.get("rates", {}).items()})
        ft.update({(m, how): (sec, peak) for m, how, sec, peak in d.get("finetune", [])})
    if len(devices) != 1:
        raise SystemExit(f"--estimate: the files were measured on different devices: {sorted(devices)}")
    return devices.pop(), quick, rates, ft


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="reduced shapes (see the module docstring)")
    ap.add_argument("--compare", action="store_true", help="the old paths beside the new ones, with ratios")
    ap.add_argument("--skip-compiled", action="store_true",
                    help="with --compare: leave out the compiled UNet rows of fine-tuning and img2img (inductor "
                         "compiles for minutes); hf-static's compiled decode step is the new captions path and stays")
    ap.add_argument("--gpu", help="the roofline row to use (benchmarks/roofline.py) when the name does not match")
    ap.add_argument("--json", type=Path, help="write the figures here too, after every section")
    ap.add_argument("--stages", type=lambda v: v.split(","), default=STAGES,
                    help=f"comma-separated subset of {','.join(STAGES)} (a run that fits a time limit)")
    ap.add_argument("--estimate", type=Path, nargs="+", metavar="JSON",
                    help="print the `vlcp distill` estimates from the --json files of runs of parts of the stages on "
                         "one device (measures nothing)")
    a = ap.parse_args(argv)
    if a.estimate:
        name, quick, rates, ft = merged(a.estimate)
        rf.report(rf.Setup("cpu", quick, None, None), name, rates, ft, quick)
        return 0
    import torch

    from vlcp.models.loading import half_precision, torch_device

    dev = torch_device(a.device)
    if not a.quick and not half_precision(dev):
        ap.error("the real sizes need a CUDA GPU (LLaVA-7B in fp32 is 28 GB); use --quick on CPU")
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    gpu = rf.find_gpu(a.gpu or name) if (a.gpu or dev.startswith("cuda")) else None
    s = rf.Setup(dev, a.quick, torch.float16 if half_precision(dev) else torch.float32, gpu)
    mode = "REDUCED (--quick): see the docstring" if a.quick else "real sizes"
    print(f"device: {name}; {mode}; roofline row: {gpu.name if gpu else 'none'}", flush=True)
    t_all = time.perf_counter()
    rates, ft = {}, {}

    def save() -> None:
        if a.json:
            a.json.write_text(json.dumps(figures(s, name, rates, ft), indent=1))

    compiled = not a.skip_compiled
    try:
        if "captions" in a.stages:
            rates["captions"] = captions_section(s, a.compare)
            save()
        res = 64 if a.quick else 512
        pipe = build_sd(s) if {"latents", "finetune", "synthesis"} & set(a.stages) else None
        if "latents" in a.stages:
            rates["latents"] = (latents_section(s, pipe, res, a.compare), s.rows[-1][2])
            save()
        if "finetune" in a.stages:
            ft = finetune_section(s, pipe, res, a.compare, compiled)
            save()
        if "synthesis" in a.stages:
            rates["synthesis"] = synthesis_section(s, pipe, res, a.compare, compiled)
            save()
        if "detector" in a.stages:
            bench_detector(s)
    finally:  # a section that fails or a time limit's SIGTERM (turned into SystemExit) still prints the rest
        out = {**figures(s, name, rates, ft), **rf.report(s, name, rates, ft, a.quick)}
        if len(rates) == 3 and ft:
            out["estimate"] = estimate(rates, ft)
        note = "" if s.cuda else "; CPU peak = process peak RSS so far, not per stage"
        print(f"\nbenchmark wall time: {time.perf_counter() - t_all:.0f} s{note}", flush=True)
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
    return 0


def _sigterm_exits() -> None:
    """``timeout`` sends SIGTERM: exit through ``finally`` (the table so far) instead of dying silently."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))


if __name__ == "__main__":
    _sigterm_exits()
    sys.exit(main())
