"""Stage ``text_prototypes``: Algorithm 2 of the paper, vectorised with a sparse word-count matrix.

Clean-up (``clean_captions``, default on): ``"`` and ``'s`` are deleted from every caption first, as the
reference's ``01_text_generation/llava_result_sum.py`` does before anything reads them (its
``str.replace`` also cuts a quote-s inside words: "'smooth'" becomes "mooth'"); the chosen caption is
returned cleaned, as the reference's prompts are.

Tokenizer: captions are lower-cased and split into runs of two or more letters a-z (so "Saluki's"
gives "saluki"; digits and single letters are dropped); stop words are scikit-learn's English list.
Frequencies count *captions* containing a word (binary counts), for the class (Eq. 2) and for the
cluster (Eq. 3), which is how the paper reads Table 6 ("112 out of 166 samples describe grassy").

- N, the non-representative words: frequency / class size > beta (Eq. 2), plus the words of the
  class name (as the public reference code does).
- R_w: the cluster's top-k words by frequency after removing stop words and N (Eq. 3); equal
  frequencies are ordered alphabetically so the choice is reproducible.
- Score(t): the sum of R_w frequencies of the distinct R_w words in caption t (Eq. 4-5).
- The prototype is the highest-scoring caption; ties go to the member closest to the cluster centre.
  When every caption scores 0 (or R_w is empty), the closest member's caption is used.
"""
from __future__ import annotations

import re

import numpy as np

VERSION = 2  # 2: caption clean-up
TOKEN_PATTERN = r"[a-z]{2,}"


def words(text: str) -> list[str]:
    return re.findall(TOKEN_PATTERN, text.lower())


def clean_caption(text: str) -> str:
    """The reference's clean-up: delete double quotes, then every "'s"."""
    return text.replace('"', "").replace("'s", "")


def stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return ENGLISH_STOP_WORDS


def class_prototypes(captions: list[str], members: list[list[int]], class_name: str, beta: float,
                     top_k: int, clean_captions: bool = True) -> list[dict]:
    """One record per cluster: the chosen caption, its score, R_w and N (the paper's Table 6).

    ``members[c]`` lists caption indices of cluster c, closest to the centre first.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    if clean_captions:
        captions = [clean_caption(c) for c in captions]
    vec = CountVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, binary=True)
    try:
        x = vec.fit_transform(captions).tocsr()
        vocab = vec.get_feature_names_out()
    except ValueError:  # no caption has a single word
        x, vocab = None, np.array([], dtype=object)
    n = len(captions)
    stops = stop_words()
    name_words = set(words(class_name))
    if x is not None:
        class_freq = np.asarray(x.sum(axis=0)).ravel()
        frequent = class_freq / n > beta
    else:
        class_freq = frequent = np.zeros(0)
    excluded = np.array([bool(frequent[i]) or w in stops or w in name_words for i, w in enumerate(vocab)], bool)
    non_rep = sorted(w for i, w in enumerate(vocab) if (frequent[i] or w in name_words) and w not in stops)

    out = []
    for rows in members:
        if x is None or not rows:
            out.append(_record(captions, rows[0] if rows else None, {}, 0.0, non_rep, fallback=True))
            continue
        sub = x[rows]
        freq = np.asarray(sub.sum(axis=0)).ravel()
        freq[excluded] = 0
        cand = np.flatnonzero(freq)
        order = sorted(cand, key=lambda i: (-freq[i], vocab[i]))[:top_k]
        rw = {str(vocab[i]): int(freq[i]) for i in order}
        weights = np.zeros(len(vocab))
        weights[order] = freq[order]
        scores = sub @ weights  # binary rows: each distinct R_w word counted once
        best = int(np.argmax(scores))  # argmax takes the first maximum: the member closest to the centre
        score = float(scores[best])
        out.append(_record(captions, rows[best] if score > 0 else rows[0], rw, score, non_rep, fallback=score == 0))
    return out


def _record(captions, pick, rw, score, non_rep, fallback) -> dict:
    return {"caption": captions[pick] if pick is not None else "", "member": pick, "score": score,
            "fallback": bool(fallback), "representative_words": rw, "non_representative": non_rep}
