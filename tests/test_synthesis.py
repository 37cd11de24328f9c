"""Synthesis with the tiny pipeline: determinism, batch independence, long prompts."""
import numpy as np
import pytest

from vlcp.method import synthesis
from vlcp.models.loading import load_img2img, resolve
from vlcp.models.tiny import TINY_SD


@pytest.fixture(scope="module")
def pipe(tiny_models_dir, tmp_path_factory):
    from vlcp.store.cache import StageCache

    cache = StageCache(tmp_path_factory.mktemp("c"))
    return load_img2img(resolve(str(tiny_models_dir / TINY_SD), cache), "cpu")


def test_same_seed_same_pixels_independent_of_batch_size(pipe):
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(3, 4, 16, 16)).astype(np.float32)
    prompts = ["a loop", "a thin straight line with a long tail and a round shape", "dark"]
    seeds = [synthesis.image_seed(0, "3", j) for j in range(3)]
    kw = dict(negative_prompt="cartoon, anime, painting", strength=0.7, guidance_scale=10, steps=6)
    together = synthesis.generate(pipe, lat, prompts, seeds, **kw)
    alone = np.concatenate([synthesis.generate(pipe, lat[i:i + 1], prompts[i:i + 1], seeds[i:i + 1], **kw)
                            for i in (2, 0, 1)])[[1, 2, 0]]
    assert together.dtype == np.uint8 and together.shape == (3, 32, 32, 3)
    assert np.array_equal(together, synthesis.generate(pipe, lat, prompts, seeds, **kw))  # same call, same pixels
    # Each image has its own generator, so batch size and order change nothing but float rounding inside
    # batched matrix products: at most one intensity level on a handful of pixels (docs/stages.md, "Determinism").
    diff = np.abs(together.astype(int) - alone.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001
    other = synthesis.generate(pipe, lat[:1], prompts[:1], [seeds[0] + 1], **kw)
    assert not np.array_equal(other[0], together[0])


def test_seeds_depend_on_class_and_cluster_only():
    assert synthesis.image_seed(0, "n01440764", 3) == synthesis.image_seed(0, "n01440764", 3)
    assert len({synthesis.image_seed(0, c, j) for c in "ab" for j in range(5)}) == 10


def test_chunked_long_prompts_are_chunked_not_truncated(pipe):
    long = " ".join(["word"] * 100)  # 500 byte-level tokens with the tiny vocab
    (chunks,) = synthesis.chunk_ids(pipe.tokenizer, [long], "chunked")
    assert sum(len(c) for c in chunks) == len(pipe.tokenizer(long, add_special_tokens=False).input_ids)
    assert all(len(c) <= 75 for c in chunks) and len(chunks) > 1
    emb = synthesis.encode_prompts(pipe, [long, "short"], 77 * len(chunks), "chunked")
    assert emb.shape == (2, 77 * len(chunks), 32)


def test_chunked_short_prompt_embedding_matches_the_pipelines_own(pipe):
    import torch

    ours = synthesis.encode_prompts(pipe, ["a round shape"], 77, "chunked")
    theirs, _ = pipe.encode_prompt("a round shape", "cpu", 1, False)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_reference_windows_of_a_200_token_prompt(pipe):
    """As get_pipeline_embeds: tokenise once, cut every 77 ids; one BOS, one EOS, last window unpadded."""
    tok = pipe.tokenizer
    text = " ".join(["a"] * 198)  # one byte-level token per "a": 198 + BOS + EOS = 200 ids
    bos, eos, pad, a = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok("a").input_ids[1]
    assert synthesis.context_length(tok, text) == 200
    rows = synthesis.id_rows(tok, text, 200)
    assert [len(r) for r in rows] == [77, 77, 46]
    assert rows[0] == [bos] + [a] * 76 and rows[1] == [a] * 77 and rows[2] == [a] * 45 + [eos]
    neg = synthesis.id_rows(tok, "cartoon", 200)  # the negative prompt is padded to the prompt's length
    assert [len(r) for r in neg] == [77, 77, 46] and neg[0][:9] == tok("cartoon").input_ids
    assert neg[0][9:] == [pad] * 68 and neg[2] == [pad] * 46
    chunked = synthesis.id_rows(tok, text, 3 * 77, "chunked")  # vlcp's other mode: 75 + 75 + 48, each wrapped
    assert [r[0] for r in chunked] == [bos] * 3 and chunked[2][:50] == [bos] + [a] * 48 + [eos]
    assert synthesis.encode_prompts(pipe, [text], 200).shape == (1, 200, 32)


def test_reference_short_prompt_is_the_unpadded_start_of_the_pipelines_encoding(pipe):
    """CLIP's text attention is causal, so the unpadded 13-token context equals the first 13 of 77 rows."""
    import torch

    n = synthesis.context_length(pipe.tokenizer, "a round shape")
    assert n == len(pipe.tokenizer("a round shape").input_ids) == 13  # a + r,o,u,n,d + s,h,a,p,e + BOS, EOS
    ours = synthesis.encode_prompts(pipe, ["a round shape"], n)
    theirs, _ = pipe.encode_prompt("a round shape", "cpu", 1, False)
    assert ours.shape == (1, 13, 32) and torch.allclose(ours, theirs[:, :13], atol=1e-6)
    with pytest.raises(ValueError, match="unknown long-prompt mode"):
        synthesis.chunk_ids(pipe.tokenizer, ["x"], "cut")


def test_chunked_and_reference_modes_give_different_images(pipe):
    lat = np.random.default_rng(1).normal(size=(1, 4, 16, 16)).astype(np.float32)
    kw = dict(negative_prompt="cartoon", strength=0.7, guidance_scale=10, steps=4)
    ref = synthesis.sample(pipe, lat, ["a dark loop"], [5], synthesis.Sampling(**kw))
    assert np.array_equal(ref, synthesis.generate(pipe, lat, ["a dark loop"], [5], **kw))  # generate = reference
    chunked = synthesis.sample(pipe, lat, ["a dark loop"], [5], synthesis.Sampling(**kw, long_prompts="chunked"))
    assert not np.array_equal(ref, chunked)
