"""Stage ``synthesis`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def synthesis(run: Run, step: Step) -> None:
    """img2img from each prototype latent with its prompt, per image (one seed per image). Neither the
    centres nor the images stay in memory (``vlcp.store.arrays``): they are read from the cache when used."""
    from vlcp.method import synthesis as syn
    from vlcp.store.arrays import Arrays

    p, st = step.p, run.st
    st.items = [(c, j) for c in range(len(run.folders)) for j in range(p.ipc)]
    st.syn_latents = Arrays.rows(((st.clusters[run.folders[c]], j) for c, j in st.items), "centres")
    st.texts = [st.prompts[run.folders[c]][j] for c, j in st.items]
    st.seeds = [syn.image_seed(p.seed, run.folders[c], j) for c, j in st.items]
    model = run.refs.diffusion.identity
    st.synth_params = p
    st.synth_key = lambda latent, prompt, seed: step.key(latent=latent, prompt=prompt, image_seed=seed,
                                                         finetune=st.ft_key, model=model)
    st.syn_keys = [st.synth_key(z, t, s) for z, t, s in zip(st.syn_latents.digests(), st.texts, st.seeds)]
    entries, _ = step.items(st.syn_keys, lambda idx: generate(run, idx, st.syn_latents, st.texts, st.seeds),
                            p.synthesis_batch_size, "synth", retain=False)
    run.need("output", entries)
    st.images = Arrays.stored(entries, "image")


OFF_CUDA_BATCH = 8  # a CPU-only machine on --device auto gets the CUDA default (32) of the chunk size


def generate(run: Run, idx: list[int], lat, texts: list[str], seeds: list[int]):
    """(meta, tensors) per generated image: shared by synthesis and refinement candidates. The meta
    records the image's content hash (``vlcp.store.arrays``): the stages that key images by content need not
    read it."""
    from vlcp.method import synthesis as syn
    from vlcp.store.arrays import array_hash

    p = run.st.synth_params  # the synthesis stage's keyed parameters: every key of these images holds them
    pipe = run.models["synth"]()
    # how it runs, not what it makes (unkeyed): channels_last and the memory fit on CUDA, --synthesis-compile
    cuda = pipe.device.type == "cuda"  # off CUDA nothing measures memory: at most 8 images per call
    speed = syn.speed_for(pipe.device.type, run.cfg.synthesis_compile,  # read by post_sampling and refinement too
                          max_batch=None if cuda else OFF_CUDA_BATCH)
    imgs = syn.sample(pipe, np.stack([lat[i] for i in idx]), [texts[i] for i in idx], [seeds[i] for i in idx],
                      syn.Sampling(p.negative_prompt, p.strength, p.guidance_scale, p.steps, p.long_prompts), speed)
    return (({"prompt": texts[i], "seed": seeds[i], "hashes": {"image": array_hash(im)}}, {"image": im})
            for i, im in zip(idx, imgs))


SYNTHESIS_PARAMS = ("negative_prompt", "strength", "guidance_scale", "steps", "long_prompts", "seed")


# last. output ---------------------------------------------------------------------------------------
