"""The parameters of one distillation: their defaults, their ranges and the per-dataset values.

One source of truth: the CLI reads its defaults from ``DistillConfig`` and maps ``ConfigError`` to a
usage error, and ``vlcp refine``'s rerun from a manifest is validated by the same ``validate()``.
Light on purpose (no numpy, no torch): ``vlcp --help`` imports it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vlcp.models.captioner import ENGINES as CAPTION_ENGINES
from vlcp.models.captioner import MODES as CAPTION_MODES
from vlcp.models.captioner import PROMPT as CAPTION_PROMPT
from vlcp.models.captioner import default_max_tokens

NEGATIVE_PROMPT = "cartoon, anime, painting"


class ConfigError(ValueError):
    """A parameter outside its range or inconsistent with another: a usage error (exit code 2)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


@dataclass
class DistillConfig:
    data: str
    ipc: int
    out: Path
    data_dir: Path = Path("data")
    device: str = "auto"
    tiny: bool = False
    seed: int = 0
    until: str | None = None
    classes: list[str] | None = None
    max_per_class: int | None = None
    captioner: str | None = None
    diffusion: str | None = None
    caption_prompt: str = CAPTION_PROMPT
    caption_batch_size: int | None = None  # None: from GPU memory and the KV cache, 8 off CUDA; 32 with --tiny
    caption_max_tokens: int | None = None  # 1024 (model_vqa.py) with --caption-mode reference, 256 greedy; 32 --tiny
    caption_mode: str = "reference"  # reference: llava_v1 conversation, sampling at T 0.2 seeded per image | greedy
    caption_seed: int = 0  # --caption-mode reference: each image's sampling seed is drawn from (this, image hash)
    caption_engine: str = "hf"  # how generate runs (hf | hf-static), never what it returns: in no key
    resolution: int | None = None
    crop: str = "none"
    latent_batch_size: int = 16
    contamination: float | None = None
    beta: float | None = None
    top_k: int | None = None
    allow_duplicates: bool = False
    clean_captions: bool = True  # remove '"' and "'s" before Algorithm 2 and fine-tuning, as the reference
    captions_from: str | None = None  # the authors' captions (reference .jsonl format)
    missing_captions: str = "error"  # images without an imported caption: error | caption (run the captioner)
    strength: float = 0.7
    guidance_scale: float = 10.0
    steps: int = 50
    negative_prompt: str = NEGATIVE_PROMPT
    long_prompts: str = "reference"  # prompts over 77 tokens: reference (77-token windows) | chunked
    synthesis_batch_size: int | None = None  # 32 (on CUDA cut to what free memory holds), 8 --tiny / --device cpu
    synthesis_compile: bool = False  # torch.compile the UNet for synthesis: speed only, in no key
    image_size: int | None = None
    post_sample: str = "none"  # none | sas (vlcp's formulation of SAS from its abstract)
    pool_multiplier: int = 5
    clip: str | None = None  # default openai/clip-vit-base-patch32; a tiny one with --tiny
    clip_prompt: str = "a photo of a {name}."
    clip_batch_size: int = 64
    sas_keep: float = 0.5
    sas_alpha: float = 0.5
    sas_lambda: float = 0.5
    select: str = "sas"  # sas | relevance | random (the one-score ablation and the random control)
    sas_per_prototype: bool = False
    sas_anchor: str = "prompt"  # prompt | prototype | centroid
    sas_caption_weight: float = 0.0  # W: weight of z(caption match) in the stage-1 quality (vlcp's formulation)
    text_prototypes: str = "reference"  # Algorithm 2 as the reference code computes it, or "paper" (its equations)
    text_strategy: str = "dcs"
    text_llm: str | None = None
    finetune: bool = True
    finetune_method: str = "full"
    finetune_epochs: int | None = None  # 8 as the paper; 1 with --tiny
    finetune_batch_size: int = 8
    finetune_lr: float | None = None  # 1e-5 full, 1e-4 lora
    finetune_max_steps: int | None = None
    finetune_lora_rank: int = 4
    finetune_checkpoint_every: int = 1000  # optimizer steps; one checkpoint of SD v1.5 full + AdamW + EMA ~14 GB
    finetune_ema: bool = True  # the reference's --use_ema
    finetune_ema_decay: float = 0.9999
    finetune_max_grad_norm: float | None = 1.0  # the reference's --max_grad_norm 1; None: no clipping
    finetune_accumulation: int = 4  # the reference's --gradient_accumulation_steps 4 (8 x 4 = 32 per step)
    finetune_flip: bool = True  # the reference's --random_flip (flipped latents)
    finetune_data: str = "center-crop-pairs"  # the reference's Resize + CenterCrop + flip, or the prototype latents
    finetune_resolution: int | None = None  # center-crop-pairs: per dataset (32 CIFAR); None: the latents' resolution
    gradient_checkpointing: bool | None = None  # None: on CUDA only when needed to fit (measured), off on CPU
    finetune_micro_batch: int | None = None  # samples per forward/backward; None: from memory on CUDA (same update)
    finetune_compile: bool = False  # torch.compile the UNet being fine-tuned: speed only, in no key
    finetune_channels_last: bool = False  # NHWC UNet while fine-tuning (CUDA): speed only, in no key
    finetune_precision: str = "fp16"  # the reference's fp16 mixed precision; bf16 changes results (keyed)
    object_masks: bool = False  # vlcp's reading of the multi-modal paper: foreground-weighted LOF/K-Means
    mask_prompt: str | None = None  # what CLIPSeg segments; None: the class name
    segmenter: str | None = None  # default CIDAS/clipseg-rd64-refined; a tiny one with --tiny
    min_foreground: float | None = None  # --refine: less foreground is defective; --post-sample sas: dropped
    min_caption_match: float | None = None  # with --refine: CLIP cosine with its prompt under it is defective
    mask_batch_size: int = 16
    refine: bool = False
    refine_candidates: int = 20
    refine_top_k: int = 2
    refine_beta: float | None = None
    detector: str | None = None  # None: train one; or a safetensors file of --detector-arch weights
    detector_arch: str | None = None  # resnet18, or resnet18-modified for <= 32 px data
    detector_epochs: int = 300
    force: bool = False
    log_dir: Path | None = None  # --log-dir: TensorBoard curves of what trains; changes no result, so in no key
    progress: bool = True
    warnings: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Ranges and consistency, before anything is loaded; raises ConfigError."""
        _at_least("--ipc", self.ipc, 1)
        _in_range("--beta", self.beta, 0, 1, low_open=True)
        _in_range("--strength", self.strength, 0, 1, low_open=True)
        _in_range("--contamination", self.contamination, 0, 0.5)
        _in_range("--refine-beta", self.refine_beta, 0, 1)
        for name in ("top_k", "steps", "latent_batch_size", "synthesis_batch_size", "caption_batch_size",
                     "caption_max_tokens", "finetune_epochs", "finetune_batch_size", "finetune_max_steps",
                     "finetune_lora_rank", "finetune_checkpoint_every", "finetune_accumulation", "refine_candidates",
                     "refine_top_k",
                     "detector_epochs", "image_size", "max_per_class", "pool_multiplier", "clip_batch_size",
                     "mask_batch_size"):
            _at_least("--" + name.replace("_", "-"), getattr(self, name), 1)
        for name in ("seed", "caption_seed"):  # what KMeans, numpy and torch.manual_seed all take
            _in_range("--" + name.replace("_", "-"), getattr(self, name), 0, 2**32 - 1)
        _at_least("--resolution", self.resolution, 8)
        _at_least("--finetune-resolution", self.finetune_resolution, 8)
        _positive("--finetune-lr", self.finetune_lr)
        _in_range("--finetune-ema-decay", self.finetune_ema_decay, 0, 1)
        _positive("--finetune-max-grad-norm", self.finetune_max_grad_norm)
        for name, allowed in CHOICES.items():
            if name != "detector_arch" or self.detector_arch is not None:  # None: chosen from the image size
                _choice("--" + name.replace("_", "-"), getattr(self, name), allowed)
        _at_least("--finetune-micro-batch", self.finetune_micro_batch, 1)
        if self.finetune_micro_batch is not None:
            from vlcp.method.micro_batch import check_micro_batch

            try:
                check_micro_batch(self.finetune_micro_batch, self.finetune_batch_size, self.finetune_accumulation)
            except ValueError as exc:
                raise ConfigError("--finetune-micro-batch", str(exc)) from None
        if self.finetune_resolution is not None and self.finetune_data != "center-crop-pairs":
            raise ConfigError("--finetune-resolution", "applies to --finetune-data center-crop-pairs "
                                                       "(prototype-latents trains on the prototype latents)")
        _in_range("--sas-keep", self.sas_keep, 0, 1, low_open=True)
        _in_range("--sas-alpha", self.sas_alpha, 0, 1)
        _in_range("--sas-lambda", self.sas_lambda, 0, 1)
        _in_range("--sas-caption-weight", self.sas_caption_weight, 0, 1)
        if "{name}" not in self.clip_prompt:
            raise ConfigError("--clip-prompt", f"must contain {{name}}, got {self.clip_prompt!r}")
        _check_masks(self)
        if self.captions_from is not None and not Path(self.captions_from).is_file():
            raise ConfigError("--captions-from", f"{self.captions_from} is not a file")
        if self.until is not None:
            from vlcp.pipeline.table import STAGE_NAMES

            _choice("--until", self.until, STAGE_NAMES)
        _out_outside_data(Path(self.out), self.data, Path(self.data_dir))

    @property
    def finetune_pairs(self) -> bool:
        """Fine-tuning on cached centre-crop pairs (the stage table's switch for ``training_latents``)."""
        return self.finetune and self.finetune_data == "center-crop-pairs"

    @property
    def sas(self) -> bool:
        """Post-sampling is on (the stage table's switch for its stages)."""
        return self.post_sample == "sas"

    @property
    def sas_foreground(self) -> bool:
        """Post-sampling with a foreground threshold: every pool image's foreground is measured."""
        return self.sas and bool(self.min_foreground)

    @property
    def refine_foreground(self) -> bool:
        """Refinement with a foreground threshold: kept images and candidates are segmented."""
        return self.refine and bool(self.min_foreground)

    @property
    def sas_refine(self) -> bool:
        """Post-sampling then refinement: a defective kept image first takes a pool candidate."""
        return self.sas and self.refine

    def fill_defaults(self) -> dict:
        """Dataset defaults for the options left unset; returns the table row used."""
        from vlcp.data.defaults import defaults_for

        row = defaults_for(self.data)
        for name in ("contamination", "beta", "top_k", "image_size"):
            if getattr(self, name) is None:
                setattr(self, name, row[name])
        if self.synthesis_batch_size is None:  # images per pipeline call at most (vlcp.method.synthesis.Speed)
            self.synthesis_batch_size = 8 if self.tiny or self.device == "cpu" else 32
        if self.caption_batch_size is None and self.tiny:
            self.caption_batch_size = 32  # otherwise chosen from GPU memory when captions are computed
        if self.caption_max_tokens is None:
            self.caption_max_tokens = 32 if self.tiny else default_max_tokens(self.caption_mode)
        if self.finetune_resolution is None and self.finetune_data == "center-crop-pairs":
            self.finetune_resolution = row.get("finetune_resolution")  # None: the latents' resolution
        if self.finetune_epochs is None:
            self.finetune_epochs = 1 if self.tiny else 8
        if self.refine_beta is None:
            from vlcp.method.refine import default_beta

            self.refine_beta = default_beta(self.data)
        return row

    def params(self) -> dict:
        """The parameters as recorded in manifest.json (and read back by ``vlcp refine``)."""
        d = asdict(self)
        for k in ("out", "data_dir", "warnings", "progress", "log_dir"):  # log_dir: where curves go, not a result
            d.pop(k)
        d["out"], d["data_dir"] = str(self.out), str(self.data_dir)
        return d

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "DistillConfig":
        """A config from a manifest's parameters (unknown keys of other versions are ignored)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in params.items() if k in known and k not in ("warnings", "progress")}
        kw = {**{k: v for k, v in BEFORE_OPTION.items() if k not in params}, **kw, **overrides}
        for k in ("out", "data_dir"):
            kw[k] = Path(kw[k])
        return cls(**kw)


# what runs did before an option existed: a manifest without the field is rerun as it was made
BEFORE_OPTION = {"caption_mode": "greedy", "finetune_data": "prototype-latents"}


def default(name: str):
    """The dataclass default of a field (what the CLI shows)."""
    return DistillConfig.__dataclass_fields__[name].default


def _at_least(param: str, value, low) -> None:
    if value is not None and value < low:
        raise ConfigError(param, f"must be at least {low}, got {value}")


def _positive(param: str, value) -> None:
    if value is not None and value <= 0:
        raise ConfigError(param, f"must be positive, got {value}")


def _in_range(param: str, value, low, high, low_open: bool = False) -> None:
    if value is None:
        return
    if value < low or value > high or (low_open and value == low):
        raise ConfigError(param, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")


# the allowed values of every option that is a choice: config.validate checks them, cli.py offers them
CHOICES: dict[str, tuple[str, ...]] = {
    "missing_captions": ("error", "caption"),
    "caption_mode": CAPTION_MODES,
    "caption_engine": CAPTION_ENGINES,
    "crop": ("none", "center"),
    "long_prompts": ("reference", "chunked"),
    "text_prototypes": ("reference", "paper"),
    "text_strategy": ("dcs", "label", "label+keywords", "llm"),
    "finetune_method": ("full", "lora"),
    "finetune_data": ("center-crop-pairs", "prototype-latents"),
    "finetune_precision": ("fp16", "bf16"),
    "post_sample": ("none", "sas"),
    "select": ("sas", "relevance", "random"),
    "sas_anchor": ("prompt", "prototype", "centroid"),
    "detector_arch": ("resnet18", "resnet18-modified"),
}


def _choice(param: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(param, f"must be one of {', '.join(choices)}, got {value!r}")


def _check_masks(cfg: DistillConfig) -> None:
    """Object-mask options (vlcp's reading of the multi-modal paper): a prompt with text, F in [0, 1] with --refine."""
    if cfg.mask_prompt is not None and not cfg.mask_prompt.strip():
        raise ConfigError("--mask-prompt", "must not be empty (leave it out to segment the class name)")
    _in_range("--min-foreground", cfg.min_foreground, 0, 1)
    if cfg.min_foreground is not None and not (cfg.refine or cfg.post_sample == "sas"):
        raise ConfigError("--min-foreground", "is a refinement or post-sampling criterion: add --refine or "
                                              "--post-sample sas")
    _in_range("--min-caption-match", cfg.min_caption_match, 0, 1, low_open=True)
    if cfg.min_caption_match is not None and not cfg.refine:
        raise ConfigError("--min-caption-match", "is a refinement criterion: add --refine")


def _out_outside_data(out: Path, data: str, data_dir: Path) -> None:
    """The next run would read synthetic images as training data if --out lay inside the dataset."""
    roots = [Path(data)] if Path(data).is_dir() else []
    if not roots:
        from vlcp.data.datasets import KNOWN, location

        loc = location(KNOWN[data], data_dir) if data in KNOWN else None
        roots = [loc] if loc is not None else []
    o = out.resolve()
    for root in roots:
        r = root.resolve()
        if o == r or r in o.parents or o in r.parents:
            raise ConfigError("--out", f"{out} is {'inside' if r in o.parents else 'the same as or contains'} "
                                       f"the dataset folder {root}; write the output somewhere else")
