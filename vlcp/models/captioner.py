"""Stage ``captions``: one description per real image from a vision-language model (paper, section 3.1).

Two modes. ``reference`` makes captions as the VLCP reference did (its README runs LLaVA's own
``llava/eval/model_vqa.py`` on the question file ``01_text_generation/config_produce_llava.py`` writes):
the ``llava_v1`` conversation with its system message (``llava/conversation.py:conv_llava_v1``), the
image padded to a square with the processor's mean colour (``llava/mm_utils.py:process_images``, LLaVA-1.5's
``image_aspect_ratio pad``), sampling at temperature 0.2 with top-p unset and one beam, one image per
``generate`` call, the answer only stripped. vlcp seeds each image's sampling from (caption seed, image
hash), so a caption never depends on the batch it was made in and a rerun makes the same text.
``greedy`` is vlcp's earlier mode: the processor's chat template without a system message, batched
greedy decoding, whitespace collapsed.

How ``generate`` runs (issue 25), never what it returns: an ``Engine``. ``hf`` (``--caption-engine``'s
default) is transformers' dynamic KV cache; ``hf-static`` a ``StaticCache`` sized once for the longest call,
whose decode step transformers compiles on CUDA (``CompileConfig``: CUDA graphs). With an engine the
reference mode makes a batch in one ``generate`` call (``RowSampler``: every row samples from its own
``torch.Generator``, seeded as the one-image call seeds the global one), rows of one prompt length together
(no padding); tests/test_throughput.py checks on CPU that every caption is token for token the one-image
call's. ``engine=None`` is the one-image call itself (``--caption-batch-size 1`` gives the same).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

VERSION = 1
# config_produce_llava.py l. 20, byte for byte: no space after "image." (the reference's question text)
PROMPT = ("Describe the physical appearance of the {CLASSNAME} in the image."
          "Include details about its shape, posture, color, and any distinct features.")
MODES = ("reference", "greedy")
# llava/conversation.py:conv_llava_v1 (system, roles USER/ASSISTANT, sep " ", SeparatorStyle.TWO)
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
TEMPERATURE = 0.2  # model_vqa.py's --temperature default (top_p None, num_beams 1)
REFERENCE_MAX_TOKENS = 1024  # model_vqa.py l. 71: max_new_tokens=1024


def default_max_tokens(mode: str) -> int:
    """New tokens per caption unless --caption-max-tokens says otherwise: model_vqa.py's 1024 for the reference
    mode, 256 greedy (LLaVA's descriptions are typically < 150 tokens)."""
    return REFERENCE_MAX_TOKENS if mode == "reference" else 256


def format_prompt(template: str, class_name: str) -> str:
    return template.replace("{CLASSNAME}", class_name)


def llava_v1_prompt(question: str, image_token: str = "<image>") -> str:
    """What ``conv_templates["llava_v1"]`` renders for one question about one image (model_vqa.py l. 46-54:
    ``<image>\\n`` before the question, then ``conv.get_prompt()``; mm_use_im_start_end is off in LLaVA-1.5)."""
    return f"{LLAVA_V1_SYSTEM} USER: {image_token}\n{question} ASSISTANT:"


def expand2square(img, background: tuple[int, ...]):
    """``llava/mm_utils.py:expand2square``: the image centred on a square of ``background``."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def item_seed(seed: int, image_digest: str) -> int:
    """The sampling seed of one image's caption: from (caption seed, image content hash) only."""
    from vlcp.store.cache import stable_hash

    return int(stable_hash([seed, image_digest], 15), 16)


def decoding(mode: str, seed: int) -> str | dict:
    """What the caption key says about how a caption was decoded (``greedy``: the key vlcp always wrote)."""
    if mode == "greedy":
        return "greedy"
    return {"conversation": "llava_v1", "temperature": TEMPERATURE, "pad": "square", "seed": seed}


ENGINES = ("hf", "hf-static")


@dataclass(frozen=True)
class Engine:
    """How ``generate`` runs: speed only, the tokens are the same (tests/test_throughput.py, on CPU)."""
    cache: str = "dynamic"  # "static": transformers' StaticCache (preallocated, compilable)
    compile: str | None = None  # torch.compile backend of the decode step (transformers' CompileConfig)
    batched: bool = False  # reference mode: one generate call per batch (RowSampler), not one per image


def resolve_engine(name: str, device_type: str) -> Engine:
    """``--caption-engine``: ``hf-static`` compiles the decode step on CUDA only (inductor takes ~2 min for
    the tiny LLaVA on 2 CPU cores; on CUDA it captures CUDA graphs)."""
    if name == "hf":
        return Engine(batched=True)
    if name == "hf-static":
        return Engine("static", "inductor" if device_type == "cuda" else None, batched=True)
    raise ValueError(f"unknown caption engine {name!r}; known: {', '.join(ENGINES)}")


def caption_images(model, processor, images: list, class_names: list[str], prompt: str, max_new_tokens: int,
                   mode: str = "greedy", seeds: list[int] | None = None,
                   engine: Engine | str | None = None) -> list[str]:
    """Captions for a batch, each prompt naming the image's own class; ``seeds``: one per image (reference).
    ``engine``: an Engine or its ``--caption-engine`` name; None: one image per call in reference mode."""
    if isinstance(engine, str):
        engine = resolve_engine(engine, model.device.type)
    eng = engine or Engine()
    if mode == "reference":
        questions = [format_prompt(prompt, name) for name in class_names]
        warpers = _sampling_warpers(model) if eng.batched else None
        if warpers is not None:
            return _reference_batch(model, processor, images, questions, max_new_tokens, seeds, eng, warpers)
        return [_reference_caption(model, processor, im, q, max_new_tokens, s, eng)
                for im, q, s in zip(images, questions, seeds)]
    if mode != "greedy":
        raise ValueError(f"unknown caption mode {mode!r}; known: {', '.join(MODES)}")
    return _greedy_captions(model, processor, images, class_names, prompt, max_new_tokens, eng)


def caption_fitting(model, processor, images: list, class_names: list[str], prompt: str, max_new_tokens: int,
                    mode: str = "greedy", seeds: list[int] | None = None, engine: Engine | str | None = None,
                    on_halve=None) -> list[str]:
    """``caption_images``; a batch that runs out of GPU memory is captioned again as two halves, down to one
    image (the batch from memory counts the KV cache, not the dynamic cache's growth or the allocator's
    fragments). Each row's caption does not depend on its batch (greedy rows; a generator per row), so a halved
    batch makes the same captions, as any batch size does. ``on_halve(n)`` is told each batch of n halved."""
    import torch

    try:
        return caption_images(model, processor, images, class_names, prompt, max_new_tokens, mode, seeds, engine)
    except torch.OutOfMemoryError:
        if len(images) == 1:
            raise
    # out of the handler: the failed call's frames and tensors are released before the retry
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if on_halve:
        on_halve(len(images))
    h = len(images) // 2
    halves = [slice(0, h), slice(h, len(images))]
    return [c for part in halves for c in caption_fitting(
        model, processor, images[part], class_names[part], prompt, max_new_tokens, mode,
        seeds[part] if seeds is not None else None, engine, on_halve)]


def _cache_kwargs(model, eng: Engine) -> dict:
    """What ``generate`` takes for the engine's cache: none for the dynamic one."""
    if eng.cache == "dynamic":
        return {}
    kw = {"cache_implementation": eng.cache}
    if eng.compile:
        from transformers import CompileConfig

        cc = CompileConfig(backend=eng.compile, mode="reduce-overhead" if model.device.type == "cuda" else None)
        cc._compile_all_devices = model.device.type != "cuda"  # transformers compiles on CUDA only otherwise
        kw["compile_config"] = cc
    return kw


def _greedy_captions(model, processor, images, class_names, prompt, max_new_tokens, eng: Engine = Engine()):
    import torch

    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": format_prompt(prompt, name)}]}],
        add_generation_prompt=True) for name in class_names]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             **_cache_kwargs(model, eng))
    new = out[:, inputs["input_ids"].shape[1]:]
    return [" ".join(t.split()) for t in processor.batch_decode(new, skip_special_tokens=True)]


