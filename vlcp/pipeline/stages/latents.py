"""Stage ``latents`` of ``vlcp distill`` (see the table); its row is in ``vlcp/pipeline/table.py``."""
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
