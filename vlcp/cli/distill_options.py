"""The options of ``vlcp distill``, in the help sections a reader looks for (data, captions, prototypes, ...).

Defaults come from ``DistillConfig`` (one source of truth); the refinement options are shared with
``vlcp refine``, so they are kept as (declarations, settings) pairs that build either kind of option.
"""
from __future__ import annotations

from pathlib import Path

import click
from click_option_group import optgroup

from vlcp.cli.common import StageChoice, choice, default, options
from vlcp.cli.config_file import apply_config, list_configs

REFINE = [
    (("--refine-candidates",), dict(type=click.IntRange(min=1), default=default("refine_candidates"),
                                    show_default=True, help="Candidates generated per defective image.")),
    (("--refine-top-k",), dict(type=click.IntRange(min=1), default=default("refine_top_k"), show_default=True,
                               help="Most confident valid candidates kept in the pool.")),
    (("--refine-beta",), dict(type=float, help="Confidence threshold: p <= beta is defective. "
                                               "[default: 0.9 ImageNette/ImageWoof, 0.7 CIFAR-10, 0.9 others]")),
    (("--detector",), dict(help="Detector: a safetensors file of --detector-arch weights, or a torchvision "
                                "ResNet name with local ImageNet weights (ImageNet subsets). [default: train one]")),
    (("--detector-arch",), dict(type=choice("detector_arch"),
                                help="[default: resnet18-modified for <= 32 px data, resnet18 otherwise]")),
    (("--detector-epochs",), dict(type=click.IntRange(min=1), default=default("detector_epochs"),
                                  show_default=True)),
]
FORCE = (("--force",), dict(is_flag=True, help="Replace a non-empty --out."))
# every seed option: what all its users take (sklearn's KMeans random_state, numpy, torch.manual_seed), so that a
# bad seed is a usage error naming the option, before anything runs
SEED = click.IntRange(0, 2**32 - 1)
CAPTION_MODE = (("--caption-mode",), dict(
    type=choice("caption_mode"), default=default("caption_mode"), show_default=True,
    help="reference: as LLaVA's model_vqa.py made the reference's captions (llava_v1 conversation with its "
         "system message, image padded to a square, sampling at temperature 0.2, one image per call), seeded "
         "per image by --caption-seed (a batch is one call whose every row samples with its own seed: the "
         "one-image captions); greedy: chat template without a system message, batched greedy decoding."))
CAPTION_SEED = (("--caption-seed",), dict(
    type=SEED, default=default("caption_seed"), show_default=True,
    help="--caption-mode reference: each image's sampling seed comes from this and the image's hash "
         "(not --seed: other seeds reuse the captions)."))
CAPTION_MAX_TOKENS = (("--caption-max-tokens",), dict(
    type=click.IntRange(min=1), help="New tokens per caption. [default: 1024 with --caption-mode reference "
                                     "(model_vqa.py), 256 greedy; 32 with --tiny]"))


def log_dir(command: str, what: str, name: str = "<OUT name>") -> tuple[tuple[str, ...], dict]:
    """``--log-dir`` of a command that trains something: TensorBoard event files in DIR/<run name>."""
    return (("--log-dir",), dict(
        type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
        help=f"Write the training curves ({what}) as TensorBoard event files to DIR/{command}-{name}-<start "
             f"time>, one folder per run (view: tensorboard --logdir DIR). A result taken from the cache "
             f"trains nothing and logs nothing. Needs TensorBoard: pip install 'vlcp[tensorboard]'."))


def say_where_curves_went(log, quiet: bool) -> None:
    """After a run with --log-dir: the run folder, or that nothing was trained (``scalars.Log``; None: no --log-dir)."""
    if log is None or quiet:
        return
    if log.folder is None:
        click.echo(f"training curves: none, nothing was trained (all from the cache); {log.root} unchanged", err=True)
    else:
        click.echo(f"training curves: {log.folder} (tensorboard --logdir {log.root})", err=True)


