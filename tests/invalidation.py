"""The per-parameter invalidation table: which stages must recompute when one parameter changes.

One place for it: `tests/test_invalidation.py` checks every row against real runs on a warm tiny
cache, and docs/stages.md prints it (a test keeps that copy equal to `markdown()`).
A stage "recomputes" when it computes at least one item; `output` is rebuilt on every run and is not
listed. Each row is (arguments added to BASE, stages that recompute, why).
"""
from __future__ import annotations

BASE = ["--data", "digits", "--tiny", "--classes", "0,1,2", "--max-per-class", "12", "--ipc", "2",
        "--steps", "2", "--finetune-max-steps", "2", "--no-finetune-ema", "--post-sample", "sas", "--pool-multiplier", "2",
        "--refine", "--detector-epochs", "1", "--refine-candidates", "2", "--refine-beta", "0.95"]

RESCORED = ["detector_scores", "candidates", "candidate_scores", "refinement"]  # the pool walks' images all cached
JUDGED = ["detector_scores", "pool_replacements", "candidates", "candidate_scores", "refinement"]
SYNTH_ON = ["synthesis", "pool", "clip_image", "post_sampling"] + JUDGED
PROMPT_ON = ["synthesis", "pool", "clip_image", "clip_text", "post_sampling"] + JUDGED  # new prompts: embedded
CLUSTERS_ON = ["clusters", "text_prototypes", "prompts"] + PROMPT_ON
CAPTION_ON = ["text_prototypes", "prompts", "finetune"] + PROMPT_ON
FINETUNE_ON = ["finetune"] + SYNTH_ON

