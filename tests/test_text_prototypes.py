"""Algorithm 2 (vlcp/method/text_prototypes.py) against a plain reference written here, on seeded random
hand-sized inputs, and its tokenizer against scikit-learn's CountVectorizer (what it replaced)."""
import re
from collections import Counter

import numpy as np
import pytest
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

from vlcp.method.text_prototypes import TOKEN_PATTERN, caption_words, class_prototypes

# Word pieces that stress the tokenizer: case, punctuation, quotes and "'s" (the clean-up), digits, single
# letters, non-ASCII letters (the Kelvin sign and dotted I lower-case to ASCII "k" and "i"), words longer
# than 12 letters that share a 12-letter prefix (packed keys), NUL and newlines inside captions, stop words.
PIECES = ["snow", "Snow", "GRASS", "grass", "fox", "Fox's", "fox'", '"red"', "tail,", "tree.", "the", "of", "is",
          "a", "x", "42", "b52", "it's", "'s", "'S", "s", "\"'s", "'\"s", "\u212aiwi", "\u0130stanbul", "caf\u00e9",
          "\u03a3\u039f\u03a3", "photographing", "photographer", "photographers", "abcdefghijkl", "abcdefghijklm",
          "abcdefghijkz", "characteristically", "zz", "aa", "\x00", "\n", "well-lit", "...", "dog", "red", "wolf"]


def reference(captions, members, class_name, beta, top_k, clean=True):
    """Algorithm 2 as the module docstring states it, one caption and one word at a time."""
    if clean:
        captions = [c.replace('"', "").replace("'s", "") for c in captions]
    held = [set(re.findall(TOKEN_PATTERN, c.lower())) for c in captions]
    class_freq = Counter(w for ws in held for w in ws)
    name = set(re.findall(TOKEN_PATTERN, class_name.lower()))
    frequent = {w for w, f in class_freq.items() if f / len(captions) > beta}
    non_rep = sorted(w for w in class_freq if (w in frequent or w in name) and w not in ENGLISH_STOP_WORDS)
    out = []
    for rows in members:
        if not rows:
            out.append({"caption": "", "member": None, "score": 0.0, "fallback": True,
                        "representative_words": {}, "non_representative": non_rep})
            continue
        freq = Counter(w for r in rows for w in held[r]
                       if w not in frequent and w not in name and w not in ENGLISH_STOP_WORDS)
        rw = dict(sorted(freq.items(), key=lambda wf: (-wf[1], wf[0]))[:top_k])
        scores = [sum(rw.get(w, 0) for w in held[r]) for r in rows]
        best = max(range(len(rows)), key=lambda j: (scores[j], -j))  # the first of the best
        pick = rows[best] if scores[best] > 0 else rows[0]
        out.append({"caption": captions[pick], "member": pick, "score": float(scores[best]),
                    "fallback": scores[best] == 0, "representative_words": rw, "non_representative": non_rep})
    return out


def random_class(seed):
    """A few captions drawn from PIECES and random words, and clusters with empties and duplicates."""
    rng = np.random.default_rng(seed)
    extra = ["".join(rng.choice(list("abcdef"), size=int(rng.integers(1, 16)))) for _ in range(8)]
    pieces = PIECES + extra
    seps = [" ", " ", ", ", "-", "", "\n"]
    captions = ["".join(pieces[i] + seps[j] for i, j in zip(rng.integers(0, len(pieces), k), rng.integers(0, 6, k)))
                for k in rng.integers(0, 14, int(rng.integers(1, 13)))]
    members = [[int(i) for i in rng.integers(0, len(captions), int(rng.integers(0, 6)))]
               for _ in range(int(rng.integers(1, 5)))]
    name = str(rng.choice(["red fox", "Fox", "snow dog", "\u212aiwi", "x", ""]))
    return captions, members, name, float(rng.choice([0.1, 0.3, 0.5, 0.8, 1.0])), int(rng.integers(1, 6))


@pytest.mark.parametrize("seed", range(300))
def test_algorithm2_equals_the_plain_reference(seed):
    captions, members, name, beta, top_k = random_class(seed)
    for clean in (True, False):
        got = class_prototypes(captions, members, name, beta, top_k, clean_captions=clean)
        want = reference(captions, members, name, beta, top_k, clean)
        assert repr(got) == repr(want)  # also the order of R_w and the types (int counts, float scores)


