"""What a real ``vlcp distill`` needs before it starts: downloads, GPU memory, time.

``vlcp distill --dry-run`` prints it for the chosen settings, and the README states it for its real
command (tests/test_readme_claims.py keeps the two equal). Every figure is an estimate from the
real-shape benchmark of docs/measurements.md (random weights of the real architectures, fp16, one
NVIDIA H200; tests/test_readme_claims.py checks the rates against that page) and the models'
published sizes; nothing here imports torch or touches the network.
"""
from __future__ import annotations

import math
from pathlib import Path

# downloads (GB = 1e9 bytes): the files vlcp loads (docs/cache.md, "Models")
MODEL_GB = {"llava-hf/llava-1.5-7b-hf": 14.1,  # 7.06e9 parameters in fp16 (vlcp.models.loading.CAPTIONER_BYTES)
            "stable-diffusion-v1-5/stable-diffusion-v1-5": 4.3,  # the `hf download --include` list of docs/cache.md
            "openai/clip-vit-base-patch32": 0.6,  # 151 M parameters in fp32
            "CIDAS/clipseg-rd64-refined": 0.6}  # 150.7 M parameters in fp32
DATA_GB = {"imagenette": 0.34}  # imagenette2-320.tgz: 341,663,724 bytes
# training images of the named datasets, for a plan made before the data is downloaded
TRAIN_IMAGES = {"imagenette": 9469, "imagewoof": 9025, "cifar10": 50000, "cifar100": 50000, "digits": 1438,
                "fashion-mnist": 60000, "imagenet": 1281167, "imageidc": 13000}
CLASSES = {"imagenette": 10, "imagewoof": 10, "cifar10": 10, "cifar100": 100, "digits": 10, "fashion-mnist": 10,
           "imagenet": 1000, "imageidc": 10}

# docs/measurements.md, "Real model shapes" (NVIDIA H200, fp16): rate, peak GPU memory in GB
CAPTIONS = {8: (1.46, 17.8), 16: (3.08, 21.5), 32: (5.53, 28.9)}  # captions/s at 256 new tokens, greedy
CAPTION_TOKENS = 256
LATENTS = (66.98, 8.7)  # images/s, VAE encode at 512 px, batch 16
FINETUNE = {("full", True): (0.30, 23.0), ("full", False): (0.18, 27.9),  # s per micro-batch of 8, 512 px
            ("lora", True): (0.30, 6.2), ("lora", False): (0.17, 13.3)}  # (method, gradient checkpointing)
SYNTHESIS = (3.95, 7.3)  # images/s, img2img batch 8, 512 px, 50 steps x strength 0.7
SYNTHESIS_STEPS = 50 * 0.7
DETECTOR_GB = 2.8
SOURCE = "estimates from docs/measurements.md: real shapes on one NVIDIA H200, fp16"


def needs(cfg, images: int | None, classes: int | None, stages: list[str]) -> list[str]:
    """The lines to print for ``cfg`` (a DistillConfig), given the training images and classes it will read
    (None: unknown) and the names of the stages it runs (``--until`` cuts the list)."""
    if cfg.tiny:
        return ["What this run needs: no download and no GPU (--tiny: tiny random models built offline)."]
    runs = set(stages)
    captioning = "captions" in runs and (not cfg.captions_from or cfg.missing_captions == "caption")
    finetuning = "finetune" in runs and cfg.finetune
    downloads = []
    if captioning:
        downloads.append(cfg.captioner or "llava-hf/llava-1.5-7b-hf")
    if runs & {"latents", "finetune", "synthesis"}:
        downloads.append(cfg.diffusion or "stable-diffusion-v1-5/stable-diffusion-v1-5")
    if cfg.post_sample == "sas" or cfg.min_caption_match is not None:
        downloads.append(cfg.clip or "openai/clip-vit-base-patch32")
    if cfg.object_masks or cfg.min_foreground is not None:
        downloads.append(cfg.segmenter or "CIDAS/clipseg-rd64-refined")
    from vlcp.data.datasets import KNOWN

    if getattr(KNOWN.get(cfg.data), "url", None):  # a named dataset vlcp downloads: listed, sized or not
        downloads.append(cfg.data)
    sized = [(name, MODEL_GB.get(name)) for name in downloads if name != cfg.data] + [(cfg.data, DATA_GB.get(cfg.data))]
    parts = [f"{name} {gb:.2f} GB" if gb and gb < 1 else f"{name} {gb:.1f} GB" if gb else
             f"{name} ({'local' if Path(name).expanduser().exists() else 'size not known here'})"
             for name, gb in sized if gb or name in downloads]
    total = sum(gb for _, gb in sized if gb)
    lines = [f"What this run needs ({SOURCE}):",
             f"  downloads: {total:.1f} GB, once (then cached): {', '.join(parts) or 'none'}"]
    memory = _memory(cfg, runs, captioning, finetuning)
    if memory:
        peak = max(memory, key=lambda m: m[0])
        lines.append(f"  GPU memory: peak {peak[0]:.1f} GB, {peak[1]} (each model is released after its stages)")
    return lines + _time(cfg, images, classes, runs, captioning, finetuning)


