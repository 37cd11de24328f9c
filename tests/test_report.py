"""`vlcp report` / vlcp.report.html.build: exact content on hand-made folders, escaping, broken inputs,
no torch, speed, and the page as a person sees it in headless Chromium."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.cdp import Browser, find_chromium
from vlcp.cli.main import cli
from vlcp.report import html as report
from vlcp.report.folder import image_size

NASTY = '<script>alert("x")</script> & \'quotes\''


def png(path: Path, w: int = 8, h: int = 8, shade: int = 128) -> None:
    """A valid grey RGB PNG written by hand (no PIL needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + bytes([shade, shade // 2, 255 - shade]) * w for _ in range(h))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def cluster(j: int, caption: str = "a grey fish on green grass, grey scales") -> dict:
    return {"caption": caption, "member": f"train/img{j}.png", "score": 3.0 + j, "fallback": False,
            "representative_words": {"grass": 5, "grey": 7}, "non_representative": ["fish", "scales"],
            "cluster_size": 10 + j, "prompt": caption}


def make_folder(root: Path, classes=(("n01440764", "tench"), ("n02102040", "springer")), ipc: int = 2,
                data: str = "imagenette", extra: dict | None = None, size: int = 8) -> Path:
    """A distillation folder as vlcp writes it: manifest.json, prototypes.json, train/<class>/<index>.png (without
    train/metadata.jsonl: the report then reads each image's cluster from prototypes.json)."""
    manifest = {
        "vlcp_version": "0.2.0", "tiny": False,
        "parameters": {"data": data, "ipc": ipc, "text_strategy": "dcs", "beta": 0.7},
        "dataset": {"name": data, "images": 100, "source": "hand-made"},
        "classes": [{"folder": f, "name": n} for f, n in classes],
        "models": {"diffusion": {"name": "sd15", "identity": "sd15@abc123", "revision": "abc123"}},
        "stages": {"captions": {"cached": True, "items_computed": 0, "items_cached": 100, "model_loaded": False,
                                "seconds": 0.5},
                   "synthesis": {"cached": False, "items_computed": 4, "items_cached": 0, "model_loaded": True,
                                 "seconds": 12.25}},
        "warnings": ["class n02102040 kept 1 outlier"], "skipped_images": [{"source": "bad.jpg", "error": "truncated"}],
        "images_per_class": {f: 50 for f, _ in classes}, "seconds": 13.0, **(extra or {})}
    protos = {"beta": 0.7, "top_k": 30, "classes": {f: {"name": n, "clusters": [cluster(j) for j in range(ipc)]}
                                                    for f, n in classes}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "prototypes.json").write_text(json.dumps(protos))
    for c, (f, _) in enumerate(classes):
        for j in range(ipc):
            png(root / "train" / f / f"{j:04d}.png", size, size, shade=(40 * (c + 1) + 20 * j) % 256)
    return root


def evaluation(model="resnetap10", protocol="minimax", ipc=2, per_seed=(60.0, 62.0)) -> dict:
    """The shape `vlcp evaluate --json` writes (vlcp/evaluation/evaluate.py:run)."""
    mean = sum(per_seed) / len(per_seed)
    return {"dataset": {"name": "imagenette"}, "images_per_class": {"n01440764": ipc, "n02102040": ipc},
            "protocol": {"name": protocol, "model": model, "epochs": 2000},
            "best_label": "best-during-training",
            "accuracy": {"mean": mean, "std": 1.0, "per_seed": list(per_seed),
                         "best_during_training": {"mean": mean + 2, "std": 0.5, "per_seed": [p + 2 for p in per_seed]}},
            "seeds": [{"seed": i} for i in range(len(per_seed))], "seconds": 99.0, "device": "cuda"}


class Page(HTMLParser):
    """Tags, classes and text of the written page, for exact assertions."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[tuple[str, dict]] = []
        self.texts: dict[str, list[str]] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag not in ("img", "br", "meta", "link", "rect", "polyline"):
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for tag, a in self.stack:
            self.texts.setdefault(tag, []).append(data)
            for cls in (a.get("class") or "").split():
                self.texts.setdefault(f"{tag}.{cls}", []).append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split())]

    def text(self, key: str) -> str:
        return "".join(self.texts.get(key, []))


def parameters(text: str) -> dict[str, str]:
    """The "All parameters" table: name -> the JSON text shown."""
    return {html.unescape(k): html.unescape(v) for k, v in
            re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", text.split('<table class="params">', 1)[1])}


def build_page(folder: Path) -> tuple[str, Page]:
    path = report.build(folder)
    assert path == folder.resolve() / "report.html"
    text = path.read_text(encoding="utf-8")
    return text, Page(text)


# exact content -------------------------------------------------------------------------------------
def test_classes_images_prototypes_and_header(tmp_path):
    folder = make_folder(tmp_path / "out", ipc=3)
    text, page = build_page(folder)
    assert [a["data-folder"] for a in page.find("article", "class")] == ["n01440764", "n02102040"]
    imgs = [a["src"] for a in page.find("img", "syn")]
    assert imgs == [f"train/{f}/{j:04d}.png" for f in ("n01440764", "n02102040") for j in range(3)]
    assert all((folder / s).is_file() for s in imgs)  # relative: the page moves with the folder
    assert page.find("img", "syn")[0]["width"] == "8" and "pixelated" in page.find("img", "syn")[0]["class"]
    # R_w highlighted in the caption (grey x2, grass x1 per caption), N dimmed, frequencies listed
    assert page.texts["mark.rw"].count("grey") == 12 and page.texts["mark.rw"].count("grass") == 6
    assert page.texts["mark.nw"].count("fish") == 6 and page.texts["mark.nw"].count("scales") == 6
    assert page.text("span.chip").startswith("grey 7grass 5")  # most frequent first
    assert page.texts["span.nlist"] == ["fish, scales"] * 6
    heads = page.texts["p.head"]
    assert "".join(heads[:2]) == "0000.png · cluster of 10 images"
    assert "score 5.00 · from train/img2.png" in page.texts["p.meta"]
    assert "sd15@abc123" in text and "abc123" in text  # model identity and revision
    assert "12.25" in text and page.text("span.cached") == "cached" and page.text("span.computed") == "computed"
    assert page.text("ul.warn") == "class n02102040 kept 1 outlierbad.jpg: truncated"
    assert "<script" not in text.lower() and "http" not in text.replace("http-equiv", "")


def test_refinement_verdicts_loss_curve_and_post_sampling(tmp_path):
    extra = {"refinement": {"beta": 0.9, "candidates": 2, "top_k": 2,
                            "detector": {"model": "resnet18", "accuracy": 91.5, "epochs": 300},
                            "replacements": {"1": {"candidate": 1, "how": "valid", "pool": [0, 1], "p_before": 0.2,
                                                   "p_after": 0.95, "class": "n01440764", "cluster": 1}},
                            "per_class": {"n01440764": {"images": 2, "defective": 1, "valid": 1, "fallback": 0,
                                                        "confidence_before": 0.5, "confidence_after": 0.9}}},
             "finetune": {"steps": 4, "first_loss": 0.5, "last_loss": 0.2},
             "post_sampling": {"method": "clip", "kept": 3,
                               "images": {"n02102040/0001.png": {"clip_score": 0.3125, "kept": True}}}}
    folder = make_folder(tmp_path / "out", extra=extra)
    (folder / "finetune_loss.csv").write_text("step,loss\n0,0.5\n1,0.4\n2,0.3\n3,0.2\n")
    png(folder / "preview_refined.png", 30, 10)
    text, page = build_page(folder)
    verdicts = page.texts["p.verdict"]
    assert verdicts == ["refinement: kept", "refinement: replaced by candidate 1 (from a valid pool of 2); "
                        "p(class) 0.200 → 0.950", "refinement: kept", "refinement: kept"]
    assert 'src="preview_refined.png"' in text and "91.50" in text
    svg_line = page.find("polyline", "raw")[0]["points"].split()
    assert len(svg_line) == 4 and svg_line[0] == "64.0,12.0" and svg_line[-1].endswith(",224.0")
    assert "4 steps, from finetune_loss.csv" in text
    assert page.text("dl.scores") == "clip_score0.312keptTrue"  # only on n02102040/0001.png
    assert "<dt>method</dt><dd>clip</dd>" in text  # run-level values of the section


def test_refinement_after_sas_shows_the_pool_replacements_apart(tmp_path):
    """SAS + --refine: a slot replaced by the next-ranked pool candidate says so; one whose prototype's
    pool was used up and was then replaced by a generated candidate shows the generated verdict."""
    extra = {"refinement": {
        "beta": 0.9, "candidates": 2, "top_k": 2, "detector": {"model": "resnet18"},
        "replacements": {"3": {"candidate": 0, "how": "fallback", "pool": [], "p_before": 0.1, "p_after": 0.4,
                               "class": "n02102040", "cluster": 1, "source": "generated"}},
        "pool_replacements": {"0": {"source": "pool", "was": 0, "candidate": 7, "rank": 3, "visited": [5, 7],
                                    "class": "n01440764", "cluster": 0},
                              "3": {"source": "pool", "was": 9, "candidate": None, "rank": None, "visited": [11],
                                    "class": "n02102040", "cluster": 1}},
        "per_class": {"n01440764": {"images": 2, "defective_before_pool": 1, "pool_replaced": 1, "defective": 0,
                                    "valid": 0, "fallback": 0, "confidence_before": 0.5, "confidence_after": 0.9},
                      "n02102040": {"images": 2, "defective_before_pool": 1, "pool_replaced": 0, "defective": 1,
                                    "valid": 0, "fallback": 1, "confidence_before": 0.3, "confidence_after": 0.5}}}}
    text, page = build_page(make_folder(tmp_path / "out", extra=extra))
    assert page.texts["p.verdict"] == [
        "refinement: replaced by SAS pool candidate 7 (rank 3 of its class, the next-ranked of its prototype)",
        "refinement: kept", "refinement: kept",
        "refinement: replaced by candidate 0 (as fallback: no candidate was valid); p(class) 0.100 → 0.400"]
    assert "<dt>replaced from the SAS pool first</dt><dd>1</dd>" in text
    assert "<th>defective after SAS</th><th>from the SAS pool</th>" in text


def test_evaluations_next_to_published_numbers(tmp_path):
    folder = make_folder(tmp_path / "out", ipc=10)
    (folder / "evaluations").mkdir()
    (folder / "evaluations" / "minimax-resnetap10-abc.json").write_text(json.dumps(evaluation(ipc=10)))
    (folder / "evaluations" / "minimax-convnet6-def.json").write_text(
        json.dumps(evaluation("convnet6", ipc=10, per_seed=(50.0, 54.0))))
    text, page = build_page(folder)
    table = text[text.index('<section id="evaluation">'):text.index("</section>", text.index('id="evaluation"'))]
    rows = [r for r in table.split("<tr>")[2:] if "vlcp/published.json" not in r]
    assert rows[0].startswith("<td>convnet6</td><td>minimax</td><td>10</td><td>2000</td><td>2</td>"
                              "<td><b>52.00 ± 1.00</b></td><td>54.00 ± 0.50")
    assert "<td>50.00 54.00</td><td>–</td>" in rows[0]  # the paper has no ConvNet-6 row for ImageNette
    assert "<td>60.00 62.00</td><td>64.80 ± 3.60 <span class=\"src\">VLCP (ICCV 2025) Table 2</span>" in rows[1]
    # the paper's row for ImageNette IPC 10 (Table 2), this folder's figure in its own column
    assert ("<td>resnetap10</td><td>minimax</td><td><b>61.00 ± 1.00</b></td><td>54.20 ± 1.60</td><td>59.10 ± 0.70"
            "</td><td>60.80 ± 0.60</td><td>57.70 ± 1.20</td><td>60.90 ± 1.70</td><td>64.80 ± 3.60</td>") in text
    assert "Published for imagenette, IPC 10" in text


def test_published_numbers_name_their_source():
    data = json.loads((Path(report.__file__).with_name("published.json")).read_text())
    entries = data["entries"]
    assert len(entries) == 229 and all(e["source"].startswith("VLCP (ICCV 2025) Table ") for e in entries)
    ours = {(e["dataset"], e["ipc"], e["model"]): (e["mean"], e["std"]) for e in entries if e["method"] == "VLCP"}
    # spot checks against the paper's tables, one per table
    assert ours[("imagewoof", 10, "resnet18")] == (39.9, 2.6) and ours[("imagenette", 50, "resnetap10")] == (81.2, 0.8)
    assert ours[("imagenet", 50, "resnet18-bn")] == (60.5, 0.2)
    assert ours[("cifar100", 10, "resnet18-modified")] == (50.6, 0.7)
    gg = [e for e in entries if e.get("text_strategy") == "llm" and e["dataset"] == "imageidc" and e["ipc"] == 50]
    assert [(e["mean"], e["std"]) for e in gg] == [(72.1, 0.4)]



def test_a_folder_vlcp_select_wrote_shows_each_kept_images_scores(tmp_path):
    folder = tmp_path / "sel"
    for f in ("0", "1"):
        png(folder / "train" / f / "0000.png")
    png(folder / "preview_pool.png", 20, 10)
    cand = [{"index": 0, "class": "0", "relevance": 0.25, "stage1": "kept", "rank": 1, "why": "pick 1: best",
             "kept": True, "output": ["0/0000.png"], "prototype": None},
            {"index": 1, "class": "0", "relevance": 0.1, "stage1": "negative margin", "rank": None, "kept": False,
             "output": []}]
    (folder / "manifest.json").write_text(json.dumps({
        "vlcp_version": "0.2.0", "command": "select", "method": "SAS (vlcp's formulation)", "data": "digits", "ipc": 1,
        "classes": {"0": {"name": "digit 0"}, "1": {"name": "digit 1"}}, "candidates": cand}))
    text, page = build_page(folder)
    assert [a["data-folder"] for a in page.find("article", "class")] == ["0", "1"]
    assert page.texts["dl.scores"] == ["relevance", "0.250", "stage1", "kept", "rank", "1", "why", "pick 1: best",
                                    "kept", "True"]
    assert "vlcp report: digits IPC 1" in text and 'src="preview_pool.png"' in text
    assert "<dt>candidates</dt><dd>2</dd>" in text


def test_loss_png_when_no_csv_and_class_folders_stay_inside_the_folder(tmp_path):
    folder = make_folder(tmp_path / "out", classes=(("n01440764", "tench"),), ipc=1,
                         extra={"finetune": {"steps": 180, "last_loss": 0.12}})
    png(tmp_path / "outside" / "0000.png")
    m = json.loads((folder / "manifest.json").read_text())
    m["classes"] += [{"folder": "../outside", "name": "up"}, {"folder": str(tmp_path / "outside"), "name": "abs"}]
    (folder / "manifest.json").write_text(json.dumps(m))
    png(folder / "finetune_loss.png", 60, 35)  # matplotlib installed: vlcp wrote the plot, not the CSV
    text, page = build_page(folder)
    assert 'src="finetune_loss.png"' in text and "<dt>last_loss</dt><dd>0.1200</dd>" in text
    assert [a["src"] for a in page.find("img", "syn")] == ["train/n01440764/0000.png"]
    assert page.text("p.problem") == f"No images in ../outside/.No images in {tmp_path / 'outside'}/."

# escaping and broken inputs ------------------------------------------------------------------------
def test_class_name_folder_and_caption_are_escaped(tmp_path):
    folder = make_folder(tmp_path / "out", classes=(("a'b\"c", NASTY),), ipc=1)
    protos = json.loads((folder / "prototypes.json").read_text())
    protos["classes"]["a'b\"c"]["clusters"][0]["caption"] = NASTY + " grey"
    (folder / "prototypes.json").write_text(json.dumps(protos))
    text, page = build_page(folder)
    assert "<script" not in text.lower() and "alert(&quot;x&quot;)" in text
    assert page.find("article", "class")[0]["data-folder"] == "a'b\"c"  # attribute quoting held
    img = page.find("img", "syn")[0]
    assert img["src"] == "train/a%27b%22c/0000.png" and img["alt"] == NASTY + ", image 0"
    assert page.text("p.caption") == NASTY + " grey" and page.texts["mark.rw"] == ["grey"]
    assert (folder / "train" / "a'b\"c" / "0000.png").is_file()


def test_local_paths_show_as_the_card_shows_them_and_nothing_else_changes(tmp_path):
    """Every field that can hold a local path (dataset folder, models, OUT, sources, detector, fine-tuning, the
    SAS pool, a prototype's member) shows ``…/<name>``; model ids, URLs, class names with / stay; escaped."""
    home = Path.home()
    data = tmp_path / "my data" / "pets <img src=x onerror=alert(1)>"
    extra = {"parameters": {"data": str(data), "ipc": 2, "text_strategy": "dcs", "out": str(tmp_path / "out"),
                            "captions_from": [str(tmp_path / "caps.jsonl"), "~/caps2.jsonl"],
                            "clip": "openai/clip-vit-base-patch32", "url": "https://example.org/a/b.tgz"},
             "dataset": {"name": str(data), "root": str(data), "images": 4},
             "models": {"diffusion": {"name": str(home / ".cache" / "vlcp" / "sd15"), "identity": "local:abc"},
                        "clip": {"name": "openai/clip-vit-base-patch32", "identity": "openai/clip-vit-base-patch32@c1",
                                 "revision": "c1"}},
             "skipped_images": [{"source": str(data / "cat" / "bad.jpg"), "error": "bad.jpg: truncated"}],
             "refinement": {"detector": {"model": "resnet18", "source": "C:\\Users\\me\\det.pt"},
                            "replacements": {}, "per_class": {}},
             "post_sampling": {"method": "sas", "pool": str(tmp_path / "pool")},
             "finetune": {"base": str(home / "models" / "sd15-base"), "steps": 3}}
    folder = make_folder(tmp_path / "out", classes=(("acdc", "AC/DC"), ("n02102040", "springer")), extra=extra)
    protos = json.loads((folder / "prototypes.json").read_text())
    protos["classes"]["acdc"]["clusters"][0]["member"] = str(data / "acdc" / "7.png")
    (folder / "prototypes.json").write_text(json.dumps(protos))
    text, page = build_page(folder)
    for local in (str(tmp_path), f"{home}/", "C:", "~/"):
        assert local not in text
    name = "…/pets <img src=x onerror=alert(1)>"
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text  # still escaped
    assert page.text("title") == f"vlcp report: {name} IPC 2"
    run = dict(zip(page.texts["dt"], page.texts["dd"]))
    assert run["dataset"] == run["source"] == name and run["detector source"] == "…/det.pt"
    assert run["pool"] == "…/pool" and run["base"] == "…/sd15-base" and run["detector"] == "resnet18"
    assert "<td>diffusion</td><td>…/sd15</td><td>local:abc</td>" in text
    assert "<td>clip</td><td>openai/clip-vit-base-patch32</td><td>openai/clip-vit-base-patch32@c1</td>" in text
    assert page.text("ul.warn").endswith("…/bad.jpg: bad.jpg: truncated")
    assert "score 3.00 · from …/7.png" in page.texts["p.meta"]
    assert page.text("h3").count("AC/DC") == 1
    assert f"--data {name} --json" in html.unescape(text)  # the "no evaluation yet" hint
    assert parameters(text) == {
        "data": f'"{name}"', "ipc": "2", "text_strategy": '"dcs"', "out": '"…/out"',
        "captions_from": '["…/caps.jsonl", "…/caps2.jsonl"]', "clip": '"openai/clip-vit-base-patch32"',
        "url": '"https://example.org/a/b.tgz"'}


@pytest.mark.parametrize("content, message", [
    (None, "has no manifest.json: not a folder written by vlcp distill"),
    ("{not json", "manifest.json is unreadable (JSONDecodeError"),
    ("[1, 2]", "manifest.json is not a JSON object"),
])
def test_missing_or_malformed_manifest_is_a_one_line_error(tmp_path, content, message):
    folder = tmp_path / "out"
    png(folder / "0" / "0000.png")
    if content is not None:
        (folder / "manifest.json").write_text(content)
    with pytest.raises(report.ReportError, match=message.split(" (")[0]):
        report.build(folder)
    res = CliRunner().invoke(cli, ["report", str(folder)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and message in res.output
    assert res.output.startswith("Error: ") and not (folder / "report.html").exists()


def test_partial_and_malformed_files_show_what_exists(tmp_path):
    folder = make_folder(tmp_path / "out", ipc=2)
    (folder / "prototypes.json").write_text('{"classes": {"n01440764": {"clus')  # killed mid-write
    (folder / "finetune_loss.csv").write_text("step,loss\n0,abc\n")
    (folder / "evaluations").mkdir()
    (folder / "evaluations" / "bad.json").write_text("{")
    (folder / "evaluations" / "old.json").write_text(json.dumps({"protocol": "dc"}))  # an older, odd shape
    (folder / "train" / "n02102040" / "0001.png").unlink()
    m = json.loads((folder / "manifest.json").read_text())
    m.update(stages=[1, 2], warnings="not a list", refinement={"replacements": [1], "per_class": "x"}, models=None)
    (folder / "manifest.json").write_text(json.dumps(m))
    text, page = build_page(folder)
    assert page.texts["li"] == [
        "prototypes.json is unreadable (JSONDecodeError: Unterminated string starting at: line 1 column 28 (char 27))",
        "finetune_loss.csv is unreadable (ValueError: could not convert string to float: 'abc')",
        "bad.json is unreadable (JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1))", "bad.jpg: truncated"]  # the problems box, then the skipped image
    assert len(page.find("img", "syn")) == 3 and len(page.find("article", "class")) == 2
    assert "<td>?</td><td>?</td><td>–</td>" in text  # the odd evaluation still gets a row


def test_every_manifest_field_with_a_wrong_type_still_gives_a_page(tmp_path):
    """Each top-level field of a full manifest replaced by None, a number, a string, a list and a dict:
    the page is written and no section has to give up."""
    extra = {"refinement": {"replacements": {"0": {"class": "n01440764", "cluster": 0, "how": "valid"}},
                            "per_class": {"n01440764": {"images": 2}}, "detector": {"model": "m"}},
             "finetune": {"steps": 3, "losses": [0.3, 0.2, 0.1]}, "outliers": {"n01440764": {"removed": 1}},
             "post_sampling": {"images": [{"class": "n01440764", "index": 0, "score": 1.0}]}}
    folder = make_folder(tmp_path / "out", extra=extra)
    full = json.loads((folder / "manifest.json").read_text())
    for key in full:
        for odd in (None, 7, "x", [1, "a"], {"a": {"b": 1}}):
            (folder / "manifest.json").write_text(json.dumps({**full, key: odd}))
            text = report.build(folder).read_text()
            assert "could not be drawn" not in text, (key, odd)
            assert text.endswith("</html>\n")

def test_manifest_without_classes_falls_back_to_folders(tmp_path):
    folder = tmp_path / "out"
    png(folder / "x" / "0000.png")
    png(folder / "y" / "0000.png")
    (folder / "evaluations").mkdir()
    (folder / "prototypes.json").write_text("[1, 2]")  # valid JSON, wrong shape
    (folder / "manifest.json").write_text(json.dumps({"vlcp_version": "0.1.0"}))
    text, page = build_page(folder)
    assert [a["data-folder"] for a in page.find("article", "class")] == ["x", "y"]
    assert "manifest.json lists no classes: the class folders on disk are shown" in text
    assert "vlcp report: ? IPC ?" in text


def test_write_is_atomic(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "out")
    first = report.build(folder).read_text()

    def boom(f):
        raise RuntimeError("killed")

    monkeypatch.setattr(report, "render", boom)
    with pytest.raises(RuntimeError):
        report.build(folder)
    assert (folder / "report.html").read_text() == first
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "prototypes.json", "report.html", "train"]


def test_cli_report_rebuilds(tmp_path):
    folder = make_folder(tmp_path / "out")
    res = CliRunner().invoke(cli, ["report", str(folder)])
    assert res.exit_code == 0 and res.output == f"wrote {folder.resolve() / 'report.html'} and {folder / 'README.md'}\n"
    assert (folder / "report.html").stat().st_size > 1000
    assert (folder / "README.md").read_text().startswith("---\n")  # the dataset card, refreshed with the report


# speed and imports ---------------------------------------------------------------------------------
def test_500_images_under_2_seconds_without_torch(tmp_path):
    classes = [(f"n{c:08d}", f"class {c}") for c in range(10)]
    folder = make_folder(tmp_path / "out", classes=classes, ipc=50, size=32)
    (folder / "finetune_loss.csv").write_text("step,loss\n" + "".join(f"{i},{1 / (i + 1)}\n" for i in range(5000)))
    code = ("import sys, time; t = time.perf_counter(); from vlcp.report.html import build; "
            f"build({str(folder)!r}); print(time.perf_counter() - t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False", "vlcp.report.html imported torch"
    assert float(out[0]) < 2.0
    page = Page((folder / "report.html").read_text())
    assert len(page.find("img", "syn")) == 500
    assert len(page.find("polyline", "raw")[0]["points"].split()) == 715  # 5000 steps drawn as <= 800 points


# in a browser --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser, or a skip before the tiny run is made for nothing (module scope: it is asked first)."""
    return browser_or_skip()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_models_dir):
    """A real (tiny) distillation: 3 digit classes, IPC 2; its cache and OUT are absolute local paths."""
    root = tmp_path_factory.mktemp("tiny_run")
    shutil.copytree(tiny_models_dir, root / "cache" / "models")
    res = CliRunner().invoke(cli, ["-q", "--cache-dir", str(root / "cache"), "distill", "--data", "digits", "--tiny",
                                   "--classes", "0,1,2", "--max-per-class", "8", "--steps", "2", "--no-finetune",
                                   "--ipc", "2", "--out", str(root / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root / "out"


def browser_or_skip() -> str:
    exe = find_chromium()
    if exe is None:
        if os.environ.get("VLCP_REQUIRE_BROWSER"):
            pytest.fail("VLCP_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    return exe


def check_in_browser(browser: Browser, folder: Path, shot: Path) -> dict:
    s, load = browser.open((folder / "report.html").as_uri())
    assert load.console_errors == [] and load.failed_requests == [] and load.exceptions == []
    assert all(u.startswith(("file://", "data:")) for u in load.requests), load.requests
    seen = browser.evaluate(s, """({
        images: [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
        classes: document.querySelectorAll('article.class').length,
        cards: document.querySelectorAll('figure.card img.syn').length,
        scripts: document.scripts.length})""")
    assert seen["images"] and all(ok and w > 0 for _, ok, w in seen["images"]), seen["images"]
    assert seen["scripts"] == 0
    browser.screenshot(s, shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image_size(shot)[0] == 1280
    return seen


def test_a_real_report_names_no_local_folder(tiny_run):
    """The page vlcp distill wrote (and `vlcp publish` uploads as it is) shows the cache's models and OUT as the
    card does, ``…/<name>``: no absolute path of this machine, no home folder."""
    text = (tiny_run / "report.html").read_text(encoding="utf-8")
    cache = tiny_run.parent / "cache"
    for local in (str(tiny_run.parent), str(cache), f"{Path.home()}/"):
        assert local not in text
    rows = parameters(text)
    assert rows["out"] == '"…/out"'
    assert rows["captioner"] == '"…/tiny-llava-v3"' and rows["diffusion"] == '"…/tiny-sd-v3"'
    assert rows["data"] == '"digits"' and rows["data_dir"] == '"data"'  # not local paths: unchanged
    assert "<td>captioner</td><td>…/tiny-llava-v3</td>" in text  # the models table
    assert "<td>diffusion</td><td>…/tiny-sd-v3</td>" in text


def test_report_in_headless_chromium(tmp_path, chromium, tiny_run):
    exe = chromium
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    report.build(tiny_run)
    moved = tmp_path / "moved" / "run"  # the folder zipped and moved elsewhere still renders
    shutil.unpack_archive(shutil.make_archive(str(tmp_path / "run"), "zip", tiny_run), moved)
    # and a hand-made folder that has every section: refinement, loss, evaluations, post-sampling, odd names
    full = make_folder(tmp_path / "full", classes=(("n01440764", NASTY), ("n02102040", "springer")), ipc=10,
                       size=64, extra={"refinement": {"replacements": {}, "per_class": {}},
                                       "post_sampling": {"images": {"n01440764/0000.png": {"score": 0.5}}}})
    (full / "finetune_loss.csv").write_text("step,loss\n" + "".join(f"{i},{1 / (i + 1)}\n" for i in range(300)))
    png(full / "preview_refined.png", 40, 20)
    (full / "evaluations").mkdir()
    (full / "evaluations" / "e.json").write_text(json.dumps(evaluation(ipc=10)))
    report.build(full)
    with Browser(exe, tmp_path / "profile", timeout=120.0) as b:
        seen = check_in_browser(b, moved, tmp_path / "tiny_run.png")
        assert seen["classes"] == len(manifest["classes"]) == 3
        assert seen["cards"] == sum(1 for p in moved.glob("train/*/*.png")) == 6
        seen = check_in_browser(b, full, tmp_path / "full.png")
        assert seen["classes"] == 2 and seen["cards"] == 20 and len(seen["images"]) == 21  # + preview_refined
    print(f"screenshots: {tmp_path / 'tiny_run.png'} {tmp_path / 'full.png'}")


def test_without_chromium_the_browser_test_skips_or_fails_on_ci(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "find_chromium", lambda: None)
    monkeypatch.delenv("VLCP_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium on this machine"):
        browser_or_skip()
    monkeypatch.setenv("VLCP_REQUIRE_BROWSER", "1")  # .ci/run sets it where apt could install chromium
    with pytest.raises(pytest.fail.Exception, match="VLCP_REQUIRE_BROWSER is set but no chromium"):
        browser_or_skip()


def test_an_evaluation_of_a_class_subset_is_not_set_against_the_papers_numbers(tmp_path):
    """A set of 3 classes tested on those 3 (vlcp evaluate's test_split) is not the paper's 10-class setting."""
    folder = make_folder(tmp_path / "out", ipc=10)
    (folder / "evaluations").mkdir()
    res = evaluation(ipc=10)
    res["test_split"] = {"split": "test", "images": 1176, "classes": ["n01440764", "n02102040", "n02979186"],
                         "dataset_classes": 10}
    (folder / "evaluations" / "minimax-resnetap10-abc.json").write_text(json.dumps(res))
    text, _ = build_page(folder)
    table = text[text.index('<section id="evaluation">'):text.index("</section>", text.index('id="evaluation"'))]
    row = next(r for r in table.split("<tr>")[2:] if "<td>resnetap10</td>" in r and "vlcp/published.json" not in r)
    assert row.startswith("<td>resnetap10</td><td>minimax, 3 of 10 classes</td>")
    assert "64.80 ± 3.60" not in row  # no paper figure beside it
    published = text[text.index("Published for imagenette, IPC 10"):]
    assert "61.00" not in published[:published.index("</table>")]  # nor its figure in the published table's column
