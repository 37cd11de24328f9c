"""The stage table of ``vlcp distill``: every stage, in order, with what it reads and what its key holds.

A stage is a function ``(run, step)`` that reads the configuration only through ``step.p`` (its
declared fields), builds its key with ``step.key(...)`` (declared ``params`` by value + the inputs it
names: upstream keys, content hashes, model identities) and hands compute functions to
``step.whole`` / ``step.items`` (the cache). ``selects`` are fields that choose *which* items exist
(each item's key says what it is); ``unkeyed`` fields cannot change a result (batch sizes).
Algorithm bodies live in their own modules; this file is the wiring. No torch import here.
"""
from __future__ import annotations

from vlcp.method import clusters as clusters_mod
from vlcp.method import finetune as ft
from vlcp.method import latents as latents_mod
from vlcp.method import outliers as outliers_mod
from vlcp.method import prompts as prompts_mod
from vlcp.models import captioner as captions_mod
from vlcp.pipeline.stage import Stage
from vlcp.pipeline.stages import caption_match as cm
from vlcp.pipeline.stages import masks as ms
from vlcp.pipeline.stages import post_sampling as sas_stages
from vlcp.pipeline.stages import refinement as rs
from vlcp.pipeline.stages.captions import captions
from vlcp.pipeline.stages.clusters import clusters
from vlcp.pipeline.stages.finetune import finetune
from vlcp.pipeline.stages.images import images
from vlcp.pipeline.stages.latents import latents, training_latents
from vlcp.pipeline.stages.outliers import outliers
from vlcp.pipeline.stages.output import output
from vlcp.pipeline.stages.prompts import prompts
from vlcp.pipeline.stages.synthesis import SYNTHESIS_PARAMS, synthesis
from vlcp.pipeline.stages.text_prototypes import text_prototypes

IMAGES_VERSION = 1