DISTILL_LOG_DIR = log_dir("distill", "fine-tuning's loss, lr and EMA decay per optimizer step; with --refine "
                                     "the detector's loss, lr and accuracy per epoch")
REFINE_LOG_DIR = log_dir("refine", "the detector's loss, lr and accuracy per epoch")
# `vlcp refine` takes the refinement options (and --log-dir, --force) as plain options
refine_options = options(*(click.option(*decls, **kw) for decls, kw in REFINE + [REFINE_LOG_DIR, FORCE]))

O = optgroup.option

distill_options = options(
    optgroup.group("Data", help="The real images and how they are read."),
    O("--data", required=True, help="Dataset name (see `vlcp datasets`) or path to an ImageFolder."),
    O("--ipc", type=int, required=True, help="Images per class to synthesise (= K-Means clusters)."),
    O("--classes", help="Comma-separated subset of classes (folder ids or names)."),
    O("--max-per-class", type=click.IntRange(min=1), help="Use only the first N images of each class."),
    O("--resolution", type=click.IntRange(min=8), help="Pixel size fed to the VAE. [default: the model's]"),
    O("--crop", type=choice("crop"), default=default("crop"), show_default=True,
      help="none: resize to a square as the reference code; center: resize short side + centre crop."),

    optgroup.group("Captions", help="A description of every real image (Algorithm 1, step 1)."),
    O("--captioner", help="Vision-language model (hub id or dir). [default: llava-hf/llava-1.5-7b-hf]"),
    O("--caption-prompt", default=default("caption_prompt"),
      help="Prompt for captions; {CLASSNAME} is replaced. [default: the reference's question, byte for byte "
           "(config_produce_llava.py: no space after 'image.')]"),
    O(*CAPTION_MODE[0], **CAPTION_MODE[1]),
    O(*CAPTION_SEED[0], **CAPTION_SEED[1]),
    O(*CAPTION_MAX_TOKENS[0], **CAPTION_MAX_TOKENS[1]),
    O("--captions-from", type=click.Path(exists=True, dir_okay=False),
      help="Use these captions (the reference .jsonl: {\"file_name\": \"<class>/<file>\", \"text\": ...}, "
           "'MM' read as '_'), e.g. the VLCP authors' LLaVA captions, instead of running the captioner."),
    O("--missing-captions", type=choice("missing_captions"), default=default("missing_captions"),
      show_default=True, help="Images the --captions-from file lacks: stop, or caption them."),
    O("--clean-captions/--no-clean-captions", default=default("clean_captions"), show_default=True,
      help="Remove '\"' and \"'s\" from captions before Algorithm 2 and fine-tuning, as the reference code."),

    optgroup.group("Prototypes", help="Image prototypes (LOF, K-Means) and text prototypes (Algorithm 2)."),
    O("--contamination", type=float, help="LOF outlier share, 0 skips LOF. [default: per dataset, see docs/stages.md]"),
    O("--beta", type=float, help="Non-representative word threshold (Eq. 2). [default: per dataset]"),
    O("--top-k", type=int, help="Representative words per cluster (Eq. 3). [default: per dataset]"),
    O("--text-prototypes", type=choice("text_prototypes"), default=default("text_prototypes"), show_default=True,
      help="Algorithm 2 as the reference code computes it (NLTK tokens and stop words, occurrence counts, "
           "substring matches; a cluster whose captions all score 0 gets the empty prompt) or as the paper "
           "states it (caption counts, whole words). docs/stages.md, FIDELITY.md."),
    O("--allow-duplicates", is_flag=True, help="A class with fewer images than IPC reuses its prototypes."),
    O("--text-strategy", type=choice("text_strategy"), default=default("text_strategy"), show_default=True,
      help="Prompt: closest-sample description (Alg. 2), class name, name + keywords, "
           "or an LLM sentence from the keywords."),
    O("--text-llm", help="Causal LM for --text-strategy llm (hub id or dir). [default with --tiny: a tiny one]"),

    optgroup.group("Fine-tuning", help="Stable Diffusion on the (image, caption) pairs (Algorithm 1, step 3)."),
    O("--finetune/--no-finetune", default=default("finetune"), show_default=True,
      help="Fine-tune the diffusion model on (image, caption) pairs first (Algorithm 1, step 3)."),
    O("--finetune-method", type=choice("finetune_method"), default=default("finetune_method"), show_default=True),
    O("--finetune-epochs", type=click.IntRange(min=1), help="[default: 8 as the paper; 1 with --tiny]"),
    O("--finetune-batch-size", type=click.IntRange(min=1), default=default("finetune_batch_size"),
      show_default=True),
    O("--finetune-lr", type=float, help="[default: 1e-5 full, 1e-4 lora]"),
    O("--finetune-max-steps", type=click.IntRange(min=1), help="Cap the number of training steps."),
    O("--finetune-lora-rank", type=click.IntRange(min=1), default=default("finetune_lora_rank"), show_default=True),
    O("--finetune-checkpoint-every", type=click.IntRange(min=1), default=default("finetune_checkpoint_every"),
      show_default=True, help="Steps between resumable checkpoints in the cache."),
    O("--finetune-micro-batch", type=click.IntRange(min=1),
      help="Samples per forward/backward pass: a multiple of --finetune-batch-size dividing batch size x "
           "accumulation. The update is the same (the samples, flips, noise and weights of the recipe's "
           "micro-batches), so it is in no key. [default: on CUDA the largest split that fits the free memory, "
           "measured on one pass; elsewhere --finetune-batch-size]"),
    O("--finetune-compile/--no-finetune-compile", default=default("finetune_compile"), show_default=True,
      help="torch.compile the UNet being fine-tuned (inductor; minutes to compile, again for a shorter last "
           "pass; 86 s for the tiny UNet on 2 CPU cores): float rounding may "
           "differ. On CUDA, fused AdamW is always on."),
    O("--finetune-channels-last/--no-finetune-channels-last", default=default("finetune_channels_last"),
      show_default=True, help="The UNet being fine-tuned and its input in channels_last (NHWC) on CUDA: float "
                              "rounding may differ; not measured yet (every GroupNorm converts the layout)."),
    O("--finetune-precision", type=choice("finetune_precision"), default=default("finetune_precision"),
      show_default=True, help="Autocast while fine-tuning: fp16 with loss scaling as the reference (on CUDA; "
                              "fp32 elsewhere), or bf16 (any device): a difference from the paper, in the key "
                              "(with LoRA the fp16 base is also cast to bf16 in every forward)."),
    O("--finetune-ema/--no-finetune-ema", default=default("finetune_ema"), show_default=True,
      help="Keep an EMA of the weights and synthesise with it (the reference's --use_ema)."),
    O("--finetune-ema-decay", type=float, default=default("finetune_ema_decay"), show_default=True),
    O("--finetune-max-grad-norm", type=float, default=default("finetune_max_grad_norm"), show_default=True,
      help="Gradient clipping (the reference's 1)."),
    O("--finetune-accumulation", type=click.IntRange(min=1), default=default("finetune_accumulation"),
      show_default=True, help="Micro-batches per optimizer step (the reference: 8 x 4 = 32)."),
    O("--finetune-flip/--no-finetune-flip", default=default("finetune_flip"), show_default=True,
      help="Random horizontal flips of the training latents (the reference's --random_flip)."),
    O("--finetune-data", type=choice("finetune_data"), default=default("finetune_data"), show_default=True,
      help="center-crop-pairs: cached latents of each image's centre crop and of its mirror, as the reference's "
           "train_text_to_image.py --center_crop --random_flip; prototype-latents: the squashed prototype "
           "latents, mirrored in latent space for a flip."),
    O("--finetune-resolution", type=click.IntRange(min=8),
      help="Side of the centre crops fine-tuned on (center-crop-pairs). [default: per dataset: 32 for CIFAR-10/100 "
           "(run_cifar10.sh, cifar100_dm.sh --resolution=32), else --resolution (512 for SD v1.5)]"),

    optgroup.group("Synthesis", help="img2img from every prototype with its prompt."),
    O("--diffusion", help="Stable Diffusion model (hub id or dir). "
                          "[default: stable-diffusion-v1-5/stable-diffusion-v1-5]"),
    O("--strength", type=float, default=default("strength"), show_default=True,
      help="img2img noise strength, in (0, 1]."),
    O("--guidance-scale", type=float, default=default("guidance_scale"), show_default=True),
    O("--steps", type=click.IntRange(min=1), default=default("steps"), show_default=True, help="Denoising steps."),
    O("--negative-prompt", default=default("negative_prompt"), show_default=True),
    O("--long-prompts", type=choice("long_prompts"), default=default("long_prompts"),
      show_default=True, help="Prompts over 77 tokens: reference (the whole prompt cut into 77-token "
                              "windows, as the VLCP code) or chunked (75-token chunks, each with BOS/EOS)."),
    O("--image-size", type=click.IntRange(min=1), help="Side of saved images. [default: per dataset]"),

    optgroup.group("Refinement", help="Replace the images a detector finds defective (off by default)."),
    O("--refine", is_flag=True, help="Detector-guided refinement: replace defective images (off by default)."),
    *(O(*decls, **kw) for decls, kw in REFINE),
    O("--min-caption-match", type=float,
      help="With --refine: a synthetic image whose CLIP cosine with its prompt is under S is defective, a "
           "candidate under S is not valid (vlcp's reading of the multi-modal paper's caption matching; "
           "CLIP as --clip)."),

    optgroup.group("Post-sampling", help="Generate a pool and keep the best IPC per class in CLIP space."),
    O("--post-sample", type=choice("post_sample"), default=default("post_sample"), show_default=True,
      help="sas: generate a pool of --pool-multiplier images per prototype and keep IPC per class by CLIP "
           "relevance, margin and diversity (vlcp's formulation of SAS, arXiv 2605.18012, from its "
           "abstract; not the authors' method). With --refine, a defective kept image first takes the "
           "next-ranked good pool candidate of its prototype (vlcp's formulation)."),
    O("--pool-multiplier", type=click.IntRange(min=1), default=default("pool_multiplier"), show_default=True,
      help="sas: images generated per prototype (1 = the synthetic set itself)."),
    O("--clip", help="sas: CLIP model (hub id or dir). [default: openai/clip-vit-base-patch32; tiny with --tiny]"),
    O("--clip-prompt", default=default("clip_prompt"), show_default=True, help="sas: class text; {name}."),
    O("--sas-keep", type=float, default=default("sas_keep"), show_default=True,
      help="sas stage 1: share of each class's pool kept by quality, in (0, 1]."),
    O("--sas-alpha", type=float, default=default("sas_alpha"), show_default=True,
      help="sas: quality = alpha z(relevance) + (1 - alpha) z(margin)."),
    O("--sas-lambda", type=float, default=default("sas_lambda"), show_default=True,
      help="sas stage 2: lambda z(quality) + (1 - lambda) diversity."),
    O("--select", type=choice("select"), default=default("select"),
      show_default=True, help="sas: the selection, its one-score ablation, or the random-from-pool control."),
    O("--sas-per-prototype", is_flag=True, help="sas: the best image of every prototype first (coverage)."),
    O("--sas-anchor", type=choice("sas_anchor"), default=default("sas_anchor"),
      show_default=True, help="sas relevance anchor: class prompt, the image's own prompt, or the real "
                              "images' CLIP centroid."),
    O("--sas-caption-weight", type=float, default=default("sas_caption_weight"), show_default=True,
      help="sas stage 1: quality += W z(caption match), the CLIP cosine of a candidate with the prompt it "
           "was generated from, in [0, 1]; 0 = off (vlcp's formulation, from the multi-modal paper's "
           "caption matching; not in the SAS abstract)."),

    optgroup.group("Masks", help="Text-prompted object masks (CLIPSeg) of real and synthetic images."),
    O("--object-masks", is_flag=True,
      help="LOF and K-Means see foreground-weighted latents (CLIPSeg mask x latent); the img2img start "
           "stays the cluster mean of the unmasked latents (vlcp's reading of the multi-modal paper's "
           "abstract, arXiv 2505.08605; not the authors' method)."),
    O("--mask-prompt", help="What the segmenter looks for, e.g. a super-category ('dog' for ImageWoof). "
                            "[default: the class name]"),
    O("--segmenter", help="Text-prompted segmenter (hub id or dir). "
                          "[default: CIDAS/clipseg-rd64-refined; tiny with --tiny]"),
    O("--min-foreground", type=float,
      help="With --refine: a synthetic image whose foreground fraction (mean CLIPSeg mask) is under F is "
           "defective, a candidate under F is not valid; with --post-sample sas: stage 1 drops pool "
           "images under F (vlcp's reading of the multi-modal paper; vlcp's formulation)."),

    optgroup.group("Resources", help="Batch sizes and memory: they change speed, not results."),
    O("--caption-batch-size", type=click.IntRange(min=1),
      help="[default: on CUDA from the captioner's KV cache per token and the free memory, up to where the "
           "memory roofline stops paying (its formula gives 130 for LLaVA-1.5-7B at 256 new tokens); 8 off CUDA; "
           "32 with --tiny]"),
    O("--caption-engine", type=choice("caption_engine"), default=default("caption_engine"), show_default=True,
      help="How captions are decoded, not what they say: hf (transformers' dynamic KV cache) or hf-static (a "
           "static KV cache; on CUDA a compiled decode step with CUDA graphs, minutes to compile once). Token for "
           "token the same on CPU (tests/test_throughput.py); on a GPU not measured yet."),
    O("--latent-batch-size", type=click.IntRange(min=1), default=default("latent_batch_size"), show_default=True),
    O("--synthesis-batch-size", type=click.IntRange(min=1),
      help="Images per img2img call at most; on CUDA fewer when the free memory holds fewer (measured on the "
           "first image); off CUDA at most 8. [default: 32; 8 with --tiny or --device cpu]"),
    O("--synthesis-compile/--no-synthesis-compile", default=default("synthesis_compile"), show_default=True,
      help="torch.compile the UNet for img2img (inductor; minutes to compile once): float rounding may differ, "
           "as with another batch size. channels_last is always on with CUDA."),
    O("--clip-batch-size", type=click.IntRange(min=1), default=default("clip_batch_size"), show_default=True),
    O("--mask-batch-size", type=click.IntRange(min=1), default=default("mask_batch_size"), show_default=True),
    O("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
      help="Trade compute for UNet memory while fine-tuning. [default: on CUDA only when the micro-batch does not "
           "fit without it (measured on one pass); off elsewhere]"),
    O(*DISTILL_LOG_DIR[0], **DISTILL_LOG_DIR[1]),

    optgroup.group("Output and run control",
                   help="Where the images go, how far to run, where options come from."),
    O("--out", type=click.Path(path_type=Path), required=True, help="Output folder (an ImageFolder)."),
    O("--until", type=StageChoice(), help="Stop after this stage (its artefacts stay cached)."),
    O("--tiny", is_flag=True, help="Tiny random models built offline: for tests and demos, output is noise."),
    O("--seed", type=SEED, default=default("seed"), show_default=True,
      help="Seed of K-Means, fine-tuning, the detector and the synthesis noise."),
    O("--config", is_eager=True, expose_value=False, callback=apply_config, metavar="FILE|NAME",
      help="Take options from a YAML/TOML file (keys: option names, e.g. finetune_lr or finetune-lr), a "
           "shipped config (see --list-configs) or an OUT/manifest.json (rerun that distillation). Options "
           "given on the command line win; relative paths in a file are taken from the current folder, as on the "
           "command line (a manifest's --data also from the folder it recorded); --force is never taken from it."),
    O("--list-configs", is_flag=True, is_eager=True, expose_value=False, callback=list_configs,
      help="List the shipped configs (the paper's settings) and exit."),
    O(*FORCE[0], **FORCE[1]),
    O("--dry-run", is_flag=True, help="Print which stages hit the cache and what would be computed."),
)