def count_images(cfg) -> tuple[int | None, int | None]:
    """(training images, classes) the run reads, without reading an image: the known sizes of named datasets,
    a listing of an ImageFolder; ``--classes`` and ``--max-per-class`` make it an upper bound."""
    images, classes = TRAIN_IMAGES.get(cfg.data), CLASSES.get(cfg.data)
    if cfg.data not in TRAIN_IMAGES:
        from vlcp.data.images import IMG_EXTENSIONS

        root = Path(cfg.data)
        if (root / "train").is_dir() and not any(f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                                                 for f in root.iterdir()):
            root = root / "train"  # as load_dataset reads a folder: its train/ split, e.g. a set vlcp wrote
        from vlcp.data.images import is_class_dir

        dirs = [d for d in root.iterdir() if is_class_dir(d)] if root.is_dir() else []
        images = sum(1 for d in dirs for f in d.iterdir() if f.suffix.lower() in IMG_EXTENSIONS) or None
        classes = len(dirs) or None
    if cfg.classes and images and classes:
        images, classes = math.ceil(images * len(cfg.classes) / classes), len(cfg.classes)
    if cfg.max_per_class and images and classes:
        images = min(images, classes * cfg.max_per_class)
    return images, classes


def _caption_batch(cfg) -> int:
    """The measured batch nearest below the run's (32 on a GPU of >= 40 GB when left to vlcp)."""
    b = cfg.caption_batch_size or 32
    return max([k for k in CAPTIONS if k <= b] or [8])


def _reference(cfg) -> bool:
    return getattr(cfg, "caption_mode", "greedy") == "reference"


def _memory(cfg, runs: set[str], captioning: bool, finetuning: bool) -> list[tuple[float, str]]:
    out = []
    if captioning and _reference(cfg):
        out.append((CAPTIONS[8][1], "captions, measured at batch 8"))
    elif captioning:
        b = _caption_batch(cfg)
        out.append((CAPTIONS[b][1], f"captions, batch {b}"))
    if "latents" in runs:
        out.append((LATENTS[1], "VAE encode"))
    if finetuning:
        ckpt = cfg.gradient_checkpointing is not False  # None: on where the memory needs it, so this is the least
        how = "on" if cfg.gradient_checkpointing else "off" if cfg.gradient_checkpointing is False else \
            "on; off where more memory is free"
        out.append((FINETUNE[cfg.finetune_method, ckpt][1], f"fine-tuning, {cfg.finetune_method}, gradient "
                                                            f"checkpointing {how}"))
    if "synthesis" in runs:
        out.append((SYNTHESIS[1], "img2img"))
    if "detector" in runs and cfg.refine:
        out.append((DETECTOR_GB, "detector"))
    return out


def _time(cfg, images: int | None, classes: int | None, runs: set[str], captioning: bool,
          finetuning: bool) -> list[str]:
    if images is None:
        return ["  time: unknown until the images are listed"]
    parts = []
    seconds = 0.0
    if captioning:
        tokens = cfg.caption_max_tokens or (1024 if _reference(cfg) else CAPTION_TOKENS)
        if _reference(cfg):  # priced one image per call (a decoding step costs what batch 8's does, bound by the
            # weights): the batched seeded sampling is not measured on a GPU yet, so this stays the most it can take
            s = images * tokens * 8 / CAPTIONS[8][0] / CAPTION_TOKENS
            what = (f"priced one image per call, up to {tokens} new tokens each; batched sampling and shorter "
                    "captions cost less")
        else:
            b = _caption_batch(cfg)
            s = images / CAPTIONS[b][0] * tokens / CAPTION_TOKENS
            what = f"batch {b}, up to {tokens} new tokens each"
        parts.append(f"captions: at most {_hours(s)} ({what})")
        seconds += s
    if "latents" in runs:
        s = images / LATENTS[0]
        parts.append(f"latents: {_hours(s)}")
        seconds += s
    if finetuning:
        ckpt = cfg.gradient_checkpointing is not False
        micro = (cfg.finetune_epochs or 8) * math.ceil(images / cfg.finetune_batch_size)
        if cfg.finetune_max_steps:
            micro = min(micro, cfg.finetune_max_steps * cfg.finetune_accumulation)
        s = micro * FINETUNE[cfg.finetune_method, ckpt][0] * cfg.finetune_batch_size / 8
        parts.append(f"fine-tuning: {_hours(s)} ({micro:,} micro-batches of {cfg.finetune_batch_size})")
        seconds += s
    if "synthesis" in runs and classes:
        n = classes * cfg.ipc * (cfg.pool_multiplier if cfg.post_sample == "sas" and "pool" in runs else 1)
        s = n / SYNTHESIS[0] * cfg.steps * cfg.strength / SYNTHESIS_STEPS
        parts.append(f"synthesis: {_hours(s)} ({n:,} images)")
        seconds += s
    if cfg.refine and "refinement" in runs:
        parts.append("refinement: not estimated")
    bound = "at most" if captioning else "about"
    return [f"  time on one H200 for {images:,} images: {bound} {_hours(seconds)}"] + [f"    {p}" for p in parts]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60 else \
        f"{seconds:.0f} s"
