"""DM's and DC's distances (mean-embedding and per-layer gradient matching, as in the DC/DM reference
code) and the siamese DSA that applies one augmentation to real and synthetic batches alike."""
from __future__ import annotations

import math


def dm_loss(real_emb: list, syn_emb: list):
    """Σ_c ||mean(real_c) - mean(syn_c)||²: per class, embeddings (n, d) of real and synthetic images."""
    return sum(((r.mean(0) - s.mean(0)) ** 2).sum() for r, s in zip(real_emb, syn_emb))


def layer_distance(g_real, g_syn):
    """DC's ``distance_wb``: Σ over output channels of 1 - cos; vectors (biases, norms) give 0."""
    if g_real.dim() == 1:
        return g_real.new_zeros(())
    gr, gs = g_real.reshape(g_real.shape[0], -1), g_syn.reshape(g_syn.shape[0], -1)
    return (1 - (gr * gs).sum(-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 1e-6)).sum()


def match_distance(g_real: list, g_syn: list):
    """DC's ``match_loss`` with ``dis_metric='ours'``: the layer distances summed."""
    return sum(layer_distance(r, s) for r, s in zip(g_real, g_syn))


# -- siamese DSA ----------------------------------------------------------------------------------
def siamese_dsa(g):
    """Draw one DSA family and one parameter set; return a function applying it to any batch.

    vlcp.evaluation.augment.dsa draws per-image parameters (the evaluation's use); distillation needs the same
    transformation on the real batch and the synthetic images, as the reference's batch mode does.
    """
    import torch
    import torch.nn.functional as F

    from vlcp.evaluation.augment import DSA, DSA_FAMILIES

    family = DSA_FAMILIES[int(torch.randint(len(DSA_FAMILIES), (1,), generator=g))]
    r = torch.rand(3, generator=g).tolist()

    def apply(x):
        h, w = x.shape[2], x.shape[3]
        if family == "color":
            x = x + (r[0] - 0.5) * DSA["brightness"]
            m = x.mean(1, keepdim=True)
            x = (x - m) * (r[1] * DSA["saturation"]) + m
            m = x.mean((1, 2, 3), keepdim=True)
            return (x - m) * (r[2] + DSA["contrast"]) + m
        if family == "flip":
            return x.flip(3) if r[0] < 0.5 else x
        if family in ("scale", "rotate"):
            if family == "scale":
                lo, hi = 1 / DSA["scale"], DSA["scale"]
                theta = [[r[0] * (hi - lo) + lo, 0.0, 0.0], [0.0, r[1] * (hi - lo) + lo, 0.0]]
            else:
                a = (r[0] - 0.5) * 2 * DSA["rotate"] / 180 * math.pi
                theta = [[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]]
            t = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
            return F.grid_sample(x, F.affine_grid(t, list(x.shape), align_corners=True), align_corners=True)
        if family == "crop":  # translation by up to 12.5%, zero padding
            sh, sw = int(h * DSA["crop"] + 0.5), int(w * DSA["crop"] + 0.5)
            ty, tx = int(r[0] * (2 * sh + 1)) - sh, int(r[1] * (2 * sw + 1)) - sw
            return F.pad(x, (sw, sw, sh, sh))[:, :, sh + ty:sh + ty + h, sw + tx:sw + tx + w]
        ch, cw = int(h * DSA["cutout"] + 0.5), int(w * DSA["cutout"] + 0.5)  # cutout: half-side square
        cy, cx = int(r[0] * (h + 1 - ch % 2)), int(r[1] * (w + 1 - cw % 2))
        keep = torch.ones(h, w, dtype=x.dtype, device=x.device)
        keep[max(cy - ch // 2, 0):max(cy - ch // 2 + ch, 0), max(cx - cw // 2, 0):max(cx - cw // 2 + cw, 0)] = 0
        return x * keep

    return apply
