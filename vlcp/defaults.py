"""Per-dataset defaults, each with where the value comes from (also printed in the README).

contamination = LOF's expected outlier share (0 skips LOF); beta = non-representative word threshold
(Eq. 2); top_k = representative words per cluster (Eq. 3); image_size = side of the saved images
(None keeps the natural size of the data).
"""
from __future__ import annotations

PAPER = "VLCP paper, Fig. 4 (best beta/top-k on ImageIDC)"
REFERENCE = "public VLCP reference run script"

DEFAULTS: dict[str, dict] = {
    "imagenette": {"contamination": 0.1, "beta": 0.7, "top_k": 30, "image_size": 256, "source": REFERENCE},
    "imagewoof": {"contamination": 0.1, "beta": 0.7, "top_k": 30, "image_size": 256,
                  "source": f"{REFERENCE} for ImageNette (no ImageWoof script published)"},
    "imageidc": {"contamination": 0.1, "beta": 0.2, "top_k": 35, "image_size": 256,
                 "source": f"{PAPER}; contamination as ImageNette"},
    "imagenet": {"contamination": 0.1, "beta": 0.2, "top_k": 35, "image_size": 224,
                 "source": f"{PAPER}; 224 px as the paper (RDED protocol)"},
    "cifar10": {"contamination": 0.0, "beta": 0.3, "top_k": 30, "image_size": 32, "source": REFERENCE},
    "cifar100": {"contamination": 0.0, "beta": 0.3, "top_k": 30, "image_size": 32,
                 "source": f"{REFERENCE} for CIFAR-10"},
    "fashion-mnist": {"contamination": 0.0, "beta": 0.3, "top_k": 30, "image_size": 28,
                      "source": "as CIFAR-10 (low resolution); natural 28 px"},
    "digits": {"contamination": 0.1, "beta": 0.2, "top_k": 35, "image_size": 8,
               "source": f"{PAPER}; natural 8 px"},
    "folder": {"contamination": 0.1, "beta": 0.2, "top_k": 35, "image_size": None,
               "source": f"{PAPER}; images keep the generated size"},
}


def defaults_for(data: str) -> dict:
    return DEFAULTS.get(data, DEFAULTS["folder"])
