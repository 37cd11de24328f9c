"""Stage ``synthesis``: img2img from each image prototype with its text prototype (paper, Eq. 6).

The prototype latent goes to the pipeline *as a latent* (already multiplied by the VAE scaling
factor), so diffusers noises it to the timestep that ``strength`` selects and denoises it; it is
never decoded and re-encoded. Prompts longer than CLIP's 77 tokens are encoded in 75-token chunks
(each wrapped in BOS/EOS) whose embeddings are concatenated, as the reference code does, instead of
being cut. Every image has its own generator seeded from (seed, class, cluster), so the pixels do not
depend on batch size or order.
"""
from __future__ import annotations

import numpy as np

from vlcp.cache import stable_hash

VERSION = 1
NEGATIVE_PROMPT = "cartoon, anime, painting"


def image_seed(seed: int, class_folder: str, index: int) -> int:
    return int(stable_hash([seed, class_folder, index], 15), 16)


def chunk_ids(tokenizer, texts: list[str]) -> list[list[list[int]]]:
    """Token ids per text, split into chunks of (max_length - 2) without BOS/EOS."""
    width = tokenizer.model_max_length - 2
    ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [[t[i:i + width] for i in range(0, len(t), width)] or [[]] for t in ids]


def encode_prompts(pipe, texts: list[str], n_chunks: int):
    """(len(texts), n_chunks * 77, dim) CLIP embeddings; short prompts match the pipeline's own encoding."""
    import torch

    tok = pipe.tokenizer
    length = tok.model_max_length
    rows = []
    for chunks in chunk_ids(tok, texts):
        chunks = chunks + [[]] * (n_chunks - len(chunks))
        for c in chunks:
            row = [tok.bos_token_id] + c + [tok.eos_token_id]
            rows.append(row + [tok.pad_token_id] * (length - len(row)))
    ids = torch.tensor(rows, device=pipe.text_encoder.device)
    with torch.inference_mode():
        emb = pipe.text_encoder(ids)[0]
    return emb.reshape(len(texts), n_chunks * length, -1).to(pipe.unet.dtype)


def generate(pipe, latents: np.ndarray, prompts: list[str], seeds: list[int], negative_prompt: str, strength: float,
             guidance_scale: float, steps: int) -> np.ndarray:
    """uint8 images (N, H, W, 3) at the model's resolution."""
    import torch

    n_chunks = max(len(c) for c in chunk_ids(pipe.tokenizer, prompts + [negative_prompt]))
    device = pipe.unet.device
    prompt_embeds = encode_prompts(pipe, prompts, n_chunks)
    negative_embeds = encode_prompts(pipe, [negative_prompt] * len(prompts), n_chunks)
    image = torch.from_numpy(np.ascontiguousarray(latents)).to(device, pipe.unet.dtype)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=image, strength=strength,
               guidance_scale=guidance_scale, num_inference_steps=steps, generator=generators, output_type="np")
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
