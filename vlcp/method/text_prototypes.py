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

Speed (ImageNet-1K has 1.28 M captions): a class is tokenised once, as one UTF-8 byte buffer, with
numpy instead of a Python loop per word. A letter a-z is never part of a multi-byte UTF-8 sequence,
so the runs of bytes 97-122 are exactly the regex's tokens. Words of up to 12 letters are packed into
one integer (5 bits a letter, zero-padded), whose numeric order is the words' alphabetical order, so
one integer sort builds the sorted vocabulary; longer words (rare) go through Python strings. All
clusters are then counted with two sparse products instead of one slice per cluster. The results are
those of the earlier scikit-learn ``CountVectorizer`` implementation, byte for byte
(``tests/test_text_prototypes.py`` checks against a plain reference).
"""
from __future__ import annotations

import re

import numpy as np

VERSION = 2  # 2: caption clean-up
TOKEN_PATTERN = r"[a-z]{2,}"
PACKED = 12  # letters per packed word: 12 x 5 bits fit an int64


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
    vocab, x = caption_words(captions, clean_captions)
    excluded, non_rep = _non_representative(vocab, x, class_name, beta)

    def text(i):
        return clean_caption(captions[i]) if clean_captions else captions[i]

    if not vocab:  # no caption has a single word: every cluster falls back to its closest member
        return [_record(text(rows[0]) if rows else "", rows[0] if rows else None, {}, 0.0, non_rep)
                for rows in members]
    rows_at = [np.asarray(rows, np.int64) for rows in members]
    freq = (_membership(rows_at, len(captions)) @ x).toarray()  # clusters x words: captions holding each word
    freq[:, excluded] = 0
    tops = _top_words(freq, top_k)
    weights = np.zeros((len(vocab), len(members)))
    for c, top in enumerate(tops):
        weights[top, c] = freq[c, top]
    scores = x @ weights  # captions x clusters; binary rows: each distinct R_w word counted once
    out = []
    for c, rows in enumerate(members):
        if not len(rows):
            out.append(_record("", None, {}, 0.0, non_rep))
            continue
        s = scores[rows_at[c], c]
        best = int(np.argmax(s))  # argmax takes the first maximum: the member closest to the centre
        pick = rows[best] if s[best] > 0 else rows[0]
        rw = {vocab[i]: int(freq[c, i]) for i in tops[c].tolist()}
        out.append(_record(text(pick), pick, rw, float(s[best]), non_rep))
    return out


def _non_representative(vocab: list[str], x, class_name: str, beta: float) -> tuple[np.ndarray, list[str]]:
    """Words kept out of R_w (N of Eq. 2, the class name's words and stop words), and N as listed in the
    record: N and the class name's words, less stop words, alphabetical."""
    index = dict(zip(vocab, range(len(vocab))))
    stop = _mask(index, stop_words())
    name = _mask(index, words(class_name))
    frequent = np.asarray(x.sum(axis=0)).ravel() / x.shape[0] > beta if vocab else stop
    return frequent | stop | name, [vocab[i] for i in np.flatnonzero((frequent | name) & ~stop).tolist()]


def caption_words(captions: list[str], clean: bool):
    """The sorted vocabulary of the captions and their binary caption x word matrix (CSR, int64).

    What ``CountVectorizer(token_pattern=TOKEN_PATTERN, binary=True)`` gives after the clean-up,
    without a Python step per word.
    """
    from scipy.sparse import csr_matrix

    data, starts = _class_bytes(captions, clean)
    at, length = _token_runs(data)
    if not len(at):
        return [], csr_matrix((len(captions), 0), dtype=np.int64)
    vocab, ids = _word_ids(data, at, length)
    return vocab, _binary_matrix(_token_captions(at, starts), ids, len(captions), len(vocab))


def _class_bytes(captions: list[str], clean: bool) -> tuple[bytes, np.ndarray]:
    """The class's cleaned, lower-cased captions as one UTF-8 buffer (NUL between captions), and where
    each caption starts in it.

    Cleaning and lower-casing the joined text equals doing it per caption: a NUL is neither a quote nor
    an "s", nor a cased letter.
    """
    text = "\x00".join(captions)
    if clean:
        text = clean_caption(text)
    data = text.lower().encode("utf-8", "surrogatepass")  # surrogates: bytes >= 0x80, never letters
    nul = np.flatnonzero(np.frombuffer(data, np.uint8) == 0)
    if len(nul) == len(captions) - 1:  # no caption holds a NUL itself
        return data, np.concatenate(([0], nul + 1))
    cleaned = [clean_caption(c) for c in captions] if clean else captions
    sizes = [len(c.lower().encode("utf-8", "surrogatepass")) + 1 for c in cleaned]
    return data, np.cumsum([0] + sizes[:-1])


def _token_runs(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of every token: each maximal run of two or more bytes a-z (the regex's matches)."""
    buf = np.frombuffer(data, np.uint8)
    letter = np.zeros(len(buf) + 2, bool)
    np.less(buf - np.uint8(97), 26, out=letter[1:-1])  # unsigned: bytes below "a" wrap round to >= 26
    edge = np.flatnonzero(letter[1:] != letter[:-1])  # a run starts and ends, alternately
    at, end = edge[0::2], edge[1::2]
    keep = end - at >= 2
    return at[keep], (end - at)[keep]


def _token_captions(at: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Which caption each token is in (tokens and caption starts are both in text order)."""
    first = np.searchsorted(at, starts)
    return np.repeat(np.arange(len(starts)), np.diff(first, append=len(at)))


def _word_ids(data: bytes, at: np.ndarray, length: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The sorted distinct words and, for every token, its word's index in that list.

    Short words sort as packed integers; the few longer ones as Python strings, merged in after.
    """
    short = length <= PACKED
    keys = _pack(np.frombuffer(data, np.uint8), at[short], length[short])
    order = np.argsort(keys)  # numpy sorts integers far faster than its hash-based np.unique runs
    ordered = keys[order]
    first = _firsts(ordered)
    short_ids = np.empty(len(keys), np.int64)
    short_ids[order] = np.cumsum(first) - 1
    vocab = _unpack(ordered[first])
    if short.all():
        return vocab, short_ids
    long_words = [data[a:a + n].decode("ascii") for a, n in zip(at[~short].tolist(), length[~short].tolist())]
    short_words, vocab = vocab, sorted(vocab + sorted(set(long_words)))
    index = dict(zip(vocab, range(len(vocab))))
    ids = np.empty(len(at), np.int64)
    ids[short] = np.array([index[w] for w in short_words], np.int64)[short_ids]
    ids[~short] = [index[w] for w in long_words]
    return vocab, ids


def _pack(buf: np.ndarray, at: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Each word (at most PACKED letters) as an integer: letters 1-26, 5 bits each, first letter highest,
    zero-padded on the right, so integer order is alphabetical order ("ab" < "aba" < "abb").

    Tokens are visited longest first, so the words that still have an i-th letter are a prefix: the
    work is one step per letter, not PACKED steps per word.
    """
    order = np.argsort(-length.astype(np.int8), kind="stable")  # lengths <= PACKED: a radix sort
    at = at[order]
    longer = np.searchsorted(-length[order], -np.arange(PACKED), side="left")  # words longer than i
    keys = np.zeros(len(at), np.int64)
    for i, m in enumerate(longer.tolist()):
        keys[:m] |= (buf[at[:m] + i].astype(np.int64) - 96) << 5 * (PACKED - 1 - i)
    unsorted = np.empty_like(keys)
    unsorted[order] = keys
    return unsorted


def _unpack(keys: np.ndarray) -> list[str]:
    """The words of packed integers (the inverse of ``_pack``)."""
    shifts = 5 * np.arange(PACKED - 1, -1, -1, dtype=np.int64)
    code = (keys[:, None] >> shifts) & 31
    letters = np.where(code > 0, code + 96, 0).astype(np.uint8)
    return np.ascontiguousarray(letters).view(f"S{PACKED}").ravel().astype(str).tolist()


def _binary_matrix(caption: np.ndarray, ids: np.ndarray, n: int, n_words: int):
    """Caption x word CSR matrix, 1 where the caption holds the word (however often)."""
    from scipy.sparse import csr_matrix

    small = np.int32 if n * n_words < 2**31 else np.int64  # scipy's own index type: no conversion, faster sort
    pairs = np.sort(caption.astype(small) * small(n_words) + ids.astype(small))
    pairs = pairs[_firsts(pairs)]  # distinct, sorted by caption, then word: CSR order
    indptr = np.searchsorted(pairs, np.arange(n + 1, dtype=small) * small(n_words)).astype(small)
    return csr_matrix((np.ones(len(pairs), np.int64), pairs % small(n_words), indptr), shape=(n, n_words))


def _firsts(sorted_values: np.ndarray) -> np.ndarray:
    """True where a sorted array holds a value for the first time."""
    first = np.ones(len(sorted_values), bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    return first


def _membership(rows_at: list[np.ndarray], n: int):
    """Cluster x caption counts: a caption listed twice in a cluster counts twice, as its row would (the
    sparse product sums repeated entries)."""
    from scipy.sparse import csr_matrix

    cols = np.concatenate(rows_at) if rows_at else np.zeros(0, np.int64)
    indptr = np.cumsum([0] + [len(rows) for rows in rows_at])
    return csr_matrix((np.ones(len(cols), np.int64), cols, indptr), shape=(len(rows_at), n))


def _top_words(freq: np.ndarray, top_k: int) -> list[np.ndarray]:
    """Per cluster, the indices of its top-k words with a positive frequency, most frequent first, ties
    alphabetical (word indices are alphabetical).

    One integer key per word orders by (-frequency, index); a partition finds the k smallest keys
    without sorting every word of every cluster.
    """
    n_words = freq.shape[1]
    k = max(min(top_k, n_words), 0)
    if k == 0:
        return [np.zeros(0, np.int64) for _ in freq]
    rank = (freq.max(initial=0) - freq) * n_words + np.arange(n_words)
    top = np.sort(np.partition(rank, k - 1, axis=1)[:, :k], axis=1) % n_words
    return [row[f[row] > 0] for f, row in zip(freq, top)]


def _mask(index: dict[str, int], some: object) -> np.ndarray:
    """Which vocabulary words are among ``some``."""
    mask = np.zeros(len(index), bool)
    mask[[index[w] for w in some if w in index]] = True
    return mask


def _record(caption: str, pick, rw: dict, score: float, non_rep: list[str]) -> dict:
    return {"caption": caption, "member": pick, "score": score, "fallback": score == 0,
            "representative_words": rw, "non_representative": non_rep}