def _stages() -> list[Stage]:
    cap_v, lat_v, ft_v = captions_mod.VERSION, 1, ft.VERSION
    return [
        Stage("images", images, IMAGES_VERSION, "decodes every image once; unreadable files are skipped and listed "
              "in the manifest", "image", inputs="image content hash"),
        Stage("captions", captions, cap_v, "LLaVA description with the reference's question; `--caption-mode "
              "reference` (default): LLaVA's `llava_v1` conversation, sampling at temperature 0.2 seeded per image "
              "(one generator per row of a batch), as the reference's `model_vqa.py`; `greedy`: batched greedy "
              "decoding", "image",
              ("caption_prompt", "caption_max_tokens"),
              selects=("captions_from", "missing_captions", "caption_mode", "caption_seed"),
              unkeyed=("caption_batch_size", "caption_engine", "device"),
              inputs="image hash, class name, captioner id@commit, decoding (`--caption-mode`, and `--caption-seed` "
                     "when sampling) (or the `--captions-from` file's hash)",
              models=("captioner",)),
        Stage("latents", latents, lat_v, "VAE encoding at the model's resolution (512 for SD v1.5), x "
              "`scaling_factor`", "image", ("crop",), unkeyed=("latent_batch_size",),
              inputs="image hash, VAE id@commit, resolution", models=("vae",)),
        *ms.mask_stages(),
        Stage("outliers", outliers, outliers_mod.VERSION, "LOF per class (`n_neighbors=10`, `--contamination`)",
              params=("contamination", "ipc", "object_masks"), inputs="latent keys per class (and mask keys "
              "with `--object-masks`)"),
        Stage("clusters", clusters, clusters_mod.VERSION, "K-Means per class (`k = IPC`, `n_init=10`, `--seed`); "
              "centres = image prototypes", "class", params=("ipc", "seed", "allow_duplicates", "object_masks"),
              inputs="outliers key, class folder"),
        Stage("text_prototypes", text_prototypes, 2, "Algorithm 2: non-representative words N (Eq. 2), top-k "
              "words R_w (Eq. 3), best caption (Eq. 4-5); as the reference code computes it (`--text-prototypes "
              "reference`, the default) or as the paper states it (`paper`)",
              params=("text_prototypes", "beta", "top_k", "clean_captions"),
              inputs="clusters key, caption keys and files of the inliers, class names"),
        Stage("prompts", prompts, prompts_mod.VERSION, "the conditioning text per cluster, by `--text-strategy`",
              params=("text_strategy",), inputs="text prototypes key, LLM id@commit", models=("llm",)),
        Stage("training_latents", training_latents, latents_mod.TRAINING_VERSION, "the fine-tuning data as the "
              "reference's `train_text_to_image.py --center_crop --random_flip` sees it: VAE encodings of the "
              "centre crop (bilinear Resize + CenterCrop) and of its mirror", "image", selects=("finetune_resolution",),
              unkeyed=("latent_batch_size",),
              inputs="image hash, VAE id@commit, fine-tuning resolution (`--finetune-resolution`; per dataset)",
              models=("vae",), enabled_by="finetune_pairs"),
        Stage("finetune", finetune, ft_v, "fine-tunes the UNet (or a LoRA adapter) on all (latent, caption) pairs "
              "with Eq. 1 (Algorithm 1, step 3)",
              params=("finetune_method", "finetune_epochs", "finetune_batch_size", "finetune_lr",
                      "finetune_max_steps", "finetune_lora_rank", "finetune_ema", "finetune_ema_decay",
                      "finetune_max_grad_norm", "finetune_accumulation", "finetune_flip", "finetune_data",
                      "clean_captions", "seed"), selects=("finetune_precision",),
              unkeyed=("finetune_checkpoint_every", "gradient_checkpointing", "finetune_micro_batch",
                       "finetune_compile", "finetune_channels_last", "device"),
              inputs="caption keys, training latent keys (or the prototype latent keys with `--finetune-data "
                     "prototype-latents`), diffusion id@commit", models=("pipe",), enabled_by="finetune"),
        Stage("synthesis", synthesis, 1, "img2img from each prototype latent (noised to `--strength`, denoised "
              "with its prompt) by the fine-tuned model", "image", SYNTHESIS_PARAMS, selects=("ipc",),
              unkeyed=("synthesis_batch_size", "synthesis_compile"), inputs="prototype latent hash, prompt, image seed, finetune key, "
              "diffusion id@commit", models=("pipe", "synth")),
        *sas_stages.STAGES,
        *rs.STAGES[:2], *ms.foreground_stages(), *cm.image_stages(), *rs.POOL_STAGES, *rs.STAGES[2:4],
        *ms.candidate_foreground_stages(), *cm.candidate_stages(), *rs.STAGES[4:],
        Stage("output", output, 1, "`OUT/train/<class id>/<index>.png` with `OUT/train/metadata.jsonl` (per "
              "image its label, class, prompt, cluster and cluster size); `manifest.json`, `prototypes.json`, "
              "`preview.png` at `OUT`'s root (rebuilt from the cache on every run)", params=("image_size",),
              inputs="synthetic image keys"),
    ]


STAGES: list[Stage] = _stages()
STAGE_NAMES: list[str] = [s.name for s in STAGES]


def _flag(enabled_by: str) -> str:
    both = {"sas": "`--post-sample sas`", "sas_foreground": "`--post-sample sas` and `--min-foreground`",
            "sas_refine": "`--post-sample sas` and `--refine`",
            "refine_foreground": "`--refine` and `--min-foreground`",
            "finetune_pairs": "`--finetune` and `--finetune-data center-crop-pairs` (the defaults)"}
    return both.get(enabled_by) or f"`--{enabled_by.replace('_', '-')}`"


def markdown_table() -> str:
    """The "What a run does" table of docs/stages.md, from STAGES (a test keeps the page equal to it)."""
    rows = ["| stage | what it computes | cached per | key holds | runs with |", "|---|---|---|---|---|"]
    for s in STAGES:
        flags = [f"`--{n.replace('_', '-')}`" for n in s.params]
        key = ", ".join(flags + ([s.inputs] if s.inputs else [])) or "-"
        per = {"image": "item", "class": "class", "run": "run"}[s.per]
        rows.append(f"| `{s.name}` | {s.what} | {per} | {key} | "
                    f"{_flag(s.enabled_by) if s.enabled_by else 'always'} |")
    return "\n".join(rows) + "\n"
