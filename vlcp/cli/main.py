"""The ``vlcp`` command line. Heavy libraries (torch, diffusers, transformers) are imported only inside
commands that compute something, so ``--help``, ``--version`` and fully cached runs start fast."""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from vlcp import __version__

log = logging.getLogger("vlcp")



class StageChoice(click.Choice):
    """The stage names of ``vlcp.pipeline.table.STAGES`` (plus ``extra``), read when first needed so that
    ``vlcp --help`` does not import the stage table."""

    def __init__(self, extra: tuple[str, ...] = ()):
        self._extra = list(extra)
        super().__init__([])

    @property
    def choices(self):
        from vlcp.pipeline.table import STAGE_NAMES

        return STAGE_NAMES + self._extra

    @choices.setter
    def choices(self, value):
        pass


@dataclass
class Ctx:
    cache_dir: Path
    data_dir: Path
    device: str
    verbose: int
    quiet: bool

    def cache(self):
        from vlcp.store.cache import StageCache
        from vlcp.store.parallel import check_writable

        check_writable(self.cache_dir)  # one line before any work, not an SQLite traceback mid-run
        return StageCache(self.cache_dir)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    log.setLevel(level)
    if not verbose:  # library chatter ("Loading weights", deprecation notes) is not for our users
        for name in ("diffusers", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vlcp")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("cache"),
              envvar="VLCP_CACHE_DIR", show_default=True, show_envvar=True, help="Where stage artefacts are cached.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("data"),
              envvar="VLCP_DATA_DIR", show_default=True, show_envvar=True,
              help="Where named datasets are (or get downloaded).")
@click.option("--device", default="auto", envvar="VLCP_DEVICE", show_default=True, show_envvar=True,
              help="auto (cuda, then mps, then cpu), or a torch device such as cuda:1.")
@click.option("-v", "--verbose", count=True, help="More logging (library messages too).")
@click.option("-q", "--quiet", is_flag=True, envvar="VLCP_QUIET", help="Only errors; no progress bars or summary.")
@click.pass_context
def cli(ctx, cache_dir, data_dir, device, verbose, quiet):
    """vlcp: dataset distillation with diffusion models and vision-language category prototypes (VLCP, ICCV 2025).

    Every stage is cached by the hash of its inputs, so changing one parameter recomputes only what it
    affects. Start with `vlcp distill --data digits --ipc 10 --tiny --out out/digits` (offline, CPU).
    """
    _setup_logging(verbose, quiet)
    ctx.obj = Ctx(cache_dir, data_dir, device, verbose, quiet)


def _default(name: str):
    from vlcp.pipeline.config import default

    return default(name)


def _choice(name: str) -> click.Choice:
    """The allowed values of a distill option, from config.CHOICES (what validate checks)."""
    from vlcp.pipeline.config import CHOICES

    return click.Choice(CHOICES[name])


