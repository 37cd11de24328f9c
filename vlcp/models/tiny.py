"""Tiny, randomly initialised stand-ins for Stable Diffusion and LLaVA, built from config.

``--tiny`` builds them once with a fixed seed, saves them with ``save_pretrained`` under
``<cache>/models/`` and hands their directories to the very same ``from_pretrained`` loaders the real
hub ids go through. They exist so that tests, CI and an offline demo exercise every code path in
seconds on a CPU; their images and captions are noise, and the CLI says so.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = 3
TINY_SD = f"tiny-sd-v{TINY_VERSION}"
TINY_LLAVA = f"tiny-llava-v{TINY_VERSION}"
TINY_LLM = f"tiny-llm-v{TINY_VERSION}"

# The tiny captioner's whole vocabulary, so that its (random) captions are made of real words.
_CORPUS = """The digit in the image is written with a thick curved stroke and a small loop at the top.
It has a long straight line, a round shape, a slanted posture, and a dark color on a white background.
The object is large and bright, with sharp edges, a smooth surface, thin lines, a tall narrow body,
a wide base, a brown and black pattern, a grassy field, standing, sitting, running, small, elegant.
Describe the physical appearance of the handwritten digit in the image. Include details about its shape,
posture, color, and any distinct features."""


FILES_MANIFEST = ".vlcp-files.json"  # relative path -> size of every file, written when built (a dotfile:
#                                     model identities hash the other files only)


def tiny_models(models_dir: Path) -> tuple[Path, Path, Path]:
    """(stable diffusion, llava, text llm) directories under models_dir, built on first use.

    A directory whose files no longer match what was built (a file deleted, truncated or grown) is
    rebuilt: the builders are seeded, so it comes back with the same bytes and the same identity.
    """
    dirs = Path(models_dir) / TINY_SD, Path(models_dir) / TINY_LLAVA, Path(models_dir) / TINY_LLM
    for d, build in zip(dirs, (_build_sd, _build_llava, _build_llm)):
        ensure_built(d, build)
    return dirs


def ensure_built(d: Path, build) -> Path:
    """``d``, (re)built with ``build`` unless it is intact: a missing or damaged tiny model is rebuilt with
    the same bytes (seeded), so it keeps its identity. Every tiny model (SD, LLaVA, LLM, CLIP, CLIPSeg)."""
    if not intact(d):
        from vlcp.models.loading import quiet_libraries

        quiet_libraries()
        if d.exists():
            _set_aside(d)
        _build_atomically(d, build)
    return d


def intact(d: Path) -> bool:
    """Whether a built tiny model directory still holds every file it was built with, at its size."""
    try:
        files = json.loads((d / FILES_MANIFEST).read_text())
        return bool(files) and all((d / f).is_file() and (d / f).stat().st_size == n for f, n in files.items())
    except (OSError, ValueError, AttributeError):
        return False


def _set_aside(d: Path) -> None:
    """Move a damaged directory out of the way (atomic rename), then delete it."""
    trash = Path(tempfile.mkdtemp(dir=d.parent, prefix=".damaged-"))
    try:
        d.rename(trash / d.name)
    except OSError:  # another process moved or rebuilt it meanwhile
        pass
    shutil.rmtree(trash, ignore_errors=True)


def _build_atomically(dest: Path, build) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".build-"))
    try:
        build(tmp)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*"))
                 if f.is_file() and not f.name.startswith(".")}
        (tmp / FILES_MANIFEST).write_text(json.dumps(files, indent=0, sort_keys=True))
        try:
            tmp.rename(dest)
        except OSError:  # another process built it first: theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _byte_vocab() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _build_sd(out: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        layers_per_block=1, sample_size=32, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2)
    vocab = _byte_vocab()
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77, projection_dim=32))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)


_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


_LLM_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _word_tokenizer():
    """A word-level tokenizer over _CORPUS: whatever a random model emits is a sequence of real words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(re.findall(r"[a-z]+|[.,]", _CORPUS.lower()))))}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.add_special_tokens(specials)  # keep "<image>" whole
    return PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left")


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                       eos_token_id=2, pad_token_id=3)


def _build_llm(out: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    tokenizer = _word_tokenizer()
    tokenizer.chat_template = _LLM_TEMPLATE
    model = LlamaForCausalLM(_tiny_llama(len(tokenizer)))
    model.generation_config.eos_token_id = None  # never stop early: sentences are never empty
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _build_llava(out: Path) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(0)
    tokenizer = _word_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16),
        text_config=_tiny_llama(len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = None  # random weights: never stop early, so captions are never empty
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))


# Public names for the benchmark of the real shapes (random weights in real architectures need a tokenizer
# and a chat template too; these have no files to download).
word_tokenizer = _word_tokenizer
byte_vocab = _byte_vocab
LLAVA_CHAT_TEMPLATE = _CHAT_TEMPLATE