def test_algorithm2_equals_the_reference_at_a_class_of_realistic_size():
    """600 captions of 40 words from a 2,000-word Zipf vocabulary (with long words), 10 clusters."""
    rng = np.random.default_rng(7)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(n)))
                      for n in rng.integers(2, 16, 2000)] + PIECES, dtype=object)
    p = 1.0 / np.arange(1, len(vocab) + 1)
    captions = [" ".join(row) for row in vocab[rng.choice(len(vocab), size=(600, 40), p=p / p.sum())]]
    labels = rng.integers(0, 10, len(captions))
    members = [[int(i) for i in np.flatnonzero(labels == c)] for c in range(10)]
    for beta, top_k in ((0.2, 35), (0.05, 3)):
        got = class_prototypes(captions, members, "some class", beta, top_k)
        assert repr(got) == repr(reference(captions, members, "some class", beta, top_k))
        assert sum(r["fallback"] for r in got) == 0


@pytest.mark.parametrize("seed", range(100))
def test_tokenizer_equals_countvectorizer(seed):
    captions = random_class(seed)[0]
    vocab, x = caption_words(captions, clean=False)
    vec = CountVectorizer(token_pattern=TOKEN_PATTERN, binary=True)
    try:
        want = vec.fit_transform(captions)
    except ValueError:  # "empty vocabulary": no caption has a word
        assert vocab == [] and x.shape == (len(captions), 0)
        return
    assert vocab == vec.get_feature_names_out().tolist()
    assert x.dtype == want.dtype and (x != want).nnz == 0


def test_non_ascii_capitals_that_lower_case_to_ascii_letters_count():
    # the Kelvin sign lower-cases to "k"; the dotted capital I to "i" + a combining dot (a non-letter)
    (r,) = class_prototypes(["\u212aiwi on a plate", "kiwi", "\u0130stanbul street"], [[2, 0, 1]], "fruit",
                            beta=1.0, top_k=3)
    assert r["representative_words"] == {"kiwi": 2, "plate": 1, "stanbul": 1}
    assert (r["caption"], r["score"]) == ("\u212aiwi on a plate", 3.0)


def test_long_words_sort_with_the_packed_short_ones():
    caps = ["photographer photographing", "photographers photo", "photographer", "abcdefghijklm abcdefghijkl"]
    (r,) = class_prototypes(caps, [[3, 2, 1, 0]], "x", beta=1.0, top_k=6)
    assert list(r["representative_words"].items()) == [
        ("photographer", 2), ("abcdefghijkl", 1), ("abcdefghijklm", 1), ("photo", 1), ("photographers", 1),
        ("photographing", 1)]
    assert (r["member"], r["score"]) == (0, 3.0)  # photographer (2) + photographing (1)


def test_a_nul_or_newline_inside_a_caption_separates_words_of_that_caption_only():
    caps = ["snow\x00field", "snow\nfield", "field"]
    (r,) = class_prototypes(caps, [[2, 1, 0]], "x", beta=1.0, top_k=2)
    assert r["representative_words"] == {"field": 3, "snow": 2}
    assert (r["member"], r["caption"], r["score"]) == (1, "snow\nfield", 5.0)


def test_a_caption_listed_twice_in_a_cluster_counts_twice():
    (r,) = class_prototypes(["aa", "bb", "bb cc"], [[1, 0, 0, 2]], "x", beta=1.0, top_k=1)
    assert r["representative_words"] == {"aa": 2}  # aa 2 (listed twice), bb 2, cc 1: the tie goes to aa
    assert (r["member"], r["score"]) == (0, 2.0)


# -- exact outputs that kill the mutants benchmarks/mutation.py found surviving the tests above ----------


def test_no_clusters_give_no_records():
    assert class_prototypes(["snow field", "snow"], [], "x", beta=1.0, top_k=2) == []


def test_top_k_zero_gives_an_empty_r_w_and_the_closest_member():
    (r,) = class_prototypes(["aa bb", "bb"], [[1, 0]], "x", beta=1.0, top_k=0)
    assert r == {"caption": "bb", "member": 1, "score": 0.0, "fallback": True, "representative_words": {},
                 "non_representative": []}


