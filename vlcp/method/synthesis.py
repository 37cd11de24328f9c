"""Stage ``synthesis``: img2img from each image prototype with its text prototype (paper, Eq. 6).

The prototype latent goes to the pipeline *as a latent* (already multiplied by the VAE scaling
factor), so diffusers noises it to the timestep that ``strength`` selects and denoises it; it is
never decoded and re-encoded. Every image has its own generator seeded from (seed, class, cluster), so
the pixels do not depend on batch size or order.

Prompts are never cut at CLIP's 77 tokens. Two encodings (``long_prompts``):

- ``reference`` (default), as the reference's ``03_distiilation/gen_syn_image.py:get_pipeline_embeds``:
  the whole prompt is tokenised once (one BOS at the start, one EOS at the end), the negative prompt is
  padded with the pad token to the same length, and the ids are cut into 77-token windows that are
  encoded separately and concatenated: later windows start without BOS, and the last window is not
  padded, so a 10-token prompt gives a 10-token context (not 77). Images whose contexts differ in
  length are denoised in separate pipeline calls.
- ``chunked`` (vlcp 0.x): 75-token chunks, each wrapped in BOS/EOS and padded to 77; a short prompt
  gives exactly the pipeline's own 77-token encoding.

How the pipeline runs is a ``Speed`` (issue 25), never what it makes beyond float rounding: at most
``max_batch`` images per call, fewer on CUDA when the free memory holds fewer (the peak of one image is
measured on the first call), channels_last UNet and VAE, optionally a compiled UNet. ``Speed()`` is the plain
path; tests/test_throughput.py compares the two on the tiny model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlcp.store.cache import stable_hash

VERSION = 2  # 2: reference long-prompt encoding by default
NEGATIVE_PROMPT = "cartoon, anime, painting"
LONG_PROMPTS = ("reference", "chunked")


@dataclass(frozen=True)
class Sampling:
    """How each image is denoised: everything that changes its pixels besides latent, prompt and seed."""
    negative_prompt: str = NEGATIVE_PROMPT
    strength: float = 0.7
    guidance_scale: float = 10.0
    steps: int = 50
    long_prompts: str = "reference"


def image_seed(seed: int, class_folder: str, index: int) -> int:
    return int(stable_hash([seed, class_folder, index], 15), 16)


def _check(mode: str) -> None:
    if mode not in LONG_PROMPTS:
        raise ValueError(f"unknown long-prompt mode {mode!r}; known: {', '.join(LONG_PROMPTS)}")


def chunk_ids(tokenizer, texts: list[str], mode: str = "reference") -> list[list[list[int]]]:
    """Token ids per text in windows. reference: the full ids (BOS ... EOS) cut every 77 tokens;
    chunked: the ids without BOS/EOS cut every 75 tokens (``id_rows`` wraps them)."""
    _check(mode)
    if mode == "reference":
        width = tokenizer.model_max_length
        ids = tokenizer(texts, truncation=False, verbose=False).input_ids
    else:
        width = tokenizer.model_max_length - 2
        ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [[t[i:i + width] for i in range(0, len(t), width)] or [[]] for t in ids]


def context_length(tokenizer, text: str, mode: str = "reference") -> int:
    """Tokens in the text's conditioning: reference: its ids with BOS/EOS; chunked: 77 per chunk."""
    windows = chunk_ids(tokenizer, [text], mode)[0]
    return sum(len(w) for w in windows) if mode == "reference" else tokenizer.model_max_length * len(windows)


