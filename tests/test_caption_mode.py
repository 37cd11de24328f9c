"""Captions as the reference made them (issue 22, section 4): its question byte for byte, LLaVA's
``llava_v1`` conversation, the image padded to a square, sampling at temperature 0.2, one image per call,
seeded per image so that a caption never depends on its batch; ``--caption-mode greedy`` keeps vlcp's
earlier decoding."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlcp.models import captioner
from vlcp.models.captioner import PROMPT, caption_images, llava_v1_prompt
from vlcp.pipeline.config import DistillConfig

# 01_text_generation/config_produce_llava.py l. 20 of the reference, copied byte for byte
REFERENCE_QUESTION = ("Describe the physical appearance of the {IMAGENET2012_CLASSES[subfolder]} in the image.Include "
                      "details about its shape, posture, color, and any distinct features.")
# llava/conversation.py: conv_llava_v1 (l. 325-335) rendered by get_prompt's SeparatorStyle.TWO branch
# (l. 54-63) after model_vqa.py l. 49-53 appended "<image>\n" + question and an empty assistant turn
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions. USER: <image>\nQ? ASSISTANT:")


def test_the_default_question_is_the_reference_s_byte_for_byte():
    ours = PROMPT.replace("{CLASSNAME}", "{IMAGENET2012_CLASSES[subfolder]}")
    assert ours.encode() == REFERENCE_QUESTION.encode()
    assert "image.Include" in PROMPT  # the reference's missing space, kept
    assert DistillConfig(data="digits", ipc=1, out=Path("o")).caption_prompt == PROMPT


def test_the_llava_v1_conversation_has_its_system_message():
    assert llava_v1_prompt("Q?") == LLAVA_V1


class _Inputs(dict):
    def to(self, device):
        return self


class _Processor:
    """Records what the captioner is handed; answers with whitespace around and inside the text."""
    image_processor = type("IP", (), {"image_mean": [0.5, 0.25, 0.0]})()
    image_token = "<image>"

    def __init__(self):
        self.calls = []

    def __call__(self, images, text, return_tensors):
        self.calls.append((images, text))
        return _Inputs(input_ids=torch.zeros((len(text), 3), dtype=torch.long),
                       pixel_values=torch.zeros((len(images), 3, 2, 2)))

    def batch_decode(self, ids, skip_special_tokens):
        assert ids.shape == (1, 2) and skip_special_tokens  # only the new tokens
        return ["  two\nlines  "]


class _Model:
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self):
        self.calls = []

    def generate(self, **kw):
        self.calls.append({k: v for k, v in kw.items() if k not in ("input_ids", "pixel_values")}
                          | {"seed": torch.initial_seed()})
        return torch.zeros((1, 5), dtype=torch.long)


def test_reference_mode_is_model_vqa_one_image_at_a_time():
    proc, model = _Processor(), _Model()
    wide = Image.new("RGB", (4, 2), (200, 10, 10))
    tall = Image.new("RGB", (1, 3), (0, 0, 250))
    out = caption_images(model, proc, [wide, tall], ["cat", "dog"], "Q {CLASSNAME}?", 7, "reference", [11, 12])
    assert out == ["two\nlines", "two\nlines"]  # stripped only, as model_vqa.py l. 74
    assert [len(imgs) for imgs, _ in proc.calls] == [1, 1]  # batch 1
    assert [t for _, t in proc.calls] == [[LLAVA_V1.replace("Q?", "Q cat?")], [LLAVA_V1.replace("Q?", "Q dog?")]]
    padded = np.asarray(proc.calls[0][0][0])
    assert padded.shape == (4, 4, 3)  # expand2square: the mean colour (127, 63, 0) above and below
    assert (padded[[0, 3]] == (127, 63, 0)).all() and (padded[1:3] == (200, 10, 10)).all()
    tall_sq = np.asarray(proc.calls[1][0][0])
    assert tall_sq.shape == (3, 3, 3) and (tall_sq[:, 1] == (0, 0, 250)).all() and (tall_sq[:, 0] == (127, 63, 0)).all()
    assert model.calls == [dict(do_sample=True, temperature=0.2, top_p=None, num_beams=1, max_new_tokens=7, seed=s)
                           for s in (11, 12)]
    with pytest.raises(ValueError, match="unknown caption mode 'beam'"):
        caption_images(model, proc, [wide], ["cat"], "Q", 7, "beam", [1])


def test_sampled_captions_are_seeded_per_image_and_leave_the_global_rng_alone(tiny_models_dir, tmp_path):
    from vlcp.models.loading import load_captioner, resolve
    from vlcp.models.tiny import TINY_LLAVA
    from vlcp.store.cache import StageCache

    model, proc = load_captioner(resolve(str(tiny_models_dir / TINY_LLAVA), StageCache(tmp_path / "c")), "cpu")
    imgs = [Image.new("RGB", (8, 8), c) for c in ("white", "black", "red")]
    names = ["handwritten digit 1", "handwritten digit 2", "handwritten digit 3"]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    both = caption_images(model, proc, imgs, names, PROMPT, 12, "reference", [5, 6, 7])
    assert torch.equal(torch.get_rng_state(), state)
    assert both == caption_images(model, proc, imgs, names, PROMPT, 12, "reference", [5, 6, 7])  # rerun: same
    alone = [caption_images(model, proc, [im], [n], PROMPT, 12, "reference", [s])[0]
             for im, n, s in zip(imgs[::-1], names[::-1], [7, 6, 5])]
    assert alone[::-1] == both  # a caption does not depend on the batch it is made in
    assert caption_images(model, proc, imgs[:1], names[:1], PROMPT, 12, "reference", [8]) != both[:1]  # other seed
    greedy = caption_images(model, proc, imgs, names, PROMPT, 12)  # greedy stays the default of the function
    assert greedy != both and greedy == caption_images(model, proc, imgs, names, PROMPT, 12, "greedy", None)


def test_item_seeds_and_the_decoding_in_the_key():
    assert captioner.item_seed(0, "abc") == captioner.item_seed(0, "abc") != captioner.item_seed(1, "abc")
    assert captioner.item_seed(0, "abc") != captioner.item_seed(0, "abd") and captioner.item_seed(0, "abc") < 16 ** 15
    assert captioner.decoding("greedy", 3) == "greedy"  # the key greedy captions always had
    assert captioner.decoding("reference", 3) == {"conversation": "llava_v1", "temperature": 0.2, "pad": "square",
                                                  "seed": 3}


@pytest.mark.parametrize("mode, tiny, tokens", [("reference", False, 1024), ("greedy", False, 256),
                                                ("reference", True, 32), ("greedy", True, 32)])
def test_max_new_tokens_default_follows_the_mode(mode, tiny, tokens):
    cfg = DistillConfig(data="digits", ipc=1, out=Path("o"), caption_mode=mode, tiny=tiny)
    cfg.fill_defaults()
    assert cfg.caption_max_tokens == tokens  # model_vqa.py l. 71: max_new_tokens=1024


def test_caption_mode_and_seed_choose_the_captions(vlcp, tmp_path):
    """Default: sampled captions; --caption-mode greedy keeps the key vlcp's greedy captions always had; a new
    --caption-seed makes new captions; --seed does not touch them."""
    from tests.conftest import read_manifest
    from vlcp.data.datasets import load_dataset
    from vlcp.models.loading import resolve
    from vlcp.models.tiny import TINY_LLAVA
    from vlcp.store.cache import KEY_LAYOUT, StageCache, stage_key

    args = ["distill", "--data", "digits", "--tiny", "--classes", "0", "--max-per-class", "3", "--ipc", "1",
            "--until", "captions"]
    computed = {}
    for name, extra in [("a", []), ("b", ["--seed", "4"]), ("c", ["--caption-seed", "1"]),
                        ("d", ["--caption-mode", "greedy"])]:
        r = vlcp(*args, *extra, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        computed[name] = read_manifest(tmp_path / name)["stages"]["captions"]["items_computed"]
    assert computed == {"a": 3, "b": 0, "c": 3, "d": 3}
    m = read_manifest(tmp_path / "a")
    assert (m["parameters"]["caption_mode"], m["parameters"]["caption_seed"]) == ("reference", 0)
    cache = StageCache(tmp_path / "cache")
    ident = resolve(str(tmp_path / "cache" / "models" / TINY_LLAVA), cache).identity
    ds = load_dataset("digits", tmp_path / "data", "train", ["0"], 3)
    for s in ds.samples:
        old_key = stage_key("captions", captioner.VERSION, layout=KEY_LAYOUT,
                            params={"caption_prompt": PROMPT, "caption_max_tokens": 32}, image=s.digest,
                            class_name=ds.classes[0].name, model=ident, decoding="greedy")
        assert cache.get("captions", old_key).meta["caption"].strip()
