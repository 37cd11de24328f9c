"""What the README says about its own commands is true (issue 26): the main job's output names and last
line, the rerun, the version, the help's example, the real run's needs as `--dry-run` prints them, and the
exit-code rule; the needs' rates are those docs/measurements.md measured."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlcp import __version__
from vlcp.cli.common import EXIT_CODES
from vlcp.cli.main import cli

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def flat(text: str) -> str:
    return " ".join(text.split())


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def main_job() -> list[str]:
    """The README's main job: the vlcp command that ends its first set-up line."""
    line = code_blocks("bash")[0].strip()
    assert line.startswith("python3 -m venv .venv")
    return shlex.split(line.rsplit("&& ", 1)[1])[1:]


def real_run() -> list[str]:
    (block,) = [b for b in code_blocks("bash") if b.startswith("vlcp distill --data imagenette")]
    return shlex.split(block.strip())[1:]


def seconds_claimed(what: str) -> float:
    """The figure the README gives for ``what`` ("the identical rerun ... takes 2.1 s")."""
    m = re.search(rf"{what}[^.]*?takes (?:about )?([\d.]+) s", flat(README))
    assert m, what
    return float(m.group(1))


RERUN = """
import sys, time
from vlcp.cli.main import main
sys.argv = ["vlcp"] + sys.argv[1:]
try:
    main()
except SystemExit as e:
    print("EXIT", e.code)
print("TORCH" if "torch" in sys.modules else "NO-TORCH")
"""


@pytest.mark.e2e
def test_the_main_job_its_output_and_its_rerun(tmp_path, tiny_models_dir, monkeypatch):
    args = main_job()
    assert args == ["distill", "--data", "digits", "--ipc", "10", "--tiny", "--out", "out/digits-ipc10"]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_models_dir, tmp_path / "cache" / "models")  # built as a first run builds them
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out" / "digits-ipc10"
    # "its last line names the page to open, `report: out/digits-ipc10/report.html`"
    (last,) = re.findall(r"its last line names the page to open, `([^`]+)`", flat(README))
    assert r.stdout.strip().splitlines()[-1] == last == f"report: {Path('out/digits-ipc10/report.html')}"
    assert (tmp_path / last.split(": ", 1)[1]).is_file()
    # "## Output layout": the block's paths, DIR = --out (evaluations/, soft_labels/, ranks/ come later)
    (layout,) = re.findall(r"^## Output layout\n\n```\n(.*?)^```", README, re.S | re.M)
    paths = [line.split()[0].rstrip(",") for line in layout.splitlines()]
    assert paths == ["DIR/train/<class", "DIR/train/metadata.jsonl", "DIR/README.md", "DIR/manifest.json"]
    assert (out / "train" / "metadata.jsonl").is_file() and (out / "README.md").read_text().startswith("---\n")
    root_files = re.findall(r"(?:DIR/)?([\w.]+\.(?:json|png|html))", layout.splitlines()[-1])
    assert root_files == ["manifest.json", "prototypes.json", "preview.png", "report.html"]
    assert all((out / n).is_file() for n in root_files)
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["train"]
    assert sorted(p.name for p in (out / "train").iterdir()) == [str(c) for c in range(10)] + ["metadata.jsonl"]
    assert all(sorted(q.name for q in (out / "train" / str(c)).iterdir()) == [f"{j:04d}.png" for j in range(10)]
               for c in range(10))
    assert len((out / "train" / "metadata.jsonl").read_text().splitlines()) == 100

    # "An existing `OUT` is replaced only with `--force`"
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "pass --force to replace it" in again.output
    # "the identical rerun with `--force` computes nothing and takes N s": a fresh process, as a user runs it
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RERUN, *args, "--force"], capture_output=True, text=True,
                          timeout=300)
    took = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "NO-TORCH" and re.findall(r"^EXIT (.*)$", proc.stdout, re.M) in ([], ["0"]), \
        proc.stdout + proc.stderr
    rows = [x.split() for x in lines if x.split() and x.split()[1:2] in (["hit"], ["computed"])]
    assert [row[0] for row in rows if row[1] != "hit"] == ["output"]  # the output is rebuilt, nothing computed
    assert all(row[2] == "0" for row in rows if row[0] != "output")
    claimed = seconds_claimed("the identical rerun with `--force` computes nothing and")
    assert took < max(10 * claimed, 30), (took, claimed)  # a wide margin: the machine may be shared


def test_the_version_line():
    (claim,) = re.findall(r"`vlcp --version` prints `([^`]+)`", README)
    r = CliRunner().invoke(cli, ["--version"])
    assert r.output.strip() == claim == f"vlcp, version {__version__}"


def test_the_help_example_is_the_readme_main_job():
    r = CliRunner().invoke(cli, ["--help"])
    assert "vlcp " + " ".join(main_job()) in flat(r.output)


