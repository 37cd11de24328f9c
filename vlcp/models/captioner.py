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
"""
from __future__ import annotations

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


def caption_images(model, processor, images: list, class_names: list[str], prompt: str, max_new_tokens: int,
                   mode: str = "greedy", seeds: list[int] | None = None) -> list[str]:
    """Captions for a batch, each prompt naming the image's own class; ``seeds``: one per image (reference)."""
    if mode == "reference":
        return [_reference_caption(model, processor, im, format_prompt(prompt, name), max_new_tokens, s)
                for im, name, s in zip(images, class_names, seeds)]
    if mode != "greedy":
        raise ValueError(f"unknown caption mode {mode!r}; known: {', '.join(MODES)}")
    return _greedy_captions(model, processor, images, class_names, prompt, max_new_tokens)


def _greedy_captions(model, processor, images, class_names, prompt, max_new_tokens) -> list[str]:
    import torch

    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": format_prompt(prompt, name)}]}],
        add_generation_prompt=True) for name in class_names]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [" ".join(t.split()) for t in processor.batch_decode(new, skip_special_tokens=True)]


def _reference_caption(model, processor, image, question: str, max_new_tokens: int, seed: int) -> str:
    """One image as model_vqa.py captions it, the sampling seeded (the global RNG is left as it was)."""
    import torch

    mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    square = expand2square(image.convert("RGB"), tuple(int(x * 255) for x in mean))
    text = llava_v1_prompt(question, getattr(processor, "image_token", "<image>"))
    inputs = processor(images=[square], text=[text], return_tensors="pt").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(**inputs, do_sample=True, temperature=TEMPERATURE, top_p=None, num_beams=1,
                             max_new_tokens=max_new_tokens)
    new = out[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(new, skip_special_tokens=True)[0].strip()  # model_vqa.py l. 74
