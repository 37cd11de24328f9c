"""Stage ``captions``: one description per real image from a vision-language model (paper, section 3.1)."""
from __future__ import annotations

VERSION = 1
PROMPT = ("Describe the physical appearance of the {CLASSNAME} in the image. "
          "Include details about its shape, posture, color, and any distinct features.")


def format_prompt(template: str, class_name: str) -> str:
    return template.replace("{CLASSNAME}", class_name)


def caption_images(model, processor, images: list, class_names: list[str], prompt: str,
                   max_new_tokens: int) -> list[str]:
    """Greedy (deterministic) captions for a batch, each prompt naming the image's own class."""
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