def test_no_page_names_a_newer_version():
    """"vlcp 0.2" where `--version` says 0.1.0: a page may name this version or an older one, never a newer."""
    current = tuple(int(x) for x in __version__.split(".")[:2])
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    newer = [(p.name, v) for p in pages for v in re.findall(r"\bvlcp (\d+\.\d+)\b", p.read_text())
             if tuple(int(x) for x in v.split(".")) > current]
    assert newer == []


def test_the_exit_code_rule_is_in_the_readme():
    assert flat(EXIT_CODES) in flat(README)


def test_the_needs_block_is_what_dry_run_prints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data here: the dry run must not download it
    args = real_run()
    assert args == ["distill", "--data", "imagenette", "--ipc", "10", "--out", "out/imagenette-ipc10"]
    r = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "data"), *args, "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[-1] == f"plan: not made, imagenette is not in {tmp_path / 'data' / 'imagenette2-320'} yet " \
                        "(a run downloads it first)"
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()
    (block,) = code_blocks("text")
    assert block.splitlines() == lines[:-1]
    text = "\n".join(lines)
    for claim in ("llava-hf/llava-1.5-7b-hf 14.1 GB", "stable-diffusion-v1-5/stable-diffusion-v1-5 4.3 GB",
                  "imagenette 0.34 GB", "GPU memory: peak 23.0 GB, fine-tuning, full", "9,469 images"):
        assert claim in text


def test_dry_run_needs_follow_the_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--data-dir", str(tmp_path / "data"), *real_run(), "--dry-run"]

    def needs(*extra):
        r = CliRunner().invoke(cli, [*base, *extra])
        assert r.exit_code == 0, r.output
        return r.stdout

    lora = needs("--finetune-method", "lora", "--caption-mode", "greedy", "--caption-batch-size", "16")
    assert "GPU memory: peak 21.5 GB, captions, batch 16" in lora
    assert "captions: at most 51 min (batch 16, up to 256 new tokens each)" in lora  # 9469 / 3.08 per s
    sas = needs("--post-sample", "sas", "--captions-from", __file__)
    assert "llava" not in sas and "openai/clip-vit-base-patch32 0.60 GB" in sas
    assert "synthesis: 2 min (500 images)" in sas and "at most" not in sas.split("time on")[1].splitlines()[0]
    until = needs("--until", "latents")
    assert "fine-tuning" not in until and "GPU memory: peak 17.8 GB" in until
    tiny = CliRunner().invoke(cli, ["--cache-dir", str(tmp_path / "c"), "distill", "--data", "digits", "--ipc", "1",
                                    "--tiny", "--out", "o", "--dry-run", "--until", "images"])
    assert tiny.exit_code == 0 and "What this run needs: no download and no GPU" in tiny.stdout


def measured_rows() -> dict[str, tuple[float, float]]:
    """docs/measurements.md's real-shape table: stage -> (throughput number, peak GB)."""
    text = (ROOT / "docs" / "measurements.md").read_text()
    table = text.split("| stage (NVIDIA H200) |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        stage, rate, peak = [c.strip() for c in line.strip("|").split("|")]
        rows[stage] = (float(re.match(r"[\d,.]+", rate).group().replace(",", "")), float(peak))
    return rows


def test_the_needs_rates_are_the_measured_ones():
    from vlcp.cli import needs

    rows = measured_rows()
    for b, (rate, peak) in needs.CAPTIONS.items():
        assert rows[f"captions, batch {b}, {needs.CAPTION_TOKENS} new tokens"] == (rate, peak)
    assert rows["VAE encode, 512 px, batch 16"] == needs.LATENTS
    for (method, ckpt), value in needs.FINETUNE.items():
        key = f"fine-tune {'LoRA' if method == 'lora' else method}, batch 8, 512 px, gradient checkpointing " \
              f"{'on' if ckpt else 'off'}"
        assert rows[key] == value
    assert rows["img2img, batch 8, 512 px, 50 steps x strength 0.7"] == needs.SYNTHESIS
    assert rows["detector (ResNet-18, instance norm) scores, batch 64, 224 px"][1] == needs.DETECTOR_GB


def test_the_memory_goal_names_the_default_method():
    """The page said the default run fits 24 GB "with LoRA"; the default is --finetune-method full."""
    from vlcp.pipeline.config import default

    text = flat((ROOT / "docs" / "measurements.md").read_text())
    (peak,) = re.findall(r"The default run \(`--finetune-method full`\) needs \*\*([\d.]+) GB\*\* while "
                         r"fine-tuning with gradient checkpointing", text)
    assert default("finetune_method") == "full"
    from vlcp.cli.needs import FINETUNE

    assert float(peak) == FINETUNE["full", True][1]
