"""Mutation score of the modules whose bugs silently change results (issue 17, item 7).

Runs mutmut 3 (configured in setup.cfg ``[mutmut]``: the fast unit tests only, e2e tests left out)
over the functions listed in ``TARGETS``, then prints one table row per module: mutants, killed,
survived, judged equivalent (``EQUIVALENT``, with the reason), and the score = killed / (mutants -
equivalent). mutmut copies the project into ``mutants/`` (git-ignored) and never edits ``vlcp/``.

    pip install -e '.[mutation]'
    nice -n 10 python benchmarks/mutation.py                 # everything, from scratch
    nice -n 10 python benchmarks/mutation.py outliers refine # some modules
    python benchmarks/mutation.py --report                   # table of the last run, no run
    mutmut show vlcp.method.outliers.x_inlier_mask__mutmut_7        # what one mutant changed
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> mutant-name globs (mutmut names functions x_<name>, methods xǁ<Class>ǁ<name>)
TARGETS: dict[str, list[str]] = {
    "text_prototypes": ["vlcp.method.text_prototypes.*"],
    "text_prototypes (reference)": ["vlcp.method.text_prototypes_reference.*", "vlcp.method.tokenize.*"],
    "outliers": ["vlcp.method.outliers.*"],
    "clusters": ["vlcp.method.clusters.*"],
    "cache": ["vlcp.store.cache.*", "vlcp.store.index_codec.*"],
    "arrays": ["vlcp.store.arrays.*"],
    "refine (selection)": [f"vlcp.method.refine.x_{f}__mutmut_*" for f in
                           ("default_beta", "is_defective", "candidate_seed", "_cos", "choose", "select", "_mean")],
    "evaluate (protocol, schedule)": [f"vlcp.evaluation.protocols.x_{f}__mutmut_*" for f in
                                      ("default_protocol", "minimax_epochs", "rded_batch_size", "_minimax", "_dc",
                                       "_rded", "make_protocol", "tested_epochs", "lr_factor")],
}

_RESHAPE = "reshape(n, -2): numpy takes any negative size as 'infer', same array"
_STABLE = 'argsort kind="STABLE": numpy reads the kind case-insensitively, same sort'
_ZERO_SCORE = "score == 0 means all scores are 0, argmax is then 0, so rows[best] is rows[0] anyway"
_NO_WORDS = "only reached with an empty vocabulary, where the changed array is never indexed"
_SPLIT0 = "[0] of split('/', n) is the same for any maxsplit >= 1 or none"
_EPS = "the epsilon only guards a zero norm; +-1e-12 changes results by 1e-12 relative at most"
_UNUSED = "informational record field (stage / created) that nothing reads"
_BYTES = "every record has a 'bytes' field; the default is never used"
_RAW = ("super()'s read, key and filename only matter for values diskcache writes to files; the index keeps "
        "every value in SQLite (1 GiB threshold), and None/False/UNKNOWN for them give the same raw row")
_CLASSES = "default class count 10 vs 11: only 100 and 1000 classes change anything"
_DEFAULT = "the argument dropped equals the Protocol dataclass default"
_SLOW_STARTS = ("the caption starts are then always computed caption by caption (the path for captions "
                "holding a NUL), which gives the same starts")
_WHOLE = "the word ids as float64 are whole numbers < 2**53, cast to the index type in _binary_matrix"
_ABBR_UNREAD = ("the abbr mark set here is never read again: each token's second pass runs once, as t1, "
                "and only sentbreak decides (NLTK reads it no more)")

# Mutants that cannot change behaviour, with the reason (checked by reading ``mutmut show NAME``).
EQUIVALENT: dict[str, str] = {
    **{f"vlcp.method.text_prototypes.x__binary_matrix__mutmut_{i}": "int64 caption x word pairs where int32 would do: "
       "scipy stores index arrays that fit as int32 itself, same matrix (int32 only saves that conversion)"
       for i in (2, 6)},
    **{f"vlcp.method.text_prototypes.x__binary_matrix__mutmut_{i}": "np.arange(n + 1) without dtype is int64: the row "
       "bounds cannot overflow, the same indptr is cast to the index type" for i in (26, 28)},
    **{f"vlcp.method.text_prototypes.x__binary_matrix__mutmut_{i}": "shape inferred: len(indptr) - 1 rows, largest "
       "column + 1 columns, and every vocabulary word occurs in some caption" for i in (33, 35)},
    "vlcp.method.text_prototypes.x__class_bytes__mutmut_13": '"UTF-8" and "utf-8" name the same codec',
    **{f"vlcp.method.text_prototypes.x__class_bytes__mutmut_{i}": _SLOW_STARTS for i in (17, 26)},
    "vlcp.method.text_prototypes.x__class_bytes__mutmut_29": "caption starts at NUL - 1 instead of NUL + 1: no token "
                                                      "starts on a NUL or on the byte before it (tokens have >= 2 "
                                                      "letters), so searchsorted counts the same tokens",
    **{f"vlcp.method.text_prototypes.x__membership__mutmut_{i}": "the empty column array only serves members == [], "
       "whose matrix has no rows either way (a float or stray index past indptr[-1] is never read)"
       for i in (6, 8, 9)},
    "vlcp.method.text_prototypes.x__non_representative__mutmut_21": "with an empty vocabulary the frequency test gives "
                                                             "an empty boolean array, as stop is",
    **{f"vlcp.method.text_prototypes.x__pack__mutmut_{i}": "any sort by length gives the same keys: each is computed for "
       "its own token and scattered back" for i in (3, 5, 7, 9)},
    "vlcp.method.text_prototypes.x__pack__mutmut_17": 'side="left" is searchsorted\'s default',
    **{f"vlcp.method.text_prototypes.x__token_runs__mutmut_{i}": "a float letter array holds the same 0/1 edges as a "
       "boolean one" for i in (8, 10)},
    "vlcp.method.text_prototypes.x__top_words__mutmut_25": "max(freq, 1) vs max(freq, 0) differs only when all "
                                                    "frequencies are 0: a common offset, the same smallest keys",
    **{f"vlcp.method.text_prototypes.x__top_words__mutmut_{i}": "axis=1 is the default axis -1 of the 2-D frequencies"
       for i in (32, 38)},
    **{f"vlcp.method.text_prototypes.x__unpack__mutmut_{i}": "np.arange without dtype is int64 already" for i in (7, 11)},
    "vlcp.method.text_prototypes.x__word_ids__mutmut_2": "12-letter words then take the Python-string path, which gives "
                                                  "the same sorted vocabulary and ids (only slower)",
    "vlcp.method.text_prototypes.x__word_ids__mutmut_34": '"ASCII" and "ascii" name the same codec',
    **{f"vlcp.method.text_prototypes.x__word_ids__mutmut_{i}": _WHOLE for i in (55, 57)},
    **{f"vlcp.method.text_prototypes.x__word_ids__mutmut_{i}": "np.array of Python ints is int64 without the dtype"
       for i in (60, 62)},
    **{f"vlcp.method.text_prototypes.x_class_prototypes__mutmut_{i}": "np.asarray of Python ints is int64 without the "
       "dtype; an empty cluster's float array is never indexed" for i in (41, 43)},
    "vlcp.method.text_prototypes.x_class_prototypes__mutmut_83": _ZERO_SCORE,
    "vlcp.method.text_prototypes.x_class_prototypes__mutmut_84": _ZERO_SCORE,
    "vlcp.method.tokenize.xǁ_Tokǁ__init____mutmut_9": "None instead of False for the marks: they are only read "
                                                   "as truths (NLTK itself starts them at None)",
    "vlcp.method.tokenize.xǁ_Tokǁ__init____mutmut_25": "punkt's word regex splits a run of periods off as a "
                                                    "token of its own, an ellipsis caught above: none left ends in ..",
    "vlcp.method.tokenize.x__contexts__mutmut_9": "None and 0 are both false for the `if space` that alone reads it",
    "vlcp.method.tokenize.x__second_pass__mutmut_10": _ABBR_UNREAD,
    "vlcp.method.tokenize.x__second_pass__mutmut_50": _ABBR_UNREAD,
    "vlcp.method.outliers.x_inlier_mask__mutmut_1": "min_keep default 1 vs 0: LOF (contamination <= 0.5) never removes all",
    "vlcp.method.outliers.x_inlier_mask__mutmut_31": _RESHAPE,
    "vlcp.method.outliers.x_inlier_mask__mutmut_36": "mask.sum() == min_keep enters the loop, which breaks at once",
    "vlcp.method.outliers.x_inlier_mask__mutmut_44": _STABLE,
    "vlcp.method.clusters.x_kmeans__mutmut_4": "astype(None) is astype(float64)",
    "vlcp.method.clusters.x_kmeans__mutmut_10": _RESHAPE,
    "vlcp.method.clusters.x_members_by_distance__mutmut_7": _RESHAPE,
    "vlcp.method.clusters.x_members_by_distance__mutmut_13": _RESHAPE,
    "vlcp.method.clusters.x_members_by_distance__mutmut_33": _STABLE,
    "vlcp.store.cache.x_atomic_write_bytes__mutmut_28": "the temp file always exists when the except branch unlinks it",
    "vlcp.store.cache.x_atomic_write_bytes__mutmut_30": "the temp file always exists when the except branch unlinks it",
    "vlcp.store.cache.x_file_digest__mutmut_8": "f.read(None) reads the rest at once: same digest, only more memory",
    "vlcp.store.cache.xǁStageCacheǁ__init____mutmut_25": "any threshold above the largest record keeps records in SQLite",
    "vlcp.store.cache.xǁStageCacheǁ__init____mutmut_26": "any threshold above the largest record keeps records in SQLite",
    "vlcp.store.index_codec.x_json_disk__mutmut_10": "the size diskcache records only counts toward its size limit, disabled "
                                          "here (eviction none)",
    **{f"vlcp.store.index_codec.x_json_disk__mutmut_{i}": _RAW for i in (5, 6, 8, 9, 15, 17)},
    **{f"vlcp.store.cache.xǁStageCacheǁ_records__mutmut_{i}": "SQLite reads keywords and column names "
       "case-insensitively" for i in (37, 38)},
    **{f"vlcp.store.cache.xǁStageCacheǁ_records__mutmut_{i}": "index records are dicts far below disk_min_file_size "
       "(1 GiB): diskcache keeps them pickled in the row, where Disk.fetch reads neither filename nor read"
       for i in (42, 44, 49)},
    "vlcp.store.cache.xǁStageCacheǁget_many__mutmut_1": "501 instead of 500 keys a query: the same records (502 SQL "
                                                   "parameters stay below SQLite's oldest limit, 999)",
    "vlcp.store.cache.xǁStageCacheǁ_entry__mutmut_18": "Entry(meta, None) without a loader is Entry(meta, {})",
    "vlcp.store.cache.xǁStageCacheǁ_entry__mutmut_20": "Entry(meta) without a loader is Entry(meta, {})",
    "vlcp.store.cache.xǁStageCacheǁclear__mutmut_9": _SPLIT0,
    "vlcp.store.cache.xǁStageCacheǁclear__mutmut_12": _SPLIT0,
    "vlcp.store.cache.xǁStageCacheǁclear__mutmut_34": "no index record is named models/..., so removed is 0 there",
    "vlcp.store.cache.xǁStageCacheǁclear__mutmut_37": "glob() of a missing folder yields nothing: 0 either way",
    **{f"vlcp.store.cache.xǁStageCacheǁ_record__mutmut_{i}": _UNUSED for i in (13, 14, 17, 18)},
    "vlcp.store.cache.xǁStageCacheǁstats__mutmut_6": _SPLIT0,
    "vlcp.store.cache.xǁStageCacheǁstats__mutmut_9": _SPLIT0,
    "vlcp.store.cache.xǁStageCacheǁstats__mutmut_7": "rsplit: artefact keys hold no '/', and a memo's prefix still "
                                               "starts with '_'",
    **{f"vlcp.store.cache.xǁStageCacheǁstats__mutmut_{i}": "an artefact key is a hex digest after 'stage/': [1] is "
       "the same for any maxsplit, or rsplit" for i in (22, 23, 25)},
    **{f"vlcp.store.cache.xǁStageCacheǁstats__mutmut_{i}": _BYTES for i in (51, 53, 56)},
    "vlcp.method.refine.x__cos__mutmut_8": _EPS,
    "vlcp.method.refine.x__cos__mutmut_13": _EPS,
    "vlcp.evaluation.protocols.x_minimax_epochs__mutmut_1": _CLASSES,
    "vlcp.evaluation.protocols.x_make_protocol__mutmut_1": _CLASSES,
    **{f"vlcp.evaluation.protocols.x__dc__mutmut_{i}": _DEFAULT for i in (28, 29, 30, 31, 36)},
    **{f"vlcp.evaluation.protocols.x__minimax__mutmut_{i}": _DEFAULT for i in (44, 46)},
    **{f"vlcp.evaluation.protocols.x_rded_batch_size__mutmut_{i}": "IPC 10 and 50 never reach this branch"
       for i in (16, 17, 21, 22)},
    **{f"vlcp.evaluation.protocols.x_make_protocol__mutmut_{i}": "_dc / _rded use epochs only for p.epochs, which the "
       "user's value then overwrites" for i in (20, 31)},
    **{f"vlcp.evaluation.protocols.x_make_protocol__mutmut_{i}": "the grayscale datasets are exactly digits and "
       "fashion-mnist: channels == 1 and the name test say the same" for i in (77, 83, 85, 86, 87, 88)},
    "vlcp.evaluation.protocols.x_make_protocol__mutmut_146": "the loop above has just set sources['sources']: pop() never misses",
    **{f"vlcp.evaluation.protocols.x_make_protocol__mutmut_{i}": "the text given to sources['sources'] is popped right after"
       for i in (140, 141)},
}


def run(modules: list[str], fresh: bool) -> None:
    if fresh:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    globs = [g for m in modules for g in TARGETS[m]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["nice", "-n", "10", sys.executable, "-m", "mutmut", "run", "--max-children", "2", *globs]
    subprocess.run(cmd, cwd=ROOT, env=env, check=False, stdout=subprocess.DEVNULL)


def statuses() -> dict[str, str]:
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in (ROOT / "mutants" / "vlcp").rglob("*.py.meta"):  # the subpackages: mutants/vlcp/<pkg>/
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = status_by_exit_code[code]
    return out


def report(modules: list[str]) -> list[str]:
    st = statuses()
    rows = ["| module | mutants | killed | survived | equivalent | no test / timeout | score |",
            "|---|---|---|---|---|---|---|"]
    survivors, stale = [], []
    for m in modules:
        names = [n for n in st if any(fnmatch.fnmatchcase(n, g) for g in TARGETS[m])]
        if not names:
            continue
        killed = sum(st[n] in ("killed", "caught by type check") for n in names)
        equiv = [n for n in names if n in EQUIVALENT and st[n] != "killed"]
        alive = [n for n in names if st[n] != "killed" and n not in EQUIVALENT]
        other = sum(st[n] not in ("killed", "survived") for n in alive)
        real = len(names) - len(equiv)
        rows.append(f"| {m} | {len(names)} | {killed} | {len(alive) - other} | {len(equiv)} | {other} | "
                    f"{100 * killed / max(real, 1):.1f} % |")
        survivors += [f"{n}: {st[n]}" for n in sorted(alive)]
        # numbers shift when a module changes: an entry naming a killed or vanished mutant is stale
        stale += sorted(n for n in EQUIVALENT if any(fnmatch.fnmatchcase(n, g) for g in TARGETS[m])
                        and st.get(n, "missing") in ("killed", "missing"))
    return (rows + ([""] + ["not killed and not judged equivalent:"] + survivors if survivors else [])
            + ([""] + ["stale EQUIVALENT entries (killed or no such mutant): re-read them with mutmut show"]
               + stale if stale else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"some of: {', '.join(TARGETS)} (default all)")
    ap.add_argument("--report", action="store_true", help="only print the table of the last run")
    ap.add_argument("--keep", action="store_true", help="reuse mutants/ and its results (default: start fresh)")
    args = ap.parse_args()
    modules = [m for m in TARGETS if not args.modules or any(m.startswith(a) for a in args.modules)]
    if not args.report:
        run(modules, fresh=not args.keep)
    print("\n".join(report(modules)))


if __name__ == "__main__":
    main()
