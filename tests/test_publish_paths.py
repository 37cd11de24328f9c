"""`vlcp publish` sends public copies of OUT's JSON files: absolute local paths as the card shows them (…/name).

The commit is built by `vlcp.cli.publish.commit_operations` with huggingface_hub's real CommitOperationAdd, so the
tests read exactly what would be sent (path in the repository, bytes or the file on disk) without a network."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from vlcp.cli.main import cli
from vlcp.cli.publish import commit_operations, public_json
from vlcp.report.card import (
    public_values as hide_paths,  # what publish applies to every JSON value
)
from vlcp.store.output import read_manifest, write_json


def dump(obj) -> str:
    """As vlcp.store.output.write_json writes (and the public copies are written)."""
    return json.dumps(obj, indent=2) + "\n"


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def make_out(tmp_path: Path) -> tuple[Path, dict, dict]:
    """A hand-made OUT: (OUT, the manifest written, the evaluation written)."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    (out / "train" / "0").mkdir(parents=True)
    manifest = {
        "vlcp_version": "0.1.0",
        "parameters": {"data": "digits", "ipc": 1, "out": str(out), "data_dir": str(tmp_path / "data") + "/",
                       "captioner": "~/models/llava", "diffusion": "C:\\Users\\me\\sd-v1-5",
                       "captions_from": "captions/ref.jsonl", "classes": ["n01/dog", "0"], "beta": 0.2,
                       "top_k": None, "finetune": True, "note": "DC/DSA evaluation (Zhao et al. 2021)"},
        "classes": [{"folder": "0", "name": "zéro/nought"}],
        "models": {"diffusion": {"name": "https://huggingface.co/x/y", "identity": "local:abc", "revision": None},
                   "clip": {"name": "openai/clip-vit-base-patch32", "files": [str(cache / "models" / "clip"), 3]}},
        "nested": [[str(tmp_path / "a" / "b.png"), 1, 2.5], {"deep": {"p": "/"}}],
    }
    (out / "manifest.json").write_text(dump(manifest))
    evaluation = {"teacher": {"file": str(cache / "teachers" / "t.safetensors"), "arch": "convnet3"},
                  "accuracy": {"mean": 50.0, "std": 0.0}}
    (out / "evaluations").mkdir()
    (out / "evaluations" / "x.json").write_text(json.dumps(evaluation))  # compact: another writer's format
    (out / "evaluations" / "plain.json").write_text('{"accuracy": {"mean": 1.5}}')  # no path: sent as it is
    (out / "evaluations" / ".swap.json").write_text(json.dumps({"p": str(out)}))
    (out / "soft_labels").mkdir()
    (out / "soft_labels" / "s.json").write_text(dump({"teacher": {"file": str(cache / "t.safetensors")}}))
    (out / "soft_labels" / "s.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    Image.new("L", (8, 8), 7).save(out / "train" / "0" / "0000.png")
    (out / "train" / "metadata.jsonl").write_text('{"file_name": "0/0000.png", "label": 0}\n')
    (out / "ranks").mkdir()
    (out / "ranks" / "1.json").write_text(json.dumps({"out": str(out)}))
    (out / ".tmp-manifest.json").write_text(json.dumps({"out": str(out)}))
    (out / "README.md").write_text("card\n")
    return out, manifest, evaluation


def test_hide_paths_hides_absolute_paths_only():
    assert [hide_paths(v) for v in ("/home/me/data/", "~/models/llava", "C:\\Users\\me\\sd", "D:/x/y.png", "/")] == [
        "…/data", "…/llava", "…/sd", "…/y.png", "…/"]
    kept = ["https://huggingface.co/x/y", "n01/dog", "captions/ref.jsonl", "./rel/x", "step(1/2;gamma=0.1)",
            "openai/clip-vit-base-patch32", "", "a", 1, 2.5, None, True]
    assert [hide_paths(v) for v in kept] == kept
    assert hide_paths({"/k": ["/a/b", {"c": "/d/e"}], "n": 1}) == {"/k": ["…/b", {"c": "…/e"}], "n": 1}


def test_commit_sends_public_copies_of_json_files_and_the_rest_from_disk(tmp_path):
    out, manifest, evaluation = make_out(tmp_path)
    before = snapshot(out)
    ops = commit_operations(out)
    assert snapshot(out) == before  # nothing on disk changes
    sent = {op.path_in_repo: op.path_or_fileobj for op in ops}
    assert [op.path_in_repo for op in ops] == [
        "README.md", "evaluations/plain.json", "evaluations/x.json", "manifest.json", "soft_labels/s.json",
        "soft_labels/s.safetensors", "train/0/0000.png", "train/metadata.jsonl"]  # no ranks/, no hidden file
    for rel in ("README.md", "evaluations/plain.json", "soft_labels/s.safetensors", "train/0/0000.png",
                "train/metadata.jsonl"):
        assert sent[rel] == str(out / rel)  # from its path: the file as it is
    want = json.loads(dump(manifest))
    p = want["parameters"]
    p["out"], p["data_dir"], p["captioner"], p["diffusion"] = "…/out", "…/data", "…/llava", "…/sd-v1-5"
    want["models"]["clip"]["files"][0] = "…/clip"
    want["nested"][0][0], want["nested"][1]["deep"]["p"] = "…/b.png", "…/"
    assert json.loads(sent["manifest.json"]) == want
    assert sent["manifest.json"] == dump(want).encode()
    changed = [(a, b) for a, b in zip(before["manifest.json"].decode().splitlines(),
                                      sent["manifest.json"].decode().splitlines()) if a != b]
    assert len(before["manifest.json"].splitlines()) == len(sent["manifest.json"].splitlines())
    assert [b.strip() for _, b in changed] == [  # byte for byte the same but on the lines that named a path
        '"out": "\\u2026/out",', '"data_dir": "\\u2026/data",', '"captioner": "\\u2026/llava",',
        '"diffusion": "\\u2026/sd-v1-5",', '"\\u2026/clip",', '"\\u2026/b.png",', '"p": "\\u2026/"']
    assert json.loads(sent["evaluations/x.json"]) == {**evaluation, "teacher": {"file": "…/t.safetensors",
                                                                                "arch": "convnet3"}}
    assert json.loads(sent["soft_labels/s.json"]) == {"teacher": {"file": "…/t.safetensors"}}
    assert str(tmp_path) not in b"".join(v for v in sent.values() if isinstance(v, bytes)).decode()
    assert read_manifest(out)["parameters"]["data_dir"] == str(tmp_path / "data") + "/"  # what vlcp reads


def test_a_json_file_that_is_not_json_stops_the_publish_before_the_hub(tmp_path):
    out, _, _ = make_out(tmp_path)
    (out / "evaluations" / "broken.json").write_text('{"file": "/home/me/')
    with pytest.raises(ValueError, match="broken.json is not readable JSON .*cannot check it for local paths"):
        public_json(out / "evaluations" / "broken.json")
    (out / "README.md").unlink()  # the card is rebuilt from the manifest first
    r = CliRunner().invoke(cli, ["--cache-dir", str(tmp_path / "cache"), "publish", str(out), "someone/name"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and not (out / "README.md").exists()  # OUT unchanged
    assert f"Error: {out / 'evaluations' / 'broken.json'} is not readable JSON (JSONDecodeError" in r.output


def test_publish_offline_still_one_line_after_building_the_commit(tmp_path):
    out, _, _ = make_out(tmp_path)
    (out / "README.md").unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_token"}
    r = subprocess.run([sys.executable, "-m", "vlcp", "--cache-dir", str(tmp_path / "cache"), "publish", str(out),
                        "someone/digits"], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("Error: upload to someone/digits failed: OfflineModeIsEnabled")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.e2e
def test_a_manifest_of_vlcp_distill_goes_without_local_paths(tmp_path, cache_dir):
    """The manifest `vlcp distill` starts from (a dry run: parameters, dataset, model references), written as
    distill writes it: only its path values change."""
    from vlcp.pipeline.config import DistillConfig
    from vlcp.pipeline.loop import distill
    from vlcp.store.cache import StageCache

    out = tmp_path / "out"
    cfg = DistillConfig(data="digits", ipc=1, out=out, data_dir=tmp_path / "data", tiny=True, classes=["0", "1"],
                        max_per_class=3)
    m = distill(cfg, StageCache(cache_dir), dry_run=True)
    out.mkdir()
    write_json(out / "manifest.json", m)
    text = (out / "manifest.json").read_text()
    assert str(tmp_path) in text
    (op,) = commit_operations(out)
    sent = json.loads(op.path_or_fileobj)
    assert op.path_in_repo == "manifest.json" and str(tmp_path) not in op.path_or_fileobj.decode()

    def diff(a, b, at=""):
        if isinstance(a, dict):
            return [d for k in a for d in diff(a[k], b[k], f"{at}.{k}")]
        if isinstance(a, list):
            return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{at}[{i}]")]
        return [] if a == b else [(at, b)]

    assert sorted(diff(json.loads(text), sent)) == [
        (".models.captioner.name", "…/tiny-llava-v3"), (".models.diffusion.name", "…/tiny-sd-v3"),
        (".parameters.captioner", "…/tiny-llava-v3"), (".parameters.data_dir", "…/data"),
        (".parameters.diffusion", "…/tiny-sd-v3"), (".parameters.out", "…/out")]
    assert (out / "manifest.json").read_text() == text
