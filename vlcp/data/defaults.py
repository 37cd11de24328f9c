"""Per-dataset defaults, each with the file or figure it comes from (also printed in docs/stages.md).

contamination = LOF's expected outlier share (0 skips LOF); beta = non-representative word threshold
(Eq. 2); top_k = representative words per cluster (Eq. 3); image_size = side of the saved images
(None keeps the natural size of the data); finetune_resolution = pixel side of the centre crops the
diffusion model is fine-tuned on (``--finetune-data center-crop-pairs``; None: the latents' resolution,
512 for SD v1.5, as the ImageNette script's ``--resolution=512``). Paths are in the public VLCP reference
repository (zou-yawen/Dataset-Distillation-via-Vision-Language-Category-Prototype).
"""
from __future__ import annotations

FIG4 = "VLCP paper, Fig. 4 (best beta 0.2 / top-k 35 on ImageIDC)"
NETTE = "run_nette.sh and README (gen_prototype.py --contamination 0.1 --threshold 0.7 --tpk 30; saved 256 px)"
CIFAR10 = ("run_cifar10.sh (gen_prototype.py --contamination 0.0 --threshold 0.3 --tpk 30; gen_syn_image.py saves "
           "32 px; train_text_to_image.py --resolution=32 --center_crop --random_flip, l. 5)")
CIFAR_FT = ("fine-tuned at 32 px: 02_diffusion_model_training/cifar100_dm.sh l. 3 (--resolution=32; its TRAIN_DIR "
            "is CIFAR10/train, a copy of run_cifar10.sh l. 5: no CIFAR-100 command is published)")
CIFAR100 = ("04_evaluation/RDED/cifar100_10ipc_resnet-18-modified_to_resnet-18-modified_cr5.sh: its folders are "
            "named distilled_data-cifar100-cifar100-ipc10-0.2-30-con_0.0 (no generation command is published)")
IMAGENET = ("04_evaluation/RDED/imagenet-1k_10ipc_resnet-18_to_resnet-18_cr5.sh: folders "
            "distilled_data-imagenet-1K-ipc10-0.7-30; gen_syn_image.py saves 224 px for Image1K")

DEFAULTS: dict[str, dict] = {  # a row without finetune_resolution fine-tunes at the latents' resolution
    "imagenette": {"contamination": 0.1, "beta": 0.7, "top_k": 30, "image_size": 256, "source": NETTE},
    "imagewoof": {"contamination": 0.1, "beta": 0.7, "top_k": 30, "image_size": 256,
                  "source": f"as ImageNette ({NETTE}); no ImageWoof script is published"},
    "imageidc": {"contamination": 0.1, "beta": 0.2, "top_k": 35, "image_size": 256,
                 "source": f"{FIG4}; contamination and 256 px as ImageNette"},
    "imagenet": {"contamination": 0.1, "beta": 0.7, "top_k": 30, "image_size": 224,
                 "source": f"{IMAGENET}; contamination as ImageNette (not in the folder names)"},
    "cifar10": {"contamination": 0.0, "beta": 0.3, "top_k": 30, "image_size": 32, "finetune_resolution": 32,
                "source": f"{CIFAR10}; its output names say 0.7-30 and its evaluation reads a 0.9-30 folder, "
                          "the command line says 0.3"},
    "cifar100": {"contamination": 0.0, "beta": 0.2, "top_k": 30, "image_size": 32, "finetune_resolution": 32,
                 "source": f"{CIFAR100}; {CIFAR_FT}"},
    "fashion-mnist": {"contamination": 0.0, "beta": 0.3, "top_k": 30, "image_size": 28,
                      "source": "vlcp's choice: as CIFAR-10 (low resolution); natural 28 px"},
    "digits": {"contamination": 0.1, "beta": 0.2, "top_k": 35, "image_size": 8,
               "source": f"vlcp's choice: {FIG4}; natural 8 px"},
    "folder": {"contamination": 0.1, "beta": 0.2, "top_k": 35, "image_size": None,
               "source": f"vlcp's choice: {FIG4}; images keep the generated size"},
}


def defaults_for(data: str) -> dict:
    return DEFAULTS.get(data, DEFAULTS["folder"])
