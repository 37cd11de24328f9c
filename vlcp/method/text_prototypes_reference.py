"""Algorithm 2 exactly as the public VLCP reference code computes it (``03_distiilation/gen_prototype.py``,
``gen_prototype`` and ``find_max_word_sentence``), next to the paper's reading in ``text_prototypes``.

Per class (one ``class_prototypes_reference`` call), over its inlier captions:

- Words: ``reference_tokens`` (``vlcp.method.tokenize``): NLTK ``word_tokenize``, alphabetic tokens,
  lower-cased. Stop words: NLTK's English list (``data/nltk_english_stopwords.txt``).
- N, the non-representative words: a word's count is the number of the class's captions holding it;
  N = {w : count >= beta * len(captions), w not a stop word}: a word at exactly beta is in N, unless the
  float product rounds up (0.28 * 25 is 7.000000000000001: a word in 7 of 25 captions is not in N).
- R_w per cluster: ``Counter`` over every token of the cluster's captions (occurrences, not captions),
  less stop words, N and every word that is a *substring* of the class prompt (``word not in prompt``:
  "ten" is dropped for "tench, Tinca tinca", but "carassius" is kept for "goldfish, Carassius auratus",
  the test being case-sensitive), then ``most_common(top_k)``: equal counts in first-seen order.
- Score of a caption: the sum of the R_w counts of the R_w words that are substrings of the caption as
  it is, not lower-cased ("red" scores in "covered", "brown" does not in "Brown dog"). The first caption
  with the highest score wins (strict ``>`` from 0); if none scores above 0 the reference's prompt is the
  empty string, returned here as ``caption == ""``, ``member is None`` and ``fallback`` True (the
  reference's ``gen_syn_image.py`` then conditions Stable Diffusion on "" and its negative prompt only).

The prompt is the class string of the reference's label list: for ImageNet subsets (label files of
wnids) ``IMAGENET2012_CLASSES[wnid]``, the full name "tench, Tinca tinca", which is the ``name`` of a
class here; for CIFAR the label itself ("airplane"). Unlike ``text_prototypes``, N holds no class-name
words: the prompt only acts through the substring test.

Captions are walked in the order given: each cluster's ``members`` in their order, which settles the
ties of R_w and of the score. The reference walks them in its DataLoader's order (``shuffle=True``,
seeded), kept through the LOF inlier mask and k-means' labels.
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache
from importlib import resources

from vlcp.method.text_prototypes import clean_caption
from vlcp.method.tokenize import reference_tokens

VERSION = 1


@lru_cache(maxsize=1)
def stop_words() -> frozenset[str]:
    """NLTK's English stop words (179), from the package data file."""
    text = resources.files("vlcp.method").joinpath("data/nltk_english_stopwords.txt").read_text("utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def non_representative(tokens: list[list[str]], beta: float) -> list[str]:
    """N of the class (alphabetical; the reference's own order is that of Python set iteration)."""
    held = Counter(w for words in tokens for w in set(words))
    threshold = beta * len(tokens)
    stop = stop_words()
    return sorted(w for w, count in held.items() if count >= threshold and w not in stop)


def representative_words(tokens: list[list[str]], excluded: set[str], prompt: str, top_k: int) -> dict[str, int]:
    """R_w of one cluster: its most frequent token occurrences outside ``excluded`` and the prompt."""
    stop = stop_words()
    counts = Counter(w for words in tokens for w in words  # isalpha again: "İ".lower() is not alphabetic
                     if w.isalpha() and w not in stop and w not in prompt and w not in excluded)
    return dict(counts.most_common(top_k))


def best_caption(captions: list[str], rw: dict[str, int]) -> tuple[int | None, int]:
    """Position of the first caption with the highest positive score, and that score (None, 0 if none)."""
    best, best_score = None, 0
    for i, text in enumerate(captions):
        score = sum(f for w, f in rw.items() if w in text)
        if score > best_score:
            best, best_score = i, score
    return best, best_score


def class_prototypes_reference(captions: list[str], members: list[list[int]], prompt: str, beta: float,
                               top_k: int, clean_captions: bool = True) -> list[dict]:
    """One record per cluster, shaped like ``text_prototypes.class_prototypes``'s plus ``mode``.

    ``captions`` are the class's inlier captions (all of them count for N), ``members[c]`` the caption
    indices of cluster c in the order they are walked, ``prompt`` the class string the reference tests
    words against (the full ImageNet class name, e.g. "tench, Tinca tinca", or a CIFAR label).
    ``clean_captions``: delete ``"`` and ``'s`` first, as the reference's captions were
    (``01_text_generation/llava_result_sum.py``).
    """
    texts = [clean_caption(c) if clean_captions else c for c in captions]
    tokens = [reference_tokens(t) for t in texts]
    n_words = non_representative(tokens, beta)
    excluded = set(n_words)
    out = []
    for rows in members:
        rw = representative_words([tokens[i] for i in rows], excluded, prompt, top_k)
        best, score = best_caption([texts[i] for i in rows], rw)
        member = rows[best] if best is not None else None
        out.append({"caption": texts[member] if member is not None else "", "member": member,
                    "score": float(score), "fallback": member is None, "representative_words": rw,
                    "non_representative": n_words, "mode": "reference"})
    return out