TABLE: list[tuple[list[str], list[str], str]] = [
    (["--ipc", "3"], ["outliers"] + CLUSTERS_ON, "LOF keeps at least IPC images; k = IPC"),
    (["--seed", "1"], CLUSTERS_ON[:3] + ["finetune", "synthesis", "pool", "clip_image", "post_sampling",
                                         "detector"] + JUDGED,
     "K-Means, fine-tuning batches, synthesis noise and the detector are seeded"),
    (["--contamination", "0.3"], ["outliers"] + CLUSTERS_ON, "LOF share"),
    (["--allow-duplicates"], ["clusters", "text_prototypes", "prompts"],
     "in the clusters key; same centres, so no image changes"),
    (["--beta", "0.05"], ["text_prototypes", "prompts"] + PROMPT_ON, "Eq. 2 threshold: other captions win"),
    (["--top-k", "1"], ["text_prototypes", "prompts"],
     "Eq. 3; here no pick changes, so no image is regenerated (synthesis is keyed by its actual prompt)"),
    (["--text-prototypes", "paper"], ["text_prototypes", "prompts"] + PROMPT_ON,
     "Algorithm 2 as the paper's equations read: other captions win"),
    (["--text-strategy", "label"], ["prompts"] + PROMPT_ON, "only the conditioning text changes"),
    (["--caption-max-tokens", "8"], ["captions"] + CAPTION_ON, "new captions; LOF/K-Means use latents only"),
    (["--caption-prompt", "Describe the {CLASSNAME}."], ["captions"] + CAPTION_ON, "new captions"),
    (["--caption-mode", "greedy"], ["captions"] + CAPTION_ON,
     "captions decoded greedily, without LLaVA's system message"),
    (["--caption-seed", "1"], ["captions"] + CAPTION_ON, "other samples of every caption"),
    (["--resolution", "16"], ["latents", "outliers"] + CLUSTERS_ON[:3] + ["training_latents", "finetune"] + PROMPT_ON,
     "new latents; the fine-tuning crops follow the latents' resolution (no per-dataset value for digits)"),
    (["--strength", "1.0"], SYNTH_ON[:4] + RESCORED, "img2img noise level; here no defective pick has an unpicked "
     "pool candidate"),
    (["--guidance-scale", "5"], SYNTH_ON, "classifier-free guidance"),
    (["--steps", "3"], SYNTH_ON[:4] + RESCORED,
     "denoising steps; here no defective pick has an unpicked pool candidate"),
    (["--negative-prompt", "blurry"], SYNTH_ON, "negative prompt"),
    (["--finetune-max-steps", "1"], FINETUNE_ON, "fine-tuned weights change"),
    (["--finetune-lr", "1e-4"], FINETUNE_ON, "fine-tuned weights change"),
    (["--finetune-batch-size", "4"], FINETUNE_ON, "fine-tuned weights change"),
    (["--finetune-method", "lora"], FINETUNE_ON, "fine-tuned weights change"),
    (["--finetune-accumulation", "2"], FINETUNE_ON, "fine-tuned weights change"),
    (["--finetune-data", "prototype-latents"], FINETUNE_ON, "fine-tuned on the prototype latents instead of the crops"),
    (["--finetune-resolution", "16"], ["training_latents"] + FINETUNE_ON, "new centre crops, at 16 px"),
    (["--finetune-ema"], FINETUNE_ON, "synthesis uses the EMA of the weights (the table's base run does not)"),
    (["--no-finetune"], SYNTH_ON, "synthesis from the base model"),
    (["--sas-lambda", "0.1"], ["post_sampling"], "selection only: no image generated, no CLIP call"),
    (["--select", "random"], ["post_sampling"] + JUDGED,
     "selection only; other images are kept, judged, and walk their prototypes' pools"),
    (["--sas-caption-weight", "0.5"], ["post_sampling", "refinement"],
     "selection only: no image generated, no CLIP call (M from cached embeddings); here the same images are kept"),
    (["--pool-multiplier", "3"], ["pool", "clip_image", "post_sampling"] + JUDGED,
     "only the new candidate of each prototype is generated and embedded; other picks are judged"),
    (["--clip-prompt", "a picture of a {name}."], ["clip_text", "post_sampling"] + JUDGED,
     "new class anchors: other picks, judged; defective ones walk the pool, then get candidates"),
    (["--detector-epochs", "2"], ["detector"] + RESCORED,
     "a new detector re-judges every image; images it newly finds defective get candidates (here none has an "
     "unpicked pool candidate)"),
    (["--refine-beta", "0.9"], ["refinement"], "selection only: nothing generated or scored"),
    (["--refine-top-k", "1"], ["refinement"], "selection only"),
    (["--refine-candidates", "3"], ["candidates", "candidate_scores", "refinement"], "only the new candidates"),
    (["--object-masks"], ["masks", "outliers"] + CLUSTERS_ON,
     "LOF/K-Means on foreground-weighted latents; captions and latents reused; prototypes = unmasked means"),
    (["--mask-prompt", "a digit"], [], "read only with `--object-masks` / `--min-foreground`"),
    (["--min-foreground", "0.1"], ["pool_foreground", "post_sampling", "candidate_foreground", "refinement"],
     "the segmenter measures the pool (stage 1 drops none under 0.1 here; `foreground` finds the kept images "
     "cached) and the candidates; every image is already defective, so none is generated"),
    (["--min-caption-match", "0.1"], ["candidate_caption_match", "refinement"],
     "CLIP embeds only the candidates (kept images, their prompts and class prompts are cached by post-sampling)"),
    (["--image-size", "16"], [], "only the saved size (output)"),
    (["--caption-batch-size", "3", "--latent-batch-size", "5", "--synthesis-batch-size", "1", "--clip-batch-size",
      "7", "--finetune-checkpoint-every", "1"], [], "batch sizes and checkpoint intervals are in no key"),
]


def markdown() -> str:
    """The table as it appears in docs/stages.md."""
    rows = ["| change | stages that recompute | why |", "|---|---|---|"]
    for args, stages, why in TABLE:
        rows.append(f"| `{' '.join(args)}` | {', '.join(f'`{s}`' for s in stages) or 'none'} | {why} |")
    return "\n".join(rows) + "\n"
