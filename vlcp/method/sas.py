"""Semantic-aware post-sampling: keep IPC images per class from a larger pool, scored in CLIP space.

This is **vlcp's formulation of SAS** (Li et al., "SAS: Semantic-aware Sampling for Generative
Dataset Distillation", arXiv 2605.18012) **from its abstract**; the paper's method section is not
public, so the formulas and defaults below are the proposal of ``papers/sas_clip_post_sampling.md``
(section 4), not the authors' method.

Scores per candidate (all embeddings unit vectors, similarity = dot product):
  relevance  R = s(v, a)             a = its class anchor (class prompt or real-image centroid),
                                     or a per-candidate anchor (e.g. its prototype's text)
  margin     S = R - max_{k != c} s(v, A_k)   (A: the class anchors; S < 0: CLIP prefers another class)
  diversity  D = 1 - max_{j in selection} s(v, v_j), recomputed after every pick
  caption match M = s(v, t)          t = the text the candidate was generated from (its prototype's
                                     prompt): optional, vlcp's addition from the multi-modal paper
  foreground  F_v                    the object's share of the image (CLIPSeg): optional, ditto
Stage 1 (per class): Q = alpha z(R) + (1 - alpha) z(S) + W z(M) (z: standardised over the class's pool;
W = ``caption_weight``, 0 by default: vlcp's formulation, not in the SAS abstract); candidates with
F_v < ``min_foreground`` are dropped first ("filtered: foreground under --min-foreground"), then those
with S < 0, and the top ceil(keep * M) (at least IPC) by Q remain; if fewer than IPC pass, the best
dropped ones by Q are back-filled, those with enough foreground before those without. Stage 2: the
best Q first, then greedily argmax lam z(Q) + (1 - lam) D (z over the candidates). Ties go to the
lowest candidate index. The random and relevance modes have no stage 1 (no Q, no foreground filter).

Numpy only and vectorised across classes (pools are padded into [C, M] arrays): no torch here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LABEL = ("vlcp's formulation of SAS (Li et al., arXiv 2605.18012) from its abstract: "
         "not the authors' method, whose equations are not public")
DEFAULT_POOL_MULTIPLIER = 5  # the same group's earlier pool-sampling work (DiffGuideSamp): 5 x IPC
DEFAULT_KEEP = 0.5
DEFAULT_ALPHA = 0.5
DEFAULT_LAMBDA = 0.5
_CHUNK = 4096
MODES = ("random", "relevance", "sas")
# stage-1 verdicts
CANDIDATE, NEGATIVE_MARGIN, BELOW_SHARE, BACKFILLED, COVERAGE, NOT_APPLIED, LOW_FOREGROUND = range(7)
VERDICTS = ("candidate", "filtered: negative margin", "filtered: below the kept share", "back-filled",
            "prototype coverage", "not applied", "filtered: foreground under --min-foreground")
FILTERED = (NEGATIVE_MARGIN, BELOW_SHARE, LOW_FOREGROUND)


class SasError(ValueError):
    """Selection inputs that do not fit (shapes, parameter ranges)."""


@dataclass(frozen=True)
class SasParams:
    ipc: int
    keep: float = DEFAULT_KEEP  # stage-1 share of each class's pool (rho)
    alpha: float = DEFAULT_ALPHA  # relevance vs margin in the quality Q
    lam: float = DEFAULT_LAMBDA  # quality vs diversity in stage 2
    mode: str = "sas"  # random | relevance | sas
    per_prototype: bool = False  # the best candidate of each prototype first (K-Means coverage)
    gate: bool = True  # drop negative-margin candidates in stage 1
    seed: int = 0  # random mode only
    caption_weight: float = 0.0  # W: weight of z(caption match) in Q (vlcp's formulation)
    min_foreground: float | None = None  # stage 1 drops candidates with less foreground (vlcp's formulation)

    def check(self) -> None:
        if self.ipc < 1:
            raise SasError(f"ipc must be >= 1, got {self.ipc}")
        if not 0 < self.keep <= 1:
            raise SasError(f"--sas-keep must be in (0, 1], got {self.keep}")
        for name, v in (("--sas-alpha", self.alpha), ("--sas-lambda", self.lam),
                        ("--sas-caption-weight", self.caption_weight), ("--min-foreground", self.min_foreground)):
            if v is None:
                continue
            if not 0 <= v <= 1:
                raise SasError(f"{name} must be in [0, 1], got {v}")
        if self.mode not in MODES:
            raise SasError(f"--select must be one of {', '.join(MODES)}, got {self.mode!r}")

    def manifest(self) -> dict:
        return {"method": LABEL, **asdict(self)}


@dataclass
class Selection:
    """Per-candidate arrays (length N, in the caller's order) and the picks of each class, in pick order."""
    params: SasParams
    labels: np.ndarray
    relevance: np.ndarray
    margin: np.ndarray
    quality: np.ndarray  # Q of stage 1 (NaN in the random and relevance modes)
    stage1: np.ndarray  # verdict codes
    rank: np.ndarray  # 1-based within its class: picks first (pick order), then the rest by stage-1 order
    diversity: np.ndarray  # D when picked (NaN for the first pick and for unpicked candidates)
    gain: np.ndarray  # the stage-2 score when picked (NaN otherwise)
    picked: dict[int, list[int]]  # class -> candidate indices in pick order
    prototypes: np.ndarray | None = None
    caption_match: np.ndarray | None = None  # M per candidate, when given
    foreground: np.ndarray | None = None  # foreground fraction per candidate, when given

    @property
    def kept(self) -> np.ndarray:
        k = np.zeros(len(self.labels), bool)
        for idx in self.picked.values():
            k[idx] = True
        return k

    def records(self) -> list[dict]:
        """One JSON-serialisable record per candidate: scores, stage-1 verdict, rank, kept and why."""
        kept = self.kept.tolist()
        cols = [_col(a) for a in (self.relevance, self.margin, self.quality, self.diversity, self.gain)]
        protos = [None] * len(kept) if self.prototypes is None else np.asarray(self.prototypes).tolist()
        labels, stage1, rank = self.labels.tolist(), self.stage1.tolist(), self.rank.tolist()
        extra = {n: _col(a) for n, a in (("caption_match", self.caption_match), ("foreground", self.foreground))
                 if a is not None}
        out = []
        for i, (rel, mar, q, d, g) in enumerate(zip(*cols)):
            out.append({"index": i, "class": labels[i], "prototype": protos[i], "relevance": rel, "margin": mar,
                        **{n: v[i] for n, v in extra.items()},
                        "quality": q, "stage1": VERDICTS[stage1[i]], "diversity_at_pick": d, "score_at_pick": g,
                        "rank": rank[i], "kept": kept[i], "why": self._why(rank[i], kept[i], stage1[i], d, g)})
        return out

    def _why(self, r: int, kept: bool, verdict: int, d: float | None, g: float | None) -> str:
        p = self.params
        if kept:
            if p.mode == "random":
                return f"pick {r}: random draw (seed {p.seed})"
            if p.mode == "relevance":
                return f"pick {r}: relevance rank {r}"
            if d is None:
                return f"pick {r}: highest quality Q" + (" of its prototype" if verdict == COVERAGE else "")
            return f"pick {r}: best lam*z(Q)+(1-lam)*D = {g:.4f} (D = {d:.4f})"
        if verdict in FILTERED:
            return VERDICTS[verdict]
        return f"not picked: rank {r} ({'lower quality or diversity' if p.mode == 'sas' else 'lower ' + p.mode})"


def _col(a: np.ndarray) -> list:
    """A float column as JSON values: rounded to 6 places, NaN as None."""
    a = np.round(np.asarray(a, np.float64), 6)
    return [None if v != v else v for v in a.tolist()]


# -- scores ---------------------------------------------------------------------------------------
def scores(emb: np.ndarray, labels: np.ndarray, anchors: np.ndarray,
           own_anchors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(relevance [N], margin [N]).

    ``anchors`` [C, d]: one per class (prompt embeddings or real-image centroids); ``own_anchors``
    [N, d] (optional): a per-candidate relevance anchor (e.g. its prototype's text). The margin is
    always against the best *other* class anchor; with a single class it is taken against -1.
    """
    emb, anchors = np.asarray(emb, np.float32), np.asarray(anchors, np.float32)
    labels = np.asarray(labels, np.int64)
    if emb.ndim != 2 or anchors.ndim != 2 or emb.shape[1] != anchors.shape[1] or len(labels) != len(emb):
        raise SasError(f"shapes do not fit: embeddings {emb.shape}, labels {labels.shape}, anchors {anchors.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(anchors)):
        raise SasError(f"labels must index the {len(anchors)} class anchors, got {labels.min()}..{labels.max()}")
    if anchors.shape[0] == 1:
        rel = emb @ anchors[0] if own_anchors is None else _rowdot(emb, own_anchors)
        return rel, rel + 1.0
    rel, other = np.empty(len(emb), np.float32), np.empty(len(emb), np.float32)
    for s in range(0, len(emb), _CHUNK):  # [chunk, C] at a time: the similarities stay in cache
        sims = emb[s:s + _CHUNK] @ anchors.T
        rows, lab = np.arange(len(sims)), labels[s:s + _CHUNK]
        rel[s:s + _CHUNK] = sims[rows, lab]
        sims[rows, lab] = -np.inf
        other[s:s + _CHUNK] = sims.max(axis=1)
    if own_anchors is not None:
        rel = _rowdot(emb, own_anchors)
    return rel, rel - other


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, np.float32)
    if b.shape != a.shape:
        raise SasError(f"own anchors {b.shape} do not fit the embeddings {a.shape}")
    return np.einsum("nd,nd->n", a, b)


# -- padding by class -----------------------------------------------------------------------------
def _pad(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes present [C'], index [C', M] of candidate ids in ascending order (-1 = padding), mask)."""
    classes, counts = np.unique(labels, return_counts=True)
    order = np.argsort(labels, kind="stable")  # candidates grouped by class, ascending index inside
    m = int(counts.max()) if len(counts) else 0
    idx = np.full((len(classes), m), -1, np.int64)
    pos = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
    idx[np.repeat(np.arange(len(classes)), counts), pos] = order
    return classes, idx, idx >= 0


def _z(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Standardise each row over its masked entries (population std; a constant row gives zeros)."""
    n = np.maximum(mask.sum(1, keepdims=True), 1)
    xm = np.where(mask, x, 0.0)
    mean = xm.sum(1, keepdims=True) / n
    var = (np.where(mask, x - mean, 0.0) ** 2).sum(1, keepdims=True) / n
    std = np.sqrt(var)
    return np.where(mask & (std > 1e-12), (x - mean) / np.where(std > 1e-12, std, 1.0), 0.0)


def _order(key: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per row: positions sorted by group ascending, then key descending, then position (stable)."""
    o = np.argsort(-key, axis=1, kind="stable")
    g = np.take_along_axis(group, o, 1)
    return np.take_along_axis(o, np.argsort(g, axis=1, kind="stable"), 1)


# -- the selection --------------------------------------------------------------------------------
def select(emb: np.ndarray, labels, anchors: np.ndarray, params: SasParams, own_anchors: np.ndarray | None = None,
           prototypes=None, caption_match=None, foreground=None) -> Selection:
    """Choose ``params.ipc`` candidates per class (fewer where a class's pool is smaller).

    ``emb`` [N, d] unit candidate embeddings, ``labels`` [N] class indices into ``anchors`` [C, d];
    ``prototypes`` [N] (optional) the prototype each candidate was generated from, for ``per_prototype``;
    ``caption_match`` [N] (M, needed when ``caption_weight`` > 0) and ``foreground`` [N] (needed with
    ``min_foreground``) are recorded per candidate whenever given.
    """
    params.check()
    emb = np.asarray(emb, np.float32)
    labels = np.asarray(labels, np.int64)
    if params.per_prototype and prototypes is None:
        raise SasError("per_prototype needs the prototype of every candidate")
    caption_match, foreground = _optional(caption_match, len(labels)), _optional(foreground, len(labels))
    if params.caption_weight and caption_match is None:
        raise SasError("caption_weight > 0 needs the caption match of every candidate")
    if params.min_foreground is not None and foreground is None:
        raise SasError("min_foreground needs the foreground fraction of every candidate")
    rel, margin = scores(emb, labels, anchors, own_anchors)
    classes, idx, mask = _pad(labels)
    safe = np.where(mask, idx, 0)
    R, S = np.where(mask, rel[safe], 0.0), np.where(mask, margin[safe], 0.0)
    proto = None if prototypes is None else np.where(mask, np.asarray(prototypes, np.int64)[safe], -1)
    shape = idx.shape
    verdict = np.full(shape, NOT_APPLIED)
    D, G = np.full(shape, np.nan), np.full(shape, np.nan)
    if params.mode == "sas":
        Q = params.alpha * _z(R, mask) + (1 - params.alpha) * _z(S, mask)
        if params.caption_weight:
            Q = Q + params.caption_weight * _z(np.where(mask, caption_match[safe], 0.0), mask)
        low = mask & (foreground[safe] < params.min_foreground) if params.min_foreground is not None else None
        verdict, allowed = _stage1(Q, S, mask, params, low)
        reps = _representatives(Q, allowed, proto, mask) if params.per_prototype else None
        if reps is not None:
            verdict[reps & ~allowed] = COVERAGE
            allowed = allowed | reps
        picks, D, G = _greedy(_by_class(emb, idx, safe), Q, allowed, reps, params.ipc, params.lam)
        rest_group = np.where(allowed, 0, np.where(mask, 1, 2))
    else:
        Q = R if params.mode == "relevance" else _random_keys(classes, mask, params.seed)
        reps = _representatives(Q, mask, proto, mask) if params.per_prototype else None
        first = np.where(reps, 0, 1) if reps is not None else np.zeros(shape, np.int64)
        order = _order(Q, np.where(mask, first, 2))
        n = np.minimum(params.ipc, mask.sum(1))
        picks = np.where(np.arange(shape[1])[None, :min(params.ipc, shape[1])] < n[:, None],
                         order[:, :params.ipc], -1)
        rest_group = np.where(mask, 0, 2)
    padded = {"Q": Q, "verdict": verdict, "D": D, "G": G, "picks": picks, "idx": idx, "mask": mask,
              "rest_group": rest_group}
    sel = _assemble(params, labels, rel, margin, prototypes, padded)
    sel.caption_match, sel.foreground = caption_match, foreground
    return sel


def _optional(values, n: int) -> np.ndarray | None:
    """A per-candidate float column, or None; its length must be the pool's."""
    if values is None:
        return None
    a = np.asarray(values, np.float64)
    if a.shape != (n,):
        raise SasError(f"a per-candidate score has shape {a.shape}, the pool has {n} candidates")
    return a


def _by_class(emb: np.ndarray, idx: np.ndarray, safe: np.ndarray) -> np.ndarray:
    """[C, M, d] embeddings by class: a view when the pool is already grouped in equal blocks (no copy)."""
    C, M = idx.shape
    if C * M == len(emb) and np.array_equal(idx.ravel(), np.arange(len(emb))):
        return emb.reshape(C, M, -1)
    return emb[safe]  # padding rows hold candidate 0: never allowed, so never picked


def _random_keys(classes: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """A uniform key per candidate from a generator seeded by (seed, class): classes are independent."""
    keys = np.zeros(mask.shape)
    for r, c in enumerate(classes):
        n = int(mask[r].sum())
        keys[r, :n] = np.random.default_rng([seed, int(c)]).random(n)
    return keys


def _stage1(Q: np.ndarray, S: np.ndarray, mask: np.ndarray, p: SasParams,
            low: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(verdict codes, candidate mask): enough foreground (``low``: under --min-foreground), non-negative
    margin, then the top share by Q; back-fill to IPC, candidates with enough foreground first."""
    m_c = mask.sum(1)
    low = np.zeros_like(mask) if low is None else low
    ok = mask & ~low
    passing = ok & (S >= 0) if p.gate else ok.copy()
    share = np.maximum(np.ceil(np.round(p.keep * m_c, 9)), p.ipc)
    order = _order(Q, np.where(passing, 0, np.where(ok, 1, np.where(mask, 2, 3))))
    n_pass = passing.sum(1)
    n_cand = np.where(n_pass >= p.ipc, np.minimum(n_pass, share), np.minimum(p.ipc, m_c))
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(order.shape[1]), order.shape), 1)
    cand = mask & (pos < n_cand[:, None])
    verdict = np.full(Q.shape, CANDIDATE)
    verdict[ok & ~passing & ~cand] = NEGATIVE_MARGIN
    verdict[low & ~cand] = LOW_FOREGROUND
    verdict[mask & passing & ~cand] = BELOW_SHARE
    verdict[mask & ~passing & cand] = BACKFILLED
    return verdict, cand


def _representatives(key: np.ndarray, allowed: np.ndarray, proto: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask of the best candidate (by key, then lowest index) of each prototype in each row, preferring
    allowed candidates; a prototype with no allowed candidate is represented by its best one."""
    order = _order(key, np.where(allowed, 0, np.where(mask, 1, 2)))
    rows = np.repeat(np.arange(key.shape[0]), key.shape[1])
    cols = order.ravel()
    pr = proto[rows, cols]
    ok = mask[rows, cols]
    ids = rows[ok] * (int(proto.max()) + 2) + pr[ok] + 1
    _, first = np.unique(ids, return_index=True)  # first occurrence in (row, order) = the best
    reps = np.zeros(key.shape, bool)
    reps[rows[ok][first], cols[ok][first]] = True
    return reps


def _greedy(E: np.ndarray, Q: np.ndarray, allowed: np.ndarray, reps: np.ndarray | None, ipc: int,
            lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage 2 for all classes at once: (picks [C, ipc] of positions (-1: none), D, score at pick).

    The first pick is the best Q; then argmax lam z(Q) + (1 - lam) (1 - max_{j picked} s(v, v_j)),
    the max-similarity updated with the newest pick only. ``reps`` are exhausted before the others.
    """
    C, M = Q.shape
    zq = _z(Q, allowed)
    rows = np.arange(C)
    picked = np.zeros((C, M), bool)
    maxsim = np.full((C, M), -np.inf)
    picks = np.full((C, ipc), -1, np.int64)
    D, G = np.full((C, M), np.nan), np.full((C, M), np.nan)
    n_pick = np.minimum(ipc, allowed.sum(1))
    for t in range(min(ipc, M)):
        pool = allowed & ~picked
        if reps is not None:
            rp = reps & ~picked
            pool = np.where(rp.any(1, keepdims=True), rp, pool)
        div = 1.0 - maxsim
        score = Q if t == 0 else lam * zq + (1 - lam) * div
        p = np.argmax(np.where(pool, score, -np.inf), axis=1)
        act = rows[t < n_pick]
        pa = p[act]
        picks[act, t] = pa
        picked[act, pa] = True
        if t > 0:
            D[act, pa], G[act, pa] = div[act, pa], score[act, pa]
        sim = np.matmul(E, E[rows, p][:, :, None])[..., 0]  # every row: cheaper than copying the active ones
        maxsim = np.where((t < n_pick)[:, None], np.maximum(maxsim, sim), maxsim)
    return picks, D, G


def _assemble(params, labels, rel, margin, prototypes, padded: dict) -> Selection:
    """Back from the padded [C, M] arrays (``padded``: Q, verdict, D, G, picks, idx, mask, rest_group) to
    per-candidate arrays; ranks: picks, then the rest by (group, Q)."""
    Q, verdict, D, G = padded["Q"], padded["verdict"], padded["D"], padded["G"]
    picks, idx, mask, rest_group = padded["picks"], padded["idx"], padded["mask"], padded["rest_group"]
    n = len(labels)
    out = {k: np.full(n, np.nan) for k in ("quality", "diversity", "gain")}
    stage1 = np.full(n, NOT_APPLIED)
    rank = np.zeros(n, np.int64)
    C, M = idx.shape
    is_pick = np.zeros((C, M), bool)
    valid = picks >= 0
    is_pick[np.nonzero(valid)[0], picks[valid]] = True
    order = _order(Q, np.where(is_pick, -1, rest_group))  # picks first ...
    pick_rank = np.full((C, M), 0)
    pick_rank[np.nonzero(valid)[0], picks[valid]] = np.nonzero(valid)[1]
    # ... in pick order: sort the leading picks by their pick index
    n_p = valid.sum(1)
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(M), order.shape), 1)
    pos = np.where(is_pick, pick_rank, pos)
    sel = mask
    ids = idx[sel]
    rank[ids] = pos[sel] + 1
    out["diversity"][ids], out["gain"][ids] = D[sel], G[sel]
    if params.mode == "sas":
        out["quality"][ids] = Q[sel]
    stage1[ids] = verdict[sel]
    picked = {}
    classes = labels[idx[:, 0]] if C else np.array([], np.int64)
    for r in range(C):
        picked[int(classes[r])] = [int(idx[r, p]) for p in picks[r, :n_p[r]]]
    return Selection(params, labels, rel, margin, out["quality"], stage1, rank, out["diversity"], out["gain"],
                     picked, None if prototypes is None else np.asarray(prototypes))


# -- helpers for callers --------------------------------------------------------------------------