def _reference_inputs(model, processor, image, question: str):
    """One image's model_vqa.py inputs: the llava_v1 prompt and the image padded to a square."""
    mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    square = expand2square(image.convert("RGB"), tuple(int(x * 255) for x in mean))
    text = llava_v1_prompt(question, getattr(processor, "image_token", "<image>"))
    inputs = processor(images=[square], text=[text], return_tensors="pt").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _reference_caption(model, processor, image, question: str, max_new_tokens: int, seed: int,
                       eng: Engine = Engine()) -> str:
    """One image as model_vqa.py captions it, the sampling seeded (the global RNG is left as it was)."""
    import torch

    inputs = _reference_inputs(model, processor, image, question)
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(**inputs, do_sample=True, temperature=TEMPERATURE, top_p=None, num_beams=1,
                             max_new_tokens=max_new_tokens, **_cache_kwargs(model, eng))
    new = out[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(new, skip_special_tokens=True)[0].strip()  # model_vqa.py l. 74


def _sampling_warpers(model) -> list | None:
    """The warpers transformers applies when the one-image call samples (``do_sample=True, temperature=0.2,
    top_p=None`` over the model's generation config), in its order; None when the config asks for one this
    does not rebuild (the batch then falls back to one image per call)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    gc = model.generation_config
    unsupported = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None,
                   "renormalize_logits": False, "watermarking_config": None}
    if any(getattr(gc, k, off) not in (None, off) for k, off in unsupported.items()):
        return None
    top_k = 50 if gc.top_k is None else gc.top_k  # transformers' default when neither model nor call sets it
    warpers = [TemperatureLogitsWarper(TEMPERATURE)]
    return warpers + ([TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1)] if top_k else [])


class RowSampler:
    """The last logits processor of a batched reference call: row i draws its token exactly as the one-image
    call does (softmax, then ``torch.multinomial`` of one sample) but from its own generator, and leaves
    only that token possible, so greedy selection takes it. A finished row keeps drawing (its draws are
    discarded: ``generate`` pads it)."""

    def __init__(self, generators: list):
        self.generators = generators

    def __call__(self, input_ids, scores):
        import torch

        picks = [torch.multinomial(torch.nn.functional.softmax(scores[i:i + 1], dim=-1), 1, generator=g)
                 for i, g in enumerate(self.generators)]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, torch.cat(picks), 0.0)


def _reference_batch(model, processor, images, questions, max_new_tokens, seeds, eng: Engine, warpers) -> list[str]:
    """Reference captions, one generate call per prompt length: the rows of a call need no padding, so each
    sees the one-image call's inputs exactly."""
    import torch
    from transformers import LogitsProcessorList

    inputs = [_reference_inputs(model, processor, im, q) for im, q in zip(images, questions)]
    out: list[str] = [""] * len(images)
    for length in sorted({x["input_ids"].shape[1] for x in inputs}):
        idx = [i for i, x in enumerate(inputs) if x["input_ids"].shape[1] == length]
        batch = {k: torch.cat([inputs[i][k] for i in idx]) for k in inputs[idx[0]].keys()}
        gens = [torch.Generator(device=model.device).manual_seed(seeds[i]) for i in idx]
        with torch.inference_mode():
            ids = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                 logits_processor=LogitsProcessorList([*warpers, RowSampler(gens)]),
                                 **_cache_kwargs(model, eng))
        for i, text in zip(idx, processor.batch_decode(ids[:, length:], skip_special_tokens=True)):
            out[i] = text.strip()
    return out


