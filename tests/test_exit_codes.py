"""One exit-code rule for every command (issue 26): 2 for usage (bad flags or values, missing paths), 1 for a
failure while running, 130 for Ctrl-C; cheap arguments are checked before any heavy import."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlcp.cli.common import EXIT_CODES
from vlcp.cli.main import cli, main


def folder_with_manifest(path: Path) -> Path:
    """A one-image distilled folder as vlcp writes it (manifest with parameters), for refine/report/evaluate."""
    from PIL import Image

    (path / "0").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(path / "0" / "0000.png")
    (path / "manifest.json").write_text(json.dumps({"vlcp_version": "0.1.0", "parameters": {"data": "digits",
                                                                                           "ipc": 1}}))
    return path


def commands(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """command -> (arguments that pass the checks, the module attribute its work starts with)."""
    pool = folder_with_manifest(tmp / "pool")
    return {
        "distill": (["distill", "--data", "digits", "--ipc", "1", "--tiny", "--out", tmp / "o1"],
                    "vlcp.pipeline.loop.distill"),
        "refine": (["refine", pool, "--data", "digits", "--out", tmp / "o2"], "vlcp.pipeline.loop.distill"),
        "evaluate": (["evaluate", pool, "--data", "digits"], "vlcp.evaluation.evaluate.run"),
        "baseline": (["baseline", "--method", "random", "--data", "digits", "--ipc", "1", "--out", tmp / "o3"],
                     "vlcp.data.datasets.load_dataset"),
        "select": (["select", pool, "--data", "digits", "--ipc", "1", "--out", tmp / "o4", "--tiny"],
                   "vlcp.baselines.select.run"),
        "report": (["report", pool], "vlcp.report.html.build"),
        "captions export": (["captions", "export", "--data", "digits", "--tiny", "--out", tmp / "c.jsonl"],
                            "vlcp.pipeline.loop.cached_captions"),
        "datasets": (["datasets"], "vlcp.data.datasets.is_present"),
        "cache info": (["cache", "info"], "vlcp.store.cache.StageCache.stats"),
        "cache clear": (["cache", "clear", "--yes"], "vlcp.store.cache.StageCache.clear"),
        "cache merge": (["cache", "merge", tmp / "other"], "vlcp.store.merge.merge"),
    }


def invoke(tmp: Path, args: list) -> object:
    (tmp / "cache").mkdir(exist_ok=True)  # (`cache info` reads an existing cache only: a look creates no folder)
    base = ["--cache-dir", str(tmp / "cache"), "--data-dir", str(tmp / "data")]
    return CliRunner().invoke(cli, base + [str(a) for a in args])


def raiser(exc: BaseException):
    def boom(*a, **k):
        raise exc
    return boom


NAMES = ["distill", "refine", "evaluate", "baseline", "select", "report", "captions export", "datasets", "cache info",
         "cache clear", "cache merge"]


@pytest.mark.parametrize("name", NAMES)
def test_every_command_exits_130_on_ctrl_c_and_2_on_a_bad_flag(name, tmp_path, monkeypatch):
    args, target = commands(tmp_path)[name]
    monkeypatch.setattr(target, raiser(KeyboardInterrupt()))
    r = invoke(tmp_path, args)
    assert r.exit_code == 130, r.output
    assert r.output.strip().endswith("Aborted!") and "Traceback" not in r.output
    r = invoke(tmp_path, [*args, "--no-such-flag"])
    assert r.exit_code == 2 and "No such option" in r.output and "--no-such-flag" in r.output


@pytest.mark.parametrize("name", NAMES)
def test_every_command_exits_1_on_a_failure_while_running(name, tmp_path, monkeypatch):
    from vlcp.data.datasets import DatasetError

    args, target = commands(tmp_path)[name]
    wrapped = name in ("distill", "refine", "evaluate", "baseline", "select", "captions export")
    # the package's own errors become one line; anything else is a traceback, as Python exits: 1 either way
    monkeypatch.setattr(target, raiser(DatasetError("the disk went away") if wrapped else OSError(5, "I/O error")))
    r = invoke(tmp_path, args)
    assert r.exit_code == 1, r.output
    if wrapped:
        assert r.output.strip().splitlines()[-1] == "Error: the disk went away"


def test_ctrl_c_through_main_exits_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("vlcp.data.datasets.is_present", raiser(KeyboardInterrupt()))
    monkeypatch.setattr(sys, "argv", ["vlcp", "--data-dir", str(tmp_path), "datasets"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 130 and capsys.readouterr().err.endswith("Aborted!\n")


def test_the_rule_is_in_the_help():
    r = CliRunner().invoke(cli, ["--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and " ".join(EXIT_CODES.split()) in text
    assert "2 usage" in EXIT_CODES and "1 a failure while running" in EXIT_CODES and "130 interrupted" in EXIT_CODES


# Usage errors, each in a fresh process that must not import torch (the check comes first) and must be quick.
CHEAP = """
import sys, time
from vlcp.cli.main import main
out = []
for line in sys.stdin.read().split("\\n"):
    if not line:
        continue
    sys.argv = ["vlcp"] + line.split("|")
    t = time.perf_counter()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out.append(f"{code} {time.perf_counter() - t:.2f}")