def _options(*decorators):
    """Several click options as one decorator (shared by commands that take the same options)."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


refine_options = _options(
    click.option("--refine-candidates", type=click.IntRange(min=1), default=_default("refine_candidates"),
                 show_default=True, help="Candidates generated per defective image."),
    click.option("--refine-top-k", type=click.IntRange(min=1), default=_default("refine_top_k"), show_default=True,
                 help="Most confident valid candidates kept in the pool."),
    click.option("--refine-beta", type=float, help="Confidence threshold: p <= beta is defective. "
                                                    "[default: 0.9 ImageNette/ImageWoof, 0.7 CIFAR-10, 0.9 others]"),
    click.option("--detector", help="Detector: a safetensors file of --detector-arch weights, or a torchvision "
                                    "ResNet name with local ImageNet weights (ImageNet subsets). [default: train one]"),
    click.option("--detector-arch", type=_choice("detector_arch"),
                 help="[default: resnet18-modified for <= 32 px data, resnet18 otherwise]"),
    click.option("--detector-epochs", type=click.IntRange(min=1), default=_default("detector_epochs"),
                 show_default=True),
    click.option("--force", is_flag=True, help="Replace a non-empty --out."),
)


@cli.command()
@click.option("--data", required=True, help="Dataset name (see `vlcp datasets`) or path to an ImageFolder.")
@click.option("--ipc", type=int, required=True, help="Images per class to synthesise (= K-Means clusters).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder (an ImageFolder).")
@click.option("--until", type=StageChoice(), help="Stop after this stage (its artefacts stay cached).")
@click.option("--tiny", is_flag=True, help="Tiny random models built offline: for tests and demos, output is noise.")
@click.option("--seed", type=int, default=_default("seed"), show_default=True,
              help="Seed of K-Means, fine-tuning, the detector and the synthesis noise.")
@click.option("--classes", help="Comma-separated subset of classes (folder ids or names).")
@click.option("--max-per-class", type=click.IntRange(min=1), help="Use only the first N images of each class.")
@click.option("--captioner", help="Vision-language model (hub id or dir). [default: llava-hf/llava-1.5-7b-hf]")
@click.option("--diffusion", help="Stable Diffusion model (hub id or dir). "
                                  "[default: stable-diffusion-v1-5/stable-diffusion-v1-5]")
@click.option("--caption-prompt", default=_default("caption_prompt"),
              help="Prompt for captions; {CLASSNAME} is replaced. [default: the paper's prompt]")
@click.option("--caption-batch-size", type=click.IntRange(min=1),
              help="[default: from GPU memory: 32 on a GPU of >= 40 GB, what fits on a smaller one, 8 off CUDA; "
                   "32 with --tiny]")
@click.option("--caption-max-tokens", type=click.IntRange(min=1), help="New tokens per caption. "
                                                                       "[default: 256; 32 with --tiny]")
@click.option("--captions-from", type=click.Path(exists=True, dir_okay=False),
              help="Use these captions (the reference .jsonl: {\"file_name\": \"<class>/<file>\", \"text\": ...}, "
                   "'MM' read as '_'), e.g. the VLCP authors' LLaVA captions, instead of running the captioner.")
@click.option("--missing-captions", type=_choice("missing_captions"), default=_default("missing_captions"),
              show_default=True, help="Images the --captions-from file lacks: stop, or caption them.")
@click.option("--clean-captions/--no-clean-captions", default=_default("clean_captions"), show_default=True,
              help="Remove '\"' and \"'s\" from captions before Algorithm 2 and fine-tuning, as the reference code.")
@click.option("--resolution", type=click.IntRange(min=8), help="Pixel size fed to the VAE. [default: the model's]")
@click.option("--crop", type=_choice("crop"), default=_default("crop"), show_default=True,
              help="none: resize to a square as the reference code; center: resize short side + centre crop.")
@click.option("--latent-batch-size", type=click.IntRange(min=1), default=_default("latent_batch_size"),
              show_default=True)
@click.option("--contamination", type=float, help="LOF outlier share, 0 skips LOF. [default: per dataset, see README]")
@click.option("--beta", type=float, help="Non-representative word threshold (Eq. 2). [default: per dataset]")
@click.option("--top-k", type=int, help="Representative words per cluster (Eq. 3). [default: per dataset]")
@click.option("--allow-duplicates", is_flag=True, help="A class with fewer images than IPC reuses its prototypes.")
@click.option("--strength", type=float, default=_default("strength"), show_default=True,
              help="img2img noise strength, in (0, 1].")
@click.option("--guidance-scale", type=float, default=_default("guidance_scale"), show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=_default("steps"), show_default=True,
              help="Denoising steps.")
@click.option("--negative-prompt", default=_default("negative_prompt"), show_default=True)
@click.option("--long-prompts", type=_choice("long_prompts"), default=_default("long_prompts"),
              show_default=True, help="Prompts over 77 tokens: reference (the whole prompt cut into 77-token "
                                      "windows, as the VLCP code) or chunked (75-token chunks, each with BOS/EOS).")
@click.option("--synthesis-batch-size", type=click.IntRange(min=1), default=_default("synthesis_batch_size"),
              show_default=True)
@click.option("--image-size", type=click.IntRange(min=1), help="Side of saved images. [default: per dataset]")
@click.option("--text-strategy", type=_choice("text_strategy"),
              default=_default("text_strategy"), show_default=True,
              help="Prompt: closest-sample description (Alg. 2), class name, name + keywords, "
                   "or an LLM sentence from the keywords.")
@click.option("--text-llm", help="Causal LM for --text-strategy llm (hub id or dir). [default with --tiny: a tiny one]")
@click.option("--finetune/--no-finetune", default=_default("finetune"), show_default=True,
              help="Fine-tune the diffusion model on (image, caption) pairs first (Algorithm 1, step 3).")
@click.option("--finetune-method", type=_choice("finetune_method"), default=_default("finetune_method"),
              show_default=True)
@click.option("--finetune-epochs", type=click.IntRange(min=1), help="[default: 8 as the paper; 1 with --tiny]")
@click.option("--finetune-batch-size", type=click.IntRange(min=1), default=_default("finetune_batch_size"),
              show_default=True)
@click.option("--finetune-lr", type=float, help="[default: 1e-5 full, 1e-4 lora]")
@click.option("--finetune-max-steps", type=click.IntRange(min=1), help="Cap the number of training steps.")
@click.option("--finetune-lora-rank", type=click.IntRange(min=1), default=_default("finetune_lora_rank"),
              show_default=True)
@click.option("--finetune-checkpoint-every", type=click.IntRange(min=1),
              default=_default("finetune_checkpoint_every"), show_default=True,
              help="Steps between resumable checkpoints in the cache.")
@click.option("--finetune-ema/--no-finetune-ema", default=_default("finetune_ema"), show_default=True,
              help="Keep an EMA of the weights and synthesise with it (the reference's --use_ema).")
@click.option("--finetune-ema-decay", type=float, default=_default("finetune_ema_decay"), show_default=True)
@click.option("--finetune-max-grad-norm", type=float, default=_default("finetune_max_grad_norm"), show_default=True,
              help="Gradient clipping (the reference's 1).")
@click.option("--finetune-accumulation", type=click.IntRange(min=1), default=_default("finetune_accumulation"),
              show_default=True, help="Micro-batches per optimizer step (the reference: 8 x 4 = 32).")
@click.option("--finetune-flip/--no-finetune-flip", default=_default("finetune_flip"), show_default=True,
              help="Random horizontal flips of the training latents (the reference's --random_flip).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Trade compute for UNet memory while fine-tuning. [default: on with CUDA, off on CPU]")
@click.option("--post-sample", type=_choice("post_sample"), default=_default("post_sample"), show_default=True,
              help="sas: generate a pool of --pool-multiplier images per prototype and keep IPC per class by CLIP "
                   "relevance, margin and diversity (vlcp's formulation of SAS, arXiv 2605.18012, from its "
                   "abstract; not the authors' method). With --refine, a defective kept image first takes the "
                   "next-ranked good pool candidate of its prototype (vlcp's formulation).")
@click.option("--pool-multiplier", type=click.IntRange(min=1), default=_default("pool_multiplier"), show_default=True,
              help="sas: images generated per prototype (1 = the synthetic set itself).")
@click.option("--clip", help="sas: CLIP model (hub id or dir). [default: openai/clip-vit-base-patch32; tiny with --tiny]")
@click.option("--clip-prompt", default=_default("clip_prompt"), show_default=True, help="sas: class text; {name}.")
@click.option("--clip-batch-size", type=click.IntRange(min=1), default=_default("clip_batch_size"), show_default=True)
@click.option("--sas-keep", type=float, default=_default("sas_keep"), show_default=True,
              help="sas stage 1: share of each class's pool kept by quality, in (0, 1].")
@click.option("--sas-alpha", type=float, default=_default("sas_alpha"), show_default=True,
              help="sas: quality = alpha z(relevance) + (1 - alpha) z(margin).")
@click.option("--sas-lambda", type=float, default=_default("sas_lambda"), show_default=True,
              help="sas stage 2: lambda z(quality) + (1 - lambda) diversity.")
@click.option("--select", type=_choice("select"), default=_default("select"),
              show_default=True, help="sas: the selection, its one-score ablation, or the random-from-pool control.")
@click.option("--sas-per-prototype", is_flag=True, help="sas: the best image of every prototype first (coverage).")
@click.option("--sas-anchor", type=_choice("sas_anchor"), default=_default("sas_anchor"),
              show_default=True, help="sas relevance anchor: class prompt, the image's own prompt, or the real "
                                      "images' CLIP centroid.")
@click.option("--sas-caption-weight", type=float, default=_default("sas_caption_weight"), show_default=True,
              help="sas stage 1: quality += W z(caption match), the CLIP cosine of a candidate with the prompt it "
                   "was generated from, in [0, 1]; 0 = off (vlcp's formulation, from the multi-modal paper's "
                   "caption matching; not in the SAS abstract).")
@click.option("--object-masks", is_flag=True,
              help="LOF and K-Means see foreground-weighted latents (CLIPSeg mask x latent); the img2img start "
                   "stays the cluster mean of the unmasked latents (vlcp's reading of the multi-modal paper's "
                   "abstract, arXiv 2505.08605; not the authors' method).")
@click.option("--mask-prompt", help="What the segmenter looks for, e.g. a super-category ('dog' for ImageWoof). "
                                    "[default: the class name]")
@click.option("--segmenter", help="Text-prompted segmenter (hub id or dir). "
                                  "[default: CIDAS/clipseg-rd64-refined; tiny with --tiny]")
@click.option("--min-foreground", type=float,
              help="With --refine: a synthetic image whose foreground fraction (mean CLIPSeg mask) is under F is "
                   "defective, a candidate under F is not valid; with --post-sample sas: stage 1 drops pool "
                   "images under F (vlcp's reading of the multi-modal paper; vlcp's formulation).")
@click.option("--mask-batch-size", type=click.IntRange(min=1), default=_default("mask_batch_size"),
              show_default=True)
@click.option("--min-caption-match", type=float,
              help="With --refine: a synthetic image whose CLIP cosine with its prompt is under S is defective, a "
                   "candidate under S is not valid (vlcp's reading of the multi-modal paper's caption matching; "
                   "CLIP as --clip).")
@click.option("--refine", is_flag=True, help="Detector-guided refinement: replace defective images (off by default).")
@refine_options
@click.option("--dry-run", is_flag=True, help="Print which stages hit the cache and what would be computed.")
@click.pass_obj
def distill(obj: Ctx, **kw):
    """Distill a dataset into IPC synthetic images per class with the VLCP method.

    Runs the stages of `vlcp.pipeline.table.STAGES` in order (README, "What a run does"): images, captions,
    latents, outliers, clusters, text_prototypes, prompts, finetune, synthesis, the refinement stages
    with --refine, output. Defaults of --contamination/--beta/--top-k/--image-size depend on the
    dataset (README table).
    """
    dry_run = kw.pop("dry_run")
    from vlcp.pipeline.config import DistillConfig

    raw = kw.pop("classes")
    classes = [c.strip() for c in raw.split(",") if c.strip()] if raw else None
    cfg = DistillConfig(data_dir=obj.data_dir, device=obj.device, classes=classes, progress=not obj.quiet, **kw)
    _run_distill(obj, cfg, dry_run)


def _run_distill(obj: Ctx, cfg, dry_run: bool = False) -> None:
    """Validate, check --out, run (or plan) the stages, print the summary: shared by distill and refine."""
    with _user_errors():
        cfg.validate()
        if not dry_run:
            from vlcp.store.output import check_out

            check_out(Path(cfg.out), cfg.force)
    if cfg.tiny and not obj.quiet:
        click.echo("--tiny: tiny random models (built offline, cached); captions and images are noise, "
                   "for tests and demos only.", err=True)
    from vlcp.pipeline.loop import distill as run

    with _user_errors():
        manifest = run(cfg, obj.cache(), dry_run=dry_run)
    from vlcp.store.parallel import world

    if not obj.quiet and world().main:  # in a multi-process launch rank 0 speaks for all (OUT/ranks/ has each)
        _summary(manifest, dry_run)
        if not dry_run:
            click.echo(f"wrote {cfg.out}/ (manifest.json"
                       f"{', preview.png' if 'output' in manifest['stages'] else ''})")


class _user_errors:
    """Turn the package's own error types into one-line ClickExceptions (exit code 1)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        from vlcp.data.caption_files import CaptionFileError
        from vlcp.data.datasets import DatasetError
        from vlcp.evaluation.protocols import EvalError
        from vlcp.models.loading import ModelError
        from vlcp.pipeline.config import ConfigError
        from vlcp.pipeline.run import DistillError
        from vlcp.store.cache import CorruptEntry
        from vlcp.store.output import OutputError

        if isinstance(exc, ConfigError):  # a parameter out of range: exit code 2, naming the option
            raise click.BadParameter(exc.message, param_hint=exc.param) from None
        if isinstance(exc, (EvalError, OutputError)):  # a folder that does not fit: bad input, exit code 2
            raise click.UsageError(str(exc)) from None
        if isinstance(exc, (DatasetError, DistillError, ModelError, CaptionFileError, CorruptEntry)):
            raise click.ClickException(str(exc)) from None
        return False