@pytest.mark.parametrize("top_k, rw, score", [(1, {"aa": 3}, 3.0), (2, {"aa": 3, "cc": 2}, 5.0)])
def test_top_k_takes_the_most_frequent_words_not_the_first_ones(top_k, rw, score):
    # aa 3, bb 1, cc 2: the top 2 are aa and cc, although bb comes before cc in the vocabulary
    (r,) = class_prototypes(["aa bb cc", "aa cc", "aa"], [[2, 1, 0]], "x", beta=1.0, top_k=top_k)
    assert (r["representative_words"], r["member"], r["score"]) == (rw, 1 if top_k == 2 else 2, score)


def test_top_1_of_many_words_is_the_most_frequent_one():
    # 2,000 words once each and the alphabetically last one twice: a partial sort must still find it
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    ids = np.arange(2000)
    words = ["".join(w) for w in letters[np.stack([ids // 26**2 % 26, ids // 26 % 26, ids % 26], 1)]]
    (r,) = class_prototypes([" ".join(words), words[-1]], [[0, 1]], "x", beta=1.0, top_k=1)
    assert (r["representative_words"], r["member"], r["score"]) == ({"cyx": 2}, 0, 2.0)


def test_a_lone_surrogate_in_a_caption_is_no_letter_and_no_error():
    (r,) = class_prototypes(["snow \ud800 field", "field"], [[1, 0]], "x", beta=1.0, top_k=2)
    assert (r["representative_words"], r["caption"], r["score"]) == ({"field": 2, "snow": 1}, "snow \ud800 field", 3.0)


def test_the_bytes_next_to_a_z_split_words():
    vocab, x = caption_words(["ab{cd", "ab`cd ef"], clean=False)  # "`" and "{" are bytes 96 and 123
    assert (vocab, x.toarray().tolist()) == (["ab", "cd", "ef"], [[1, 1, 0], [1, 1, 1]])


def test_words_belong_to_their_caption_around_control_bytes_and_empty_captions():
    vocab, x = caption_words(["ab\x01cd", "ef"], clean=False)  # one byte 1 in two captions: not a separator
    assert (vocab, x.toarray().tolist()) == (["ab", "cd", "ef"], [[1, 1, 0], [0, 0, 1]])
    vocab, x = caption_words(["ab\x01cd", "ef", "", "gh"], clean=False)
    assert x.toarray().tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [0] * 4, [0, 0, 0, 1]]
    vocab, x = caption_words(["", "ab", ""], clean=False)
    assert (vocab, x.toarray().tolist()) == (["ab"], [[0], [1], [0]])


def test_caption_words_without_words_is_an_empty_int64_matrix():
    vocab, x = caption_words(["42", "!!", "a"], clean=True)
    assert (vocab, x.shape, x.dtype, x.nnz) == ([], (3, 0), np.int64, 0)


def test_caption_words_matrix_has_scipys_int32_indices():
    # what CountVectorizer gives; the matrix is built in int32 when captions x words fit (no conversion)
    vocab, x = caption_words(["snow field", "snow", "field of snow"], clean=True)
    assert (vocab, x.toarray().tolist()) == (["field", "of", "snow"], [[1, 0, 1], [0, 0, 1], [1, 1, 1]])
    assert (x.dtype, x.indices.dtype, x.indptr.dtype) == (np.int64, np.int32, np.int32)


def test_a_class_whose_captions_x_words_reach_2_31_still_counts_its_last_caption():
    # 2**16 captions x 2**15 words = 2**31 pairs: one past int32, so the matrix is built in int64
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    ids = np.arange(2**15)
    words = ["".join(w) for w in letters[np.stack([ids // 26**3 % 26, ids // 26**2 % 26, ids // 26 % 26, ids % 26], 1)]]
    vocab, x = caption_words([""] * (2**16 - 1) + [" ".join(words)], clean=False)
    assert vocab == sorted(words) and x.shape == (2**16, 2**15) and x.nnz == 2**15
    assert x.indptr[-2:].tolist() == [0, 2**15] and x[-1].indices.tolist() == list(range(2**15))


def test_an_empty_cluster_of_a_class_without_words_gets_an_empty_record():
    empty, r = class_prototypes(["42", "!"], [[], [1, 0]], "x", beta=1.0, top_k=1)
    assert empty == {"caption": "", "member": None, "score": 0.0, "fallback": True, "representative_words": {},
                     "non_representative": []}
    assert (r["caption"], r["member"], r["fallback"]) == ("!", 1, True)