print("RESULT", " ; ".join(out), "TORCH" if "torch" in sys.modules else "NO-TORCH")
"""


def test_usage_errors_exit_2_before_any_heavy_import(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    pool = folder_with_manifest(tmp_path / "pool")
    g = ["--cache-dir", str(tmp_path / "cache"), "--data-dir", str(tmp_path / "data")]
    cases = [  # (arguments, a phrase of the one-line error)
        ([*g, "evaluate", tmp_path / "missing", "--data", "digits"], "does not exist"),
        ([*g, "distill", "--data", "./my-images", "--ipc", "1", "--out", tmp_path / "o"],
         "Error: --data ./my-images: no such folder"),
        ([*g, "distill", "--data", str(tmp_path / "no" / "images"), "--ipc", "1", "--out", tmp_path / "o"],
         "no such folder"),
        ([*g, "distill", "--data", "imagenett", "--ipc", "1", "--out", tmp_path / "o"],
         "Error: unknown dataset 'imagenett'"),
        ([*g, "distill", "--data", str(tmp_path / "file.txt"), "--ipc", "1", "--out", tmp_path / "o"],
         "is a file, not a folder"),
        ([*g, "distill", "--data", "digits", "--ipc", "0", "--out", tmp_path / "o"], "--ipc"),
        ([*g, "distill", "--data", "digits", "--ipc", "1", "--out", tmp_path / "file.txt"], "is a file"),
        ([*g, "distill", "--data", "digits", "--ipc", "1", "--out", tmp_path / "o", "--captioner", "./no-llava"],
         "--captioner ./no-llava: model directory does not exist"),
        ([*g, "--device", "gpu", "distill", "--data", "digits", "--ipc", "1", "--out", tmp_path / "o"],
         "--device gpu: not a device"),
        ([*g, "baseline", "--method", "random", "--data", "nope", "--ipc", "1", "--out", tmp_path / "o"],
         "unknown dataset 'nope'"),
        ([*g, "select", pool, "--data", "./nope", "--ipc", "1", "--out", tmp_path / "o"], "no such folder"),
        ([*g, "select", tmp_path / "missing", "--data", "digits", "--ipc", "1", "--out", tmp_path / "o"],
         "does not exist"),
        ([*g, "refine", tmp_path / "missing", "--data", "digits", "--out", tmp_path / "o"], "does not exist"),
        ([*g, "refine", pool, "--data", "./nope", "--out", tmp_path / "o"], "no such folder"),
        ([*g, "captions", "export", "--data", "./nope", "--out", tmp_path / "c.jsonl"], "no such folder"),
        ([*g, "evaluate", pool, "--data", "./nope"], "no such folder"),
        ([*g, "report", tmp_path / "missing"], "Error:"),
        ([*g, "cache", "merge", tmp_path / "missing"], "Error:"),
    ]
    stdin = "\n".join("|".join(map(str, args)) for args, _ in cases)
    proc = subprocess.run([sys.executable, "-c", CHEAP], input=stdin, capture_output=True, text=True, timeout=120)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    results = line[len("RESULT "):].rsplit(" ", 1)
    assert results[1] == "NO-TORCH", proc.stderr
    codes = [r.split() for r in results[0].split(" ; ")]
    assert [c for c, _ in codes] == ["2"] * len(cases), (codes, proc.stderr)
    assert all(float(s) < 3 for _, s in codes), codes  # evaluate took 7 s to say so, importing torch first
    errors = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == len(cases), proc.stderr
    for (args, phrase), err in zip(cases, errors):
        assert phrase in err, (args, err)