def _summary(manifest: dict, dry_run: bool) -> None:
    rows = [("stage", "status", "computed", "cached", "model", "seconds")]
    for name, r in manifest["stages"].items():
        status = ("hit" if r["cached"] else "would compute" if dry_run else "computed")
        rows.append((name, status, str(r["items_computed"]), str(r["items_cached"]),
                     "loaded" if r["model_loaded"] else "-", f"{r['seconds']:.2f}"))
    _table(rows)
    if dry_run and manifest.get("plan_unknown_after"):
        click.echo(f"later stages: not planned, they depend on what {manifest['plan_unknown_after']} computes")
    for w in manifest.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    if not dry_run:
        click.echo(f"total {manifest['seconds']:.2f}s")


@cli.command()
@click.argument("synth_dir", required=False, type=click.Path(path_type=Path))
@click.option("--data", required=True, help="The real dataset (its test split is the test set).")
@click.option("--protocol", type=click.Choice(["minimax", "dc", "rded"]),
              help="[default: minimax for ImageNet subsets, dc otherwise]")
@click.option("--model", type=click.Choice(["convnet3", "convnet6", "resnetap10", "resnet18", "resnet18-modified",
                                           "resnet18-bn"]),
              help="[default: resnetap10 (minimax), convnet3 (dc), rded: resnet18-modified (32 px) or resnet18-bn]")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Runs with seeds 0..N-1.")
