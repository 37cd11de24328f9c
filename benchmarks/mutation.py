"""Mutation score of the modules whose bugs silently change results (issue 17, item 7).

Runs mutmut 3 (configured in setup.cfg ``[mutmut]``: the fast unit tests only, e2e tests left out)
over the functions listed in ``TARGETS``, then prints one table row per module: mutants, killed,
survived, judged equivalent (``EQUIVALENT``, with the reason), and the score = killed / (mutants -
equivalent). mutmut copies the project into ``mutants/`` (git-ignored) and never edits ``vlcp/``.

    pip install -e '.[mutation]'
    nice -n 10 python benchmarks/mutation.py                 # everything, from scratch
    nice -n 10 python benchmarks/mutation.py outliers refine # some modules
    python benchmarks/mutation.py --report                   # table of the last run, no run
    mutmut show vlcp.outliers.x_inlier_mask__mutmut_7        # what one mutant changed
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
    "text_prototypes": ["vlcp.text_prototypes.*"],
    "outliers": ["vlcp.outliers.*"],
    "clusters": ["vlcp.clusters.*"],
    "cache": ["vlcp.cache.*"],
    "refine (selection)": [f"vlcp.refine.x_{f}__mutmut_*" for f in
                           ("default_beta", "is_defective", "candidate_seed", "_cos", "choose", "select", "_mean")],
    "evaluate (protocol, schedule)": [f"vlcp.evaluate.x_{f}__mutmut_*" for f in
                                      ("default_protocol", "minimax_epochs", "make_protocol", "_schedule")],
}

# Mutants that cannot change behaviour, with the reason (checked by reading ``mutmut show NAME``).
EQUIVALENT: dict[str, str] = {}


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
    for meta in (ROOT / "mutants" / "vlcp").glob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = status_by_exit_code[code]
    return out


def report(modules: list[str]) -> list[str]:
    st = statuses()
    rows = ["| module | mutants | killed | survived | equivalent | no test / timeout | score |",
            "|---|---|---|---|---|---|---|"]
    survivors = []
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
                    f"{100 * killed / max(real, 1):.0f} % |")
        survivors += [f"{n}: {st[n]}" for n in sorted(alive)]
    return rows + ([""] + ["not killed and not judged equivalent:"] + survivors if survivors else [])


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