def id_rows(tokenizer, text: str, length: int, mode: str = "reference") -> list[list[int]]:
    """The exact id rows the text encoder sees for ``text`` in a context of ``length`` tokens."""
    width = tokenizer.model_max_length
    if mode == "reference":
        ids = [i for w in chunk_ids(tokenizer, [text], mode)[0] for i in w]
        ids = ids + [tokenizer.pad_token_id] * (length - len(ids))  # the shorter of prompt / negative is padded
        return [ids[i:i + width] for i in range(0, len(ids), width)]
    chunks = chunk_ids(tokenizer, [text], mode)[0]
    chunks = chunks + [[]] * (length // width - len(chunks))
    rows = [[tokenizer.bos_token_id] + c + [tokenizer.eos_token_id] for c in chunks]
    return [r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows]


def encode_prompts(pipe, texts: list[str], length: int, mode: str = "reference"):
    """(len(texts), length, dim) CLIP embeddings, every text in a context of ``length`` tokens."""
    import torch

    out = []
    with torch.inference_mode():
        for text in texts:
            rows = id_rows(pipe.tokenizer, text, length, mode)
            ids = [torch.tensor([r], device=pipe.text_encoder.device) for r in rows]
            out.append(torch.cat([pipe.text_encoder(i)[0] for i in ids], dim=1))
    return torch.cat(out).to(pipe.unet.dtype)


def generate(pipe, latents: np.ndarray, prompts: list[str], seeds: list[int], negative_prompt: str, strength: float,
             guidance_scale: float, steps: int) -> np.ndarray:
    """``sample`` with the default (reference) long-prompt encoding; kept for existing callers."""
    return sample(pipe, latents, prompts, seeds, Sampling(negative_prompt, strength, guidance_scale, steps))


@dataclass(frozen=True)
class Speed:
    """How ``sample`` runs: the images are the same within float rounding (vlcp keys none of this)."""
    channels_last: bool = False  # UNet and VAE in channels_last (NHWC): the layout cuDNN's fast kernels use
    compile: str | None = None  # torch.compile backend of the UNet (None: eager)
    max_batch: int | None = None  # images per pipeline call at most (None: all those given)
    fit_memory: bool = False  # CUDA: fewer per call when the free memory holds fewer


def speed_for(device_type: str, compile_unet: bool = False, max_batch: int | None = None) -> Speed:
    """What ``vlcp distill`` runs: channels_last and the memory fit on CUDA; inductor when asked."""
    cuda = device_type == "cuda"
    return Speed(channels_last=cuda, compile="inductor" if compile_unet else None, max_batch=max_batch,
                 fit_memory=cuda)


def synthesis_batch_size(free_bytes: float, image_bytes: float, cap: int, headroom: float = 0.8) -> int:
    """Images per call whose measured peak (``image_bytes`` each) fits ``headroom`` of the free memory, 1 to cap."""
    return max(1, min(cap, int(free_bytes * headroom // image_bytes)))


def prepare(pipe, speed: Speed) -> None:
    """Memory layout and compilation, once per pipeline (in place: later calls reuse the compiled UNet)."""
    import torch

    done = getattr(pipe, "_vlcp_prepared", set())
    if speed.channels_last and "channels_last" not in done:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        done = done | {"channels_last"}
    if speed.compile and "compile" not in done:
        pipe.unet.compile(backend=speed.compile)  # inductor's default mode: no autotuning, no CUDA graphs
        done = done | {"compile"}
    pipe._vlcp_prepared = done


def _free_bytes(device) -> float:
    """Free GPU memory, counting what the caching allocator holds but does not use."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _per_call(pipe, speed: Speed, left: int, shape: tuple) -> int:
    """Images in the next call: up to ``max_batch``; with ``fit_memory`` one until an image's peak is known."""
    n = min(left, speed.max_batch or left)
    if not speed.fit_memory:
        return n
    per = getattr(pipe, "_vlcp_image_bytes", {}).get(shape)
    return 1 if per is None else synthesis_batch_size(_free_bytes(pipe.device), per, n)


def _measure(pipe, shape: tuple, call):
    """Run ``call`` (one image) and record its peak GPU memory above what was allocated before."""
    import torch

    dev = pipe.device
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    res = call()
    torch.cuda.synchronize(dev)
    pipe._vlcp_image_bytes = {**getattr(pipe, "_vlcp_image_bytes", {}),
                              shape: max(torch.cuda.max_memory_allocated(dev) - before, 1)}
    return res


def sample(pipe, latents: np.ndarray, prompts: list[str], seeds: list[int], s: Sampling,
           speed: Speed | None = None) -> np.ndarray:
    """uint8 images (N, H, W, 3) at the model's resolution, in the order of ``prompts``."""
    import torch

    speed = speed or Speed()
    prepare(pipe, speed)
    tok = pipe.tokenizer
    neg = context_length(tok, s.negative_prompt, s.long_prompts)
    lengths = [max(context_length(tok, p, s.long_prompts), neg) for p in prompts]
    if s.long_prompts == "chunked":  # one context length for the whole batch, as vlcp always did
        lengths = [max(lengths)] * len(prompts)
    out = np.zeros((len(prompts),), dtype=object)
    for length in sorted(set(lengths)):
        idx = [i for i, n in enumerate(lengths) if n == length]
        emb = encode_prompts(pipe, [prompts[i] for i in idx], length, s.long_prompts)
        neg_emb = encode_prompts(pipe, [s.negative_prompt] * len(idx), length, s.long_prompts)
        done = 0
        while done < len(idx):
            n = _per_call(pipe, speed, len(idx) - done, latents.shape[1:])
            part = idx[done:done + n]
            image = torch.from_numpy(np.ascontiguousarray(latents[part])).to(pipe.unet.device, pipe.unet.dtype)
            generators = [torch.Generator("cpu").manual_seed(seeds[i]) for i in part]

            def call(e=emb[done:done + n], ne=neg_emb[done:done + n], image=image, generators=generators):
                return pipe(prompt_embeds=e, negative_prompt_embeds=ne, image=image, strength=s.strength,
                            guidance_scale=s.guidance_scale, num_inference_steps=s.steps, generator=generators,
                            output_type="np")

            measure = speed.fit_memory and latents.shape[1:] not in getattr(pipe, "_vlcp_image_bytes", {})
            res = _measure(pipe, latents.shape[1:], call) if measure else call()
            for i, im in zip(part, res.images):
                out[i] = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
            done += n
    return np.stack(list(out))