@click.option("--epochs", type=click.IntRange(min=1), help="[default: the protocol's]")
@click.option("--ipc", type=click.IntRange(min=1), help="Use the first N images per class (sorted by file name).")
@click.option("--aug", type=click.Choice(["dsa", "none", "minimax", "flip", "rded"]), help="[default: the protocol's]")
@click.option("--full", is_flag=True, help="Train on the whole real training set (the upper-bound row).")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False),
              help="rded: teacher weights (safetensors) [default: torchvision's for ImageNet-1K, else trained by vlcp]")
@click.option("--teacher-epochs", type=click.IntRange(min=1), help="rded: epochs of the teacher vlcp trains.")
@click.option("--test-every", type=click.IntRange(min=0), help="Test every N epochs for best-during-training.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write all results here.")
@click.option("--caption-fusion", is_flag=True,
              help="Also a separate row (never the headline): a classifier whose head sees [visual features ; CLIP "
                   "text embedding of the image's prompt (vlcp distill folders) or caption]; test images use their "
                   "captions, so it changes the test-time input (vlcp's reading of the multi-modal paper).")
@click.option("--captioner", help="--caption-fusion: captioner (hub id or dir) [default: llava-hf/llava-1.5-7b-hf; "
                                  "tiny with --tiny].")
@click.option("--fusion-caption-prompt",
              help="--caption-fusion: caption prompt, must not contain {CLASSNAME} (distill's prompt names the "
                   "class, test images must not be named) [default: distill's prompt with 'the object' for the class].")
