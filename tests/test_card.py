"""OUT/README.md, the Hugging Face dataset card (vlcp/report/card.py), and `vlcp publish` up to the network.

One tiny distillation for the module; the card is read back with huggingface_hub's own DatasetCard and the folder
loaded with datasets' own loader (the card's `configs`). `RepoCard.validate` posts to the Hub, so it is not called;
the upload is run with HF_HUB_OFFLINE=1, where the real huggingface_hub refuses before any request."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard

from tests.conftest import cli_in
from vlcp.cli.publish import IGNORE_PATTERNS, upload_files
from vlcp.report import card
from vlcp.store.output import images_dir

pytestmark = pytest.mark.e2e
HOSTILE = "evil\n---\nlicense: mit\n<script>alert(1)</script> {{ x }} | [a](b)"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models_dir):
    """(cli runner, cache dir, OUT) of one tiny distillation, fine-tuning included."""
    base = tmp_path_factory.mktemp("card")
    vlcp = cli_in(base, tiny_models_dir)
    r = vlcp("distill", "--data", "digits", "--tiny", "--classes", "0,1,2", "--max-per-class", "6", "--ipc", "2",
             "--out", base / "out")
    assert r.exit_code == 0, r.output
    return vlcp, base / "cache", base / "out"


def copy(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest)
    return dest


def test_distill_writes_a_card_huggingface_hub_reads(run):
    _, _, out = run
    path = out / "README.md"
    c = DatasetCard.load(path)
    assert str(out.parent) not in path.read_text() and "| out | \"…/out\" |" in path.read_text()  # no local folders
    d = c.data.to_dict()
    assert d["license"] == "cc-by-4.0" and d["task_categories"] == ["image-classification"]
    assert d["tags"][:3] == ["dataset-distillation", "synthetic", "vlcp"] and "tiny-random-models" in d["tags"]
    assert d["size_categories"] == ["n<1K"] and d["source_datasets"] == ["extended|digits"]
    assert d["pretty_name"] == "digits distilled by vlcp (VLCP, IPC 2)"
    root = images_dir(out)
    want = f"{root.name}/**" if root != out else ["0/**", "1/**", "2/**"]
    assert d["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": want}]}]
    m = json.loads((out / "manifest.json").read_text())
    text = c.text
    assert card.MARKER in text and "6 synthetic images, 2 per class for 3 classes of **digits**" in text
    for k, v in m["parameters"].items():  # every parameter, one row each
        assert f"| {card.md(k)} | {card.md(json.dumps(card.public(v), ensure_ascii=False))} |" in text  # paths: …/name
    for role, ref in m["models"].items():
        assert f"| {role} | {card.md(card.public(ref['name']))} | {card.md(ref['identity'])} | – |" in text
    assert "@inproceedings{zou2025vlcp" in text and "Fine-tuning: full," in text
    assert "## Evaluation" not in text  # none yet
    for folder, name, n in card.class_rows(out, m):
        assert n == 2 and f"| {folder} | {name} | 2 | " in text


def test_the_folder_loads_with_datasets_through_the_card(run, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, _, out = run
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    assert list(ds) == ["train"] and ds["train"].num_rows == 6
    assert sorted(set(ds["train"]["label"])) == [0, 1, 2]


def test_md_escapes_markup_and_keeps_one_line():
    assert card.md(HOSTILE) == ("evil --- license: mit &lt;script&gt;alert(1)&lt;/script&gt; \\{\\{ x \\}\\} \\| "
                                "\\[a\\](b)")
    assert card.md(["a_b", 1]) == '\\["a\\_b", 1\\]'
    assert [card.size_category(n) for n in (0, 999, 1000, 54_321, 2_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


def test_hostile_names_inject_neither_yaml_nor_markup(run, tmp_path):
    _, _, out = run
    out = copy(out, tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    m["parameters"]["data"] = m["dataset"]["name"] = HOSTILE
    m["classes"][0]["name"] = HOSTILE
    (out / "manifest.json").write_text(json.dumps(m))
    protos = json.loads((out / "prototypes.json").read_text())
    folder = m["classes"][0]["folder"]
    protos["classes"][folder]["clusters"][0]["prompt"] = HOSTILE
    (out / "prototypes.json").write_text(json.dumps(protos))
    path = card.build(out)
    c = DatasetCard.load(path)
    assert set(c.data.to_dict()) == {"license", "pretty_name", "task_categories", "tags", "size_categories",
                                     "source_datasets", "configs"}
    assert c.data.license == "other" and c.data.source_datasets == ["extended"]  # a name vlcp does not know
    assert c.data.pretty_name == ("evil --- license: mit <script>alert(1)</script> {{ x }} | [a](b) distilled "
                                  "by vlcp (VLCP, IPC 2)")
    text = path.read_text()
    body = text.split("\n---\n", 1)[1]
    assert "<script>" not in body and "\n---\n" not in body and "{{" not in body
    esc = card.md(HOSTILE)
    assert re.search(rf"^\| {folder} \| {re.escape(esc)} \| 2 \| {re.escape(esc)} · ", body, re.M)
    assert f"# {esc} distilled by vlcp (IPC 2)" in body


def test_evaluate_refreshes_the_card_and_spares_an_edited_one(run, tmp_path):
    vlcp, _, out = run
    out = copy(out, tmp_path / "out")
    r = vlcp("evaluate", out, "--data", "digits", "--seeds", "1", "--epochs", "1")
    assert r.exit_code == 0, r.output
    (res_file,) = (out / "evaluations").glob("*.json")
    res = json.loads(res_file.read_text())
    acc = res["accuracy"]
    row = f"| dc | convnet3 | 1 | {acc['mean']:.2f} ± {acc['std']:.2f} | 1 | {card.md(res_file.name)} |"
    text = (out / "README.md").read_text()
    assert "## Evaluation" in text and row in text
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # atomic: no temporary file left
    (out / "README.md").write_text("my own card\n")
    assert card.refresh(out) is None and (out / "README.md").read_text() == "my own card\n"


def test_refresh_leaves_folders_vlcp_distill_did_not_write(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"vlcp_version": "0.1.0", "baseline": "random", "ipc": 1}))
    assert card.refresh(tmp_path) is None and not (tmp_path / "README.md").exists()


def test_upload_selection_leaves_out_ranks_and_hidden_files(run, tmp_path):
    _, _, out = run
    out = copy(out, tmp_path / "out")
    (out / "ranks").mkdir()
    (out / "ranks" / "1.json").write_text("{}")
    (out / ".tmp-x.json").write_text("{}")
    (out / "evaluations").mkdir()
    (out / "evaluations" / ".swap").write_text("")
    (out / "evaluations" / "dc.json").write_text("{}")
    every = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    sent = upload_files(out)
    assert sorted(set(every) - set(sent)) == [".tmp-x.json", "evaluations/.swap", "ranks/1.json"]
    assert {"README.md", "manifest.json", "evaluations/dc.json", "report.html"} <= set(sent)
    assert IGNORE_PATTERNS == ["ranks/*", ".*", "*/.*"]


def test_publish_reports_the_offline_hub_and_leaves_out_as_it_was(run, tmp_path):
    _, cache, out = run
    out = copy(out, tmp_path / "out")
    (out / "README.md").unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_token"}
    r = subprocess.run([sys.executable, "-m", "vlcp", "--cache-dir", str(cache), "publish", str(out), "someone/digits"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Error: upload to someone/digits failed: OfflineModeIsEnabled" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "README.md").exists()  # the card for a repository that got nothing is not written


def test_publish_sends_the_card_it_built_and_writes_it_after_the_upload(run, tmp_path, monkeypatch):
    """The Hub is out of reach here: its two calls are recorded at huggingface_hub's API boundary."""
    import huggingface_hub

    vlcp, _, out = run
    out = copy(out, tmp_path / "out")
    (out / "README.md").write_text(card.MARKER + "\nan old card for another repository\n")
    sent = {}

    def create_commit(self, repo_id, operations, **kw):
        assert not (out / "README.md").read_text().count("someone/digits")  # not written before the upload
        sent.update({op.path_in_repo: op.path_or_fileobj for op in operations})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: f"https://huggingface.co/datasets/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    r = vlcp("publish", out, "someone/digits")
    assert r.exit_code == 0, r.output
    text = (out / "README.md").read_text()
    assert 'load_dataset("someone/digits")' in text and sent["README.md"] == text.encode()
    assert r.output.splitlines()[-2:] == [f"card: {out / 'README.md'}",
                                          f"uploaded {len(sent)} files to https://huggingface.co/datasets/someone/"
                                          f"digits (local paths hidden in "
                                          f"{sum(isinstance(v, bytes) for v in sent.values()) - 1} JSON files)"]


def test_publish_refuses_a_bad_repo_id_or_folder(run, tmp_path):
    vlcp, _, out = run
    out = copy(out, tmp_path / "out")
    (out / "README.md").unlink()
    r = vlcp("publish", out, "someone/bad--name")
    assert r.exit_code == 2 and "REPO_ID 'someone/bad--name' is not a Hugging Face repository id" in r.output
    assert not (out / "README.md").exists()
    r = vlcp("publish", tmp_path, "someone/name")
    assert r.exit_code == 2 and "has no readable manifest.json" in r.output