# -- batch size from memory (CUDA) ----------------------------------------------------------------------
PROMPT_TEXT_TOKENS = 128  # the llava_v1 system message, the question and a class name, with room to spare


def kv_bytes_per_token(text_config, dtype_bytes: int) -> int:
    """Bytes the KV cache holds per token of one sequence: keys and values of every layer."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * heads * head_dim * dtype_bytes


def roofline_batch(weights_bytes: float, kv_bytes_per_token: float, context_tokens: float,
                   share: float = 0.8) -> int:
    """The smallest batch whose decoding reaches ``share`` of the memory roofline's limit. A step reads the
    weights once and every sequence's KV cache: B tokens per (W + B K c) bytes, which tends to 1 / (K c) as B
    grows and reaches ``share`` of it at B = share / (1 - share) x W / (K c). Past that a bigger batch buys
    little and costs KV memory. (Decoding a 7B model stays bandwidth-bound: 2 FLOPs per weight per token.)"""
    return max(1, math.ceil(share / (1 - share) * weights_bytes / (kv_bytes_per_token * context_tokens)))


def caption_batch_size(free_bytes: float, weights_bytes: float, kv_bytes_per_token: float, tokens: int,
                       cap: int, headroom: float = 0.8) -> int:
    """Sequences whose KV cache of ``tokens`` tokens each fits ``headroom`` of the memory left after the weights
    (``free_bytes``: free before they are loaded; the rest is for activations, logits and the allocator),
    from 1 to ``cap``."""
    fit = int((free_bytes - weights_bytes) * headroom // (kv_bytes_per_token * tokens))
    return max(1, min(cap, fit))


def batch_for_model(model, max_new_tokens: int) -> int:
    """The captioning batch on this CUDA model's GPU: ``caption_batch_size`` with the model's own KV cache size
    and weights, capped by ``roofline_batch``."""
    import torch

    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    free, _ = torch.cuda.mem_get_info(model.device)
    free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)  # the allocator's
    cfg = model.config  # cached but unused blocks are free to the KV cache too (as synthesis and fine-tuning count)
    image_tokens = getattr(cfg, "image_seq_length", None) or 576
    kv = kv_bytes_per_token(cfg.get_text_config(), torch.finfo(model.dtype).bits // 8)
    prompt = image_tokens + PROMPT_TEXT_TOKENS
    cap = roofline_batch(weights, kv, prompt + max_new_tokens / 2)  # the mean context while decoding
    return caption_batch_size(free + weights, weights, kv, prompt + max_new_tokens, cap)