@click.option("--clip", help="--caption-fusion: text encoder, CLIP hub id or dir [default: openai/clip-vit-base-patch32].")
@click.option("--tiny", is_flag=True, help="--caption-fusion: the tiny random LLaVA and CLIP (tests, offline demos).")
@click.pass_obj
def evaluate(obj: Ctx, synth_dir, data, protocol, model, seeds, epochs, ipc, aug, full, teacher, teacher_epochs,
             test_every, json_path, caption_fusion, captioner, fusion_caption_prompt, clip, tiny):
    """Train on a distilled ImageFolder SYNTH_DIR, report top-1 on the real test split.

    The headline number is the accuracy after the last epoch (mean +- std over seeds). The best test
    accuracy among the protocol's own tests (what the Minimax and RDED scripts report) is in its own
    column. Results of a folder vlcp made also go to SYNTH_DIR/evaluations/ (for vlcp report).
    """
    if full == bool(synth_dir):
        raise click.UsageError("give either SYNTH_DIR or --full")
    fusion_opts = {"captioner": captioner, "clip": clip, "fusion_prompt": fusion_caption_prompt, "tiny": tiny or None}
    if not caption_fusion and any(v is not None for v in fusion_opts.values()):
        raise click.UsageError("--captioner, --clip, --fusion-caption-prompt and --tiny apply only with --caption-fusion")
    from vlcp.evaluation import evaluate as ev

    cfg = ev.EvalConfig(data=data, synth_dir=str(synth_dir) if synth_dir else None, full=full,
                        data_dir=obj.data_dir, protocol=protocol, model=model, seeds=seeds, epochs=epochs, ipc=ipc,
                        aug=aug, device=obj.device, teacher=teacher, teacher_epochs=teacher_epochs,
                        test_every=test_every, progress=not obj.quiet, caption_fusion=caption_fusion,
                        captioner=captioner, clip=clip, tiny=tiny, fusion_prompt=fusion_caption_prompt)
    with _user_errors():
        res = ev.run(cfg, obj.cache())
    p, a = res["protocol"], res["accuracy"]
    best = a.get("best_during_training")
    rows = [("model", "protocol", "top-1 (final)", res["best_label"], "per seed (final)", "epochs", "seconds"),
            (p["model"], p["name"], f"{a['mean']:.2f} ± {a['std']:.2f}",
             f"{best['mean']:.2f} ± {best['std']:.2f}" if best else
             "n/a (tested at end only)" if not p["test_every"] else "n/a (no test in its window)",
             " ".join(f"{v:.2f}" for v in a["per_seed"]), str(p["epochs"]), f"{res['seconds']:.1f}")]
    if not obj.quiet:
        what = "full training set" if full else f"{synth_dir} ({res['train_images']} images)"
        click.echo(f"{res['dataset']['name']}: {what}; test: {res['test_split']['images']} real images")
        if res["teacher"]:
            click.echo(f"teacher: {res['teacher']['source']}, test accuracy {res['teacher']['accuracy']:.2f}")
    _table(rows)
    fused = res.get("caption_fusion")
    if fused:
        f = fused["accuracy"]
        click.echo(f"caption fusion ({fused['note']}; {fused['label']}):")
        _table([("model", "protocol", "top-1 (final), caption fusion", "per seed (final)"),
                (p["model"], p["name"], f"{f['mean']:.2f} ± {f['std']:.2f}", " ".join(f"{v:.2f}" for v in f["per_seed"]))])
    from vlcp.store.output import write_json

    if json_path:
        write_json(json_path, res)
        if not obj.quiet:
            click.echo(f"wrote {json_path}")
    saved = ev.save_in_folder(synth_dir, res) if synth_dir else None
    if saved and not obj.quiet:
        click.echo(f"wrote {saved}")
    if synth_dir and (synth_dir / "report.html").is_file():
        if saved:  # the page shows the new results next to the paper's numbers
            from vlcp.report.html import ReportError, build

            try:
                build(synth_dir)
            except (ReportError, OSError) as exc:
                log.warning("could not rebuild %s: %s", synth_dir / "report.html", exc)
        click.echo(f"report: {synth_dir / 'report.html'}")


@cli.command()
@click.option("--method", type=click.Choice(["random", "herding", "kcenter", "dm", "dc"]), required=True,
              help="random/herding/kcenter select real images; dm (distribution matching) and dc (gradient "
                   "matching with DSA) optimise synthetic pixels.")
