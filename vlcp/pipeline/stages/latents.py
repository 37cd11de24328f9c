"""Stages ``latents`` and ``training_latents`` of ``vlcp distill`` (see the table); their rows are in
``vlcp/pipeline/table.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlcp.pipeline.run import Run, Step


def latents(run: Run, step: Step) -> None:
    """VAE encoding (posterior mean x scaling factor) at the model's resolution, per image."""
    from vlcp.method import latents as latents_mod

    p, st = step.p, run.st
    st.lat_keys = [step.key(image=s.digest, vae=run.refs.diffusion.identity, resolution=run.resolution)
                   for s in st.samples]

    def compute(idx):
        z = latents_mod.encode_images(run.models["vae"](), [st.samples[i].load() for i in idx], run.resolution,
                                      p.crop)
        return (({}, {"latent": zi}) for zi in z)

    # not retained: the stages that use latents read them back one class at a time (Entry.read)
    st.lat_entries, _ = step.items(st.lat_keys, compute, p.latent_batch_size, "vae", retain=False)


def training_latents(run: Run, step: Step) -> None:
    """The fine-tuning data as the reference feeds it (``--finetune-data center-crop-pairs``): per image,
    the latents of its centre crop at the fine-tuning resolution and of that crop's mirror."""
    from vlcp.method import latents as latents_mod

    p, st = step.p, run.st
    st.train_resolution = p.finetune_resolution or run.resolution  # None: the prototype latents' resolution
    st.train_keys = [step.key(image=s.digest, vae=run.refs.diffusion.identity, resolution=st.train_resolution)
                     for s in st.samples]

    def compute(idx):
        z = latents_mod.encode_training_pairs(run.models["vae"](), [st.samples[i].load() for i in idx],
                                              st.train_resolution)
        return (({}, {"pair": zi}) for zi in z)

    # not retained: fine-tuning reads one micro-batch at a time (finetune.Rows)
    st.train_entries, _ = step.items(st.train_keys, compute, p.latent_batch_size, "vae", retain=False)
