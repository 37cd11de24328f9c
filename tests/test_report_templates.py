"""The report's Jinja2 templates: shipped as package data, autoescaped and strict, so text from a folder
(class names, captions, prompts, paths, evaluation files) can never become markup on the page."""
from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote

import pytest
from jinja2 import PackageLoader, StrictUndefined, UndefinedError

from tests.test_report import build_page, evaluation, make_folder
from vlcp.report import html as report
from vlcp.report.classes import highlight

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=1>'
SCRIPT_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
IMG_ESCAPED = "&quot;&gt;&lt;img src=x onerror=1&gt;"
TEMPLATES = files("vlcp.report") / "templates"


def hostile_folder(root: Path) -> Path:
    """Every text the page shows from the folder carries markup: class folder and name, dataset, caption,
    prompt, source member, R_w and N words, warnings, models, parameters, scores, evaluation fields."""
    folder = make_folder(root, classes=((IMG, SCRIPT), ("n02102040", IMG)), ipc=1, data=SCRIPT, extra={
        "warnings": [SCRIPT], "skipped_images": [{"source": IMG, "error": SCRIPT}],
        "models": {SCRIPT: {"name": IMG, "identity": SCRIPT, "revision": IMG}},
        "post_sampling": {"method": SCRIPT, "images": {f"{IMG}/0000.png": {SCRIPT: IMG}}}})
    m = json.loads((folder / "manifest.json").read_text())
    m["parameters"][IMG] = SCRIPT
    (folder / "manifest.json").write_text(json.dumps(m))
    protos = json.loads((folder / "prototypes.json").read_text())
    protos["classes"][IMG]["clusters"][0].update(
        caption=f"{SCRIPT} grey {IMG} o'clock", prompt=f"{IMG} {SCRIPT}", member=SCRIPT,
        representative_words={SCRIPT: 3, "grey": 2}, non_representative=[IMG])
    (folder / "prototypes.json").write_text(json.dumps(protos))
    (folder / "evaluations").mkdir()
    res = evaluation(model=SCRIPT, protocol=IMG, ipc=1)
    res["caption_fusion"] = {"label": SCRIPT, "note": IMG, "accuracy": {"mean": 1.0}}
    (folder / "evaluations" / "e.json").write_text(json.dumps(res))
    return folder


def test_markup_in_names_captions_and_prompts_is_escaped(tmp_path):
    text, page = build_page(hostile_folder(tmp_path / "out"))
    assert SCRIPT not in text and IMG not in text and "<script" not in text.lower() and "<img src=x" not in text
    assert text.count(SCRIPT_ESCAPED) >= 15 and text.count(IMG_ESCAPED) >= 10
    assert f"<title>vlcp report: {SCRIPT_ESCAPED} IPC 1</title>" in text
    assert f'<p class="prompt"><span class="lbl">prompt</span> {IMG_ESCAPED} {SCRIPT_ESCAPED}</p>' in text
    assert f'<dl class="scores"><dt>{SCRIPT_ESCAPED}</dt><dd>{IMG_ESCAPED}</dd></dl>' in text
    assert f'<h3>{IMG_ESCAPED} <small>{SCRIPT_ESCAPED}</small></h3>' in text
    assert f'<mark class="rw">grey</mark> {IMG_ESCAPED} o&#x27;clock' in text  # html.escape's entities
    # the parsed page has only its own elements, and every hostile text reads back unchanged
    assert page.find("script") == [] and [a["class"] for a in page.find("img")] == ["syn pixelated"] * 2
    assert [a["data-folder"] for a in page.find("article", "class")] == [IMG, "n02102040"]
    img = page.find("img", "syn")[0]
    assert img["src"] == quote(f"train/{IMG}/0000.png") == "train/%22%3E%3Cimg%20src%3Dx%20onerror%3D1%3E/0000.png"
    assert img["alt"] == f"{SCRIPT}, image 0" and page.find("a")[0]["href"] == "#class-0"
    assert page.texts["p.caption"][:3] == [SCRIPT + " ", "grey", f" {IMG} o'clock"]
    # markup is not a word: in the first caption only "grey" is marked (the second class has the usual caption)
    assert page.texts["mark.rw"] == ["grey", "grey", "grass", "grey"] and page.texts["mark.nw"] == ["fish", "scales"]
    assert page.texts["span.nlist"][0] == IMG and page.texts["span.chip"][:2] == [SCRIPT + " ", "3"]
    assert page.text("ul.warn") == f"{SCRIPT}{IMG}: {SCRIPT}"
    assert f"<td>{SCRIPT_ESCAPED}</td><td>{IMG_ESCAPED}</td><td>1</td>" in text  # the evaluation row
    assert f"<b>1.00</b> — {IMG_ESCAPED} <span class=\"src\">{SCRIPT_ESCAPED}; e.json</span>" in text


def test_the_templates_are_package_data_and_strict():
    assert (TEMPLATES / "report.html.j2").is_file() and (TEMPLATES / "report.css").is_file()
    assert all((TEMPLATES / template).is_file() for _, template, _ in report.SECTIONS)
    env = report.environment()
    assert isinstance(env.loader, PackageLoader) and env.autoescape is True and env.undefined is StrictUndefined
    with pytest.raises(UndefinedError, match="has no attribute 'classes'"):  # a missing field fails loudly
        env.get_template("classes.html.j2").render(data=object())


def test_no_template_turns_autoescape_off_or_marks_text_safe():
    for t in TEMPLATES.iterdir():
        squeezed = t.read_text(encoding="utf-8").replace(" ", "")
        assert "|safe" not in squeezed and "autoescapefalse" not in squeezed and "Markup" not in squeezed, t.name
    sources = "".join(p.read_text() for p in Path(report.__file__).parent.glob("*.py"))
    assert sources.count("Markup(") == 1  # html._escape: html.escape's output, never raw text


def test_the_css_is_inlined_verbatim(tmp_path):
    text, page = build_page(make_folder(tmp_path / "out"))
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    assert f"<style>\n{css}</style>" in text and page.find("link") == [{"rel": "icon", "href": "data:,"}]


def test_a_section_that_cannot_be_built_says_so_and_the_rest_stays(tmp_path, monkeypatch):
    def boom(f):
        raise ValueError("odd <data>")

    monkeypatch.setattr(report, "SECTIONS", [s if s[0] != "evaluation" else ("evaluation", s[1], boom)
                                             for s in report.SECTIONS])
    text, page = build_page(make_folder(tmp_path / "out"))
    assert page.text("section.problem") == ("The evaluation section could not be drawn from this folder "
                                            "(ValueError: odd <data>).")
    assert [a.get("id") for a in page.find("section")] == ["run", None, "classes"]


def test_the_caption_is_split_into_marked_and_plain_segments():
    assert highlight("Grey fish, on grass!", {"grey": 1, "grass": 2}, ["fish"]) == [
        ("", ""), ("Grey", "rw"), (" ", ""), ("fish", "nw"), (", on ", ""), ("grass", "rw"), ("!", "")]
    assert highlight("no marks", {}, []) == [("no marks", "")]