@click.option("--data", required=True, help="Dataset name or ImageFolder path.")
@click.option("--ipc", type=click.IntRange(min=1), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="random: the sampling seed; dm/dc: initial images, networks, batches, augmentations.")
@click.option("--feature-epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="herding/kcenter: epochs of the ConvNet-3 whose features they use.")
@click.option("--iterations", type=click.IntRange(min=1), help="dm/dc: optimisation iterations [default: dm 20000, dc 1000]")
@click.option("--lr-img", type=float, help="dm/dc: SGD lr of the synthetic pixels [default: dm 1.0, dc 0.1]")
@click.option("--batch-real", type=click.IntRange(min=1), help="dm/dc: real images per class per match [default: 256]")
@click.option("--outer-loop", type=click.IntRange(min=1), help="dc: matches per iteration [default: by IPC, as DC]")
@click.option("--inner-loop", type=click.IntRange(min=1), help="dc: network epochs between matches [default: by IPC]")
@click.option("--lr-net", type=float, help="dc: SGD lr of the network's inner loop [default: 0.01]")
@click.option("--batch-train", type=click.IntRange(min=1), help="dc: inner-loop batch size [default: 256]")
@click.option("--dsa/--no-dsa", default=True, show_default=True, help="dm/dc: siamese DSA augmentation.")
@click.option("--init", type=click.Choice(["real", "noise"]), default="real", show_default=True,
              help="dm/dc: start from random real images (seeded) or Gaussian noise.")
@click.option("--masks", help="dm/dc: match masked real images (masked feature alignment / gradient matching); "
                              "source: threshold (grey data on a flat background) or clipseg (text-prompted CLIPSeg "
                              "masks of the real images, cached per image).")
@click.option("--mask-prompt", help="--masks clipseg: what the segmenter looks for [default: the class name].")
@click.option("--segmenter", help="--masks clipseg: CLIPSeg hub id or directory "
                                  "[default: CIDAS/clipseg-rd64-refined; tiny with --tiny].")
@click.option("--mask-margin", type=float, default=8, show_default=True,
              help="threshold masks: grey levels above the background level that count as object.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="dm/dc: save the optimisation state every N iterations (0: only at the end); a killed run resumes.")
@click.option("--caption-loss", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="dm/dc: weight of caption matching (CLIP: synthetic images vs their class's real captions).")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--caption-loss: JSON {class folder or name: [captions of its real images]}.")
@click.option("--clip", help="--caption-loss: CLIP hub id or directory [default: openai/clip-vit-base-patch32].")
@click.option("--tiny", is_flag=True, help="--caption-loss / --masks clipseg: a tiny random CLIP / CLIPSeg "
                                         "(tests, offline demos).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.pass_obj
def baseline(obj: Ctx, method, data, ipc, out, seed, feature_epochs, force, **match):
    """Real-image selection (random, herding, k-center) or optimisation-based distillation (DM, DC) into an
    ImageFolder in the standard layout."""
    from vlcp import __version__
    from vlcp.baselines import selection as baselines
    from vlcp.data.datasets import load_dataset
    from vlcp.store.output import check_out, publish

    opt_only = [k for k in ("iterations", "lr_img", "batch_real", "outer_loop", "inner_loop", "lr_net", "batch_train",
                            "masks", "captions", "clip", "mask_prompt", "segmenter") if match[k] is not None]
    opt_only += ["caption_loss"] * bool(match["caption_loss"])
    if method not in ("dm", "dc") and opt_only:
        raise click.UsageError(f"--{opt_only[0].replace('_', '-')} applies to --method dm or dc only")
    with _user_errors():
        check_out(out, force)
        ds = load_dataset(data, obj.data_dir, "train")
        manifest = {"vlcp_version": __version__, "baseline": method, "ipc": ipc, "seed": seed}
        try:
            if method in ("dm", "dc"):
                images, manifest["matching"] = _matching(obj, method, ds, data, ipc, seed, match)
            else:
                feats = None
                if method != "random":
                    feats = baselines.features(ds, data, obj.cache(), obj.device, feature_epochs, not obj.quiet)
                chosen = baselines.select(method, ds, ipc, seed, feats)
                images = baselines.selected_images(ds, chosen)
                manifest["feature_net"] = None if method == "random" else {"model": "convnet3", "epochs": feature_epochs}
                manifest["sources"] = {ds.classes[c].folder: [ds.samples[i].source for i in idx]
                                       for c, idx in chosen.items()}
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        publish(out, lambda tmp: baselines.write_folder(tmp, ds, images, manifest))
    if not obj.quiet:
        click.echo(f"wrote {out}/: {method}, {ipc} images per class, {len(ds.classes)} classes")


def _matching(obj: Ctx, method, ds, data, ipc, seed, match) -> tuple[dict, dict]:
    """Run (or fetch from the cache) DM/DC; returns the images per class and the manifest's record."""
    from vlcp.baselines import matching
    from vlcp.baselines import selection as baselines

    every = match.pop("checkpoint_every")
    spec = None
    cap = {k: match.pop(k) for k in ("captions", "clip", "tiny")}
    if not match["caption_loss"] and (cap["captions"] or cap["clip"]):
        raise click.UsageError("--captions and --clip apply only with --caption-loss")
    if match["caption_loss"]:
        from vlcp.baselines.caption_losses import CaptionSpec, load_captions

        spec = CaptionSpec(load_captions(cap["captions"], ds.classes), cap["clip"], cap["tiny"])
    seg = {k: match.pop(k) for k in ("segmenter", "mask_prompt")}
    if match["masks"] != "clipseg" and any(v is not None for v in seg.values()):
        raise click.UsageError("--segmenter and --mask-prompt apply only with --masks clipseg")
    if seg["mask_prompt"] is not None and not seg["mask_prompt"].strip():  # as vlcp distill: never silently the name
        raise click.UsageError("--mask-prompt must not be empty (leave it out to segment the class name)")
    if match["masks"] == "clipseg":
        from vlcp.baselines.masks import Segmenter

        match["segmenter"] = Segmenter(seg["segmenter"], cap["tiny"], seg["mask_prompt"])
    cfg = matching.make_config(method, ipc, seed=seed, **match)
    res = matching.run(cfg, ds, data, obj.cache(), obj.device, not obj.quiet, every, spec)
    m = res.meta
    if not obj.quiet:
        how = "cached" if res.cached else f"{m['seconds']:.0f} s, {m['seconds_per_iteration']:.3f} s/iteration"
        click.echo(f"{method}: {cfg.iterations} iterations, final loss {m['final_loss']:.4f} ({how})")
    record = {k: v for k, v in m.items() if k != "losses"}
    record.update(cached=res.cached, loss_curve=baselines.loss_curve(m["losses"]))
    return baselines.array_images(res.images, ipc), record


@cli.command("refine")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, help="The real dataset the folder distils (the detector trains on it).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@refine_options
@click.pass_obj
def refine_cmd(obj: Ctx, folder: Path, data: str, out: Path, **opts):
    """Detector-guided refinement of a distilled ImageFolder.

    On vlcp's own output (it has a manifest.json) this reruns that distillation with --refine, so
    candidates come from the cached prototypes. On any other folder (D4M, Minimax...) only detection is
    possible: every image is judged and OUT/report.json lists the defective ones.
    """
    from vlcp.pipeline.config import DistillConfig

    params = _manifest_params(folder)
    if params is not None and params.get("data") != data:
        raise click.BadParameter(f"{folder} was distilled from {params.get('data')}, not {data}", param_hint="--data")
    common = dict(refine=True, out=out, data_dir=obj.data_dir, device=obj.device, progress=not obj.quiet, **opts)
    if params is not None:
        if not obj.quiet:
            click.echo(f"{folder} is a vlcp distillation: rerunning it with --refine (cached stages are reused)")
        _run_distill(obj, DistillConfig.from_params(params, until=None, **common))
        return
    if not obj.quiet:
        click.echo(f"{folder} is not a vlcp output: detection only, no candidates can be generated; "
                   f"writing {out}/report.json")
    from vlcp.pipeline import refine_folder

    cfg = DistillConfig(data=data, ipc=1, **common)
    with _user_errors():
        cfg.validate()
        from vlcp.store.output import check_out

        check_out(out, cfg.force)
        report = refine_folder.detect_only(folder, cfg, obj.cache())
    if not obj.quiet:
        for name, st in report["per_class"].items():
            click.echo(f"{name:<20} {st['defective']:>4} of {st['images']:>4} defective, "
                       f"mean confidence {st['confidence']:.3f}")


def _manifest_params(folder: Path) -> dict | None:
    """The parameters of a vlcp distillation folder; None for a foreign folder (no manifest.json)."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return None
    try:
        params = json.loads(manifest.read_text()).get("parameters")
    except (OSError, ValueError, AttributeError) as exc:
        raise click.UsageError(f"{manifest} is unreadable ({exc.__class__.__name__}: {exc}); restore it, or move "
                               f"it away to treat {folder} as a foreign folder (detection only)") from None
    if not isinstance(params, dict) or "data" not in params or "ipc" not in params:
        raise click.UsageError(f"{manifest} has no distillation parameters; move it away to treat {folder} as a "
                               f"foreign folder (detection only)")
    return params


@cli.command("report")
@click.argument("out", type=click.Path(path_type=Path))
@click.pass_obj
def report_cmd(obj: Ctx, out: Path):
    """Rebuild OUT/report.html from the files in OUT (manifest, prototypes, images, loss, evaluations).

    One page, no network, no script: open it from disk, or zip the folder and move it.
    """
    from vlcp.report.html import ReportError, build

    try:
        path = build(out)
    except ReportError as exc:  # not a vlcp folder: bad input, exit code 2, one line
        err = click.ClickException(str(exc))
        err.exit_code = 2
        raise err from None
    if not obj.quiet:
        click.echo(f"wrote {path}")


@cli.command("select")
@click.argument("pool", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, help="The dataset the pool is for (its classes and names).")
@click.option("--ipc", type=click.IntRange(min=1), required=True, help="Images kept per class.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder (an ImageFolder).")
@click.option("--clip", "clip_model", help="CLIP model (hub id or dir). [default: openai/clip-vit-base-patch32; "
                                           "a tiny random one with --tiny]")
@click.option("--tiny", is_flag=True, help="A tiny random CLIP built offline: for tests and demos, scores are noise.")
@click.option("--clip-prompt", default="a photo of a {name}.", show_default=True,
              help="Class text anchor; {name} is the class name.")
@click.option("--anchor", type=click.Choice(["prompt", "centroid"]), default="prompt", show_default=True,
              help="Relevance/margin anchor per class: its --clip-prompt, or the CLIP centroid of its real "
                   "training images (embedded once, cached).")
@click.option("--max-per-class", type=click.IntRange(min=1), help="--anchor centroid: the first N real images "
                                                                  "per class. [default: all]")
@click.option("--sas-keep", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Stage 1: share of each class's pool kept by quality (at least IPC).")
@click.option("--sas-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Stage 1 quality: alpha z(relevance) + (1 - alpha) z(margin).")
@click.option("--sas-lambda", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Stage 2: lambda z(quality) + (1 - lambda) diversity.")
@click.option("--select", "mode", type=click.Choice(["random", "relevance", "sas"]), default="sas", show_default=True,
              help="random: seeded random-from-pool control; relevance: top IPC by CLIP relevance; sas: both stages.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --select random.")
@click.option("--clip-batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--allow-duplicates", is_flag=True, help="A class with fewer pool images than IPC reuses them.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.pass_obj
def select_cmd(obj: Ctx, pool: Path, data, ipc, out, clip_model, tiny, clip_prompt, anchor, max_per_class, sas_keep,
               sas_alpha, sas_lambda, mode, seed, clip_batch_size, allow_duplicates, force):
    """Keep IPC images per class from an image pool POOL (an ImageFolder, e.g. made by Minimax or D4M),
    scored in CLIP space: vlcp's formulation of SAS (Li et al., arXiv 2605.18012) from its abstract, not the
    authors' method (README, "Semantic-aware post-sampling").

    Stage 1 drops candidates CLIP places nearer another class and keeps the top --sas-keep share by
    relevance and margin; stage 2 picks IPC greedily by quality vs diversity. CLIP embeddings are
    cached: changing only the selection knobs computes none. The --sas-* defaults are vlcp's
    proposals; none comes from the paper.
    """
    from vlcp.baselines import select as ps
    from vlcp.method.sas import SasError, SasParams

    params = SasParams(ipc, keep=sas_keep, alpha=sas_alpha, lam=sas_lambda, mode=mode, seed=seed)
    cfg = ps.SelectConfig(pool, data, ipc, out, data_dir=obj.data_dir, clip_model=clip_model, tiny=tiny,
                          prompt=clip_prompt, anchor=anchor, max_per_class=max_per_class,
                          params=params, allow_duplicates=allow_duplicates, force=force, device=obj.device,
                          batch_size=clip_batch_size, progress=not obj.quiet)
    if tiny and not clip_model and not obj.quiet:
        click.echo("--tiny: a tiny random CLIP (built offline, cached); its scores are noise, for tests and demos only.",
                   err=True)
    with _user_errors():
        try:
            manifest = ps.run(cfg, obj.cache())
        except (ps.SelectError, SasError) as exc:
            raise click.ClickException(str(exc)) from None
    if obj.quiet:
        return
    for w in manifest["warnings"]:
        click.echo(f"warning: {w}", err=True)
    for stage, r in manifest["stages"].items():
        click.echo(f"{stage}: {r['items_computed']} computed, {r['items_cached']} cached"
                   f"{', model loaded' if r['model_loaded'] else ''}")
    n_pool = sum(c["usable"] for c in manifest["classes"].values())
    click.echo(f"--select {mode}: kept {ipc} per class of {n_pool} pool images in {len(manifest['classes'])} "
               f"classes (vlcp's formulation of SAS from its abstract)")
    click.echo(f"wrote {out}/ (manifest.json, preview.png, preview_pool.png)")


@cli.group()
def captions():
    """Share captions: export the cached ones in the reference .jsonl format."""


@captions.command("export")
@click.option("--data", required=True, help="Dataset name or ImageFolder path.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .jsonl to write (also Hugging Face imagefolder metadata: file_name, text).")
@click.option("--tiny", is_flag=True, help="The captions of the tiny captioner.")
@click.option("--captioner", help="[default: llava-hf/llava-1.5-7b-hf]")
@click.option("--caption-prompt", default=_default("caption_prompt"), help="[default: the paper's prompt]")
@click.option("--caption-max-tokens", type=click.IntRange(min=1), help="[default: 256; 32 with --tiny]")
@click.option("--captions-from", type=click.Path(exists=True, dir_okay=False),
              help="The captions a distillation imported with this file (they are cached under its hash).")
@click.option("--classes", help="Comma-separated subset of classes.")
@click.option("--max-per-class", type=click.IntRange(min=1))
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.pass_obj
def captions_export(obj: Ctx, data, out, tiny, captioner, caption_prompt, caption_max_tokens, captions_from,
                    classes, max_per_class, force):
    """Write the cached captions of a dataset, one {"file_name", "text"} object per line (nothing is computed:
    run `vlcp distill ... --until captions` first)."""
    from vlcp.data.caption_files import write_jsonl
    from vlcp.pipeline.config import DistillConfig
    from vlcp.pipeline.loop import cached_captions

    if out.exists() and not force:
        raise click.UsageError(f"{out} exists; pass --force to replace it")
    cfg = DistillConfig(data=data, ipc=1, out=out.parent / ".unused", data_dir=obj.data_dir, device=obj.device,
                        tiny=tiny, captioner=captioner, caption_prompt=caption_prompt,
                        caption_max_tokens=caption_max_tokens, max_per_class=max_per_class, progress=False,
                        captions_from=captions_from, missing_captions="caption",
                        classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None)
    with _user_errors():
        rows = cached_captions(cfg, obj.cache())
    have = [{"file_name": f, "text": t} for f, t in rows if t is not None]
    if not have:
        raise click.ClickException(f"no cached captions for {data} with these settings; run `vlcp distill --data "
                                   f"{data} ... --until captions` first")
    write_jsonl(out, have)
    if not obj.quiet:
        missing = len(rows) - len(have)
        click.echo(f"wrote {out}: {len(have)} captions" + (f" ({missing} images not captioned yet)" if missing else ""))


@cli.group()
def cache():
    """Inspect or clear the stage cache."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def cache_info(obj: Ctx, as_json):
    """Entries and bytes per stage."""
    stats = obj.cache().stats()
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"cache: {obj.cache_dir.resolve()}")
    if not stats:
        click.echo("(empty)")
    for stage, s in sorted(stats.items()):
        click.echo(f"{stage:<16} {s['entries']:>8} entries {_human(s['bytes']):>10}")


@cache.command("clear")
@click.option("--stage", type=StageChoice(("detector_checkpoint", "finetune_checkpoint", "teacher", "baseline_features",
                                           "matching", "matching_checkpoint", "matching_real", "matching_masks",
                                           "models")),
              help="Only this stage (default: everything). A stage whose items are shared with other stages "
                   "(e.g. candidate_scores: detector_scores) clears the shared items, and says so.")
@click.pass_obj
def cache_clear(obj: Ctx, stage):
    """Remove cached artefacts (all, or one stage's)."""
    from vlcp.pipeline.table import STAGE_NAMES, STAGES

    stored = STAGES[STAGE_NAMES.index(stage)].stored_as if stage in STAGE_NAMES else ()
    cache = obj.cache()
    for name in stored or (stage,):
        n = cache.clear(name)
        shared = f" (where {stage} keeps its items, shared with other stages)" if stored else ""
        click.echo(f"removed {n} entr{'y' if n == 1 else 'ies'}" + (f" of stage {name}{shared}" if name else ""))


@cache.command("merge")
@click.argument("src", type=click.Path(path_type=Path))
@click.pass_obj
def cache_merge(obj: Ctx, src):
    """Copy every artefact of the cache directory SRC that this cache lacks (README, "Many processes, one cache")."""
    from vlcp.store.merge import CacheMergeError, merge

    try:
        rep = merge(obj.cache(), src)
    except CacheMergeError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"merged {rep.copied} entr{'y' if rep.copied == 1 else 'ies'} ({_human(rep.bytes)}) from {src}; "
               f"{rep.present} already here" + (f"; {rep.corrupt} corrupt, skipped" if rep.corrupt else ""))


@cli.command()
@click.pass_obj
def datasets(obj: Ctx):
    """Known dataset names, where they are (or would be) stored, and whether they are present."""
    from vlcp.data.datasets import KNOWN, is_present, location

    for name, spec in KNOWN.items():
        loc = location(spec, obj.data_dir)
        where = "embedded in scikit-learn" if loc is None else str(loc)
        status = "present" if is_present(spec, obj.data_dir) else ("missing: " + (spec.url or "see description"))
        click.echo(f"{name:<14} {status}\n{'':<14} {where}\n{'':<14} {spec.description}")


def _table(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main():
    cli(prog_name="vlcp")
