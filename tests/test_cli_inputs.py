"""Inputs a user trial found unchecked or mishandled: seeds out of range, captions export of greedy or seeded
captions, ``evaluate --json`` over an existing file, an error glued to a progress bar, 16-bit images."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RANGE = "is not in the range 0<=x<=4294967295."


def _seed_commands(tmp: Path) -> dict[str, list]:
    """Every command with a seed option: its arguments up to the seed, which option, and what must not appear."""
    return {
        "distill --seed": (["distill", "--data", "digits", "--classes", "0,1", "--max-per-class", "12", "--ipc", "2",
                            "--tiny", "--out", tmp / "x"], "--seed"),
        "distill --caption-seed": (["distill", "--data", "digits", "--ipc", "2", "--tiny", "--out", tmp / "x"],
                                   "--caption-seed"),
        "relabel": (["relabel", tmp, "--teacher", "auto"], "--seed"),
        "baseline": (["baseline", "--method", "random", "--data", "digits", "--ipc", "1", "--out", tmp / "b"],
                     "--seed"),
        "select": (["select", tmp, "--data", "digits", "--ipc", "1", "--out", tmp / "s"], "--seed"),
        "captions export": (["captions", "export", "--data", "digits", "--tiny", "--out", tmp / "c.jsonl"],
                            "--caption-seed"),
    }


@pytest.mark.parametrize("command", ["distill --seed", "distill --caption-seed", "relabel", "baseline", "select",
                                     "captions export"])
@pytest.mark.parametrize("value", ["-1", "4294967296", "99999999999999999999"])
def test_a_seed_out_of_range_is_a_usage_error_naming_its_option(vlcp, tmp_path, command, value):
    args, option = _seed_commands(tmp_path)[command]
    r = vlcp(*args, option, value)
    assert r.exit_code == 2, r.output
    assert r.output.splitlines()[-1] == f"Error: Invalid value for '{option}': {value} {RANGE}"
    assert not any((tmp_path / n).exists() for n in ("x", "b", "s", "c.jsonl"))  # nothing ran


@pytest.mark.parametrize("key,value", [("seed", -1), ("caption_seed", 4294967296), ("caption-seed", -1)])
def test_a_config_file_seed_passes_the_same_range_check(vlcp, tmp_path, key, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{key}: {value}\n")
    r = vlcp("distill", "--data", "digits", "--ipc", "2", "--tiny", "--out", tmp_path / "x", "--config", cfg)
    assert r.exit_code == 2, r.output
    assert r.output.splitlines()[-1] == f"Error: Invalid value for --config: {cfg}: {key}: {value} {RANGE}"


def test_the_largest_seed_runs_k_means_and_a_baseline(vlcp, tmp_path):
    """2**32 - 1 is what sklearn's KMeans takes at most: the range lets through every seed the stages accept."""
    r = vlcp("distill", "--data", "digits", "--classes", "0,1", "--max-per-class", "6", "--ipc", "2", "--tiny",
             "--until", "clusters", "--seed", "4294967295", "--out", tmp_path / "x")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["parameters"]["seed"] == 4294967295
    r = vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "1", "--seed", "4294967295",
             "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output


def _cached_captions(cache_dir: Path, data_dir: Path, decoding) -> list[dict]:
    """The captions the cache holds under the captions key of ``decoding``, as export rows, read by key."""
    from vlcp.data.datasets import load_dataset
    from vlcp.models import captioner
    from vlcp.models.loading import resolve
    from vlcp.models.tiny import TINY_LLAVA
    from vlcp.store.cache import KEY_LAYOUT, StageCache, stage_key

    cache = StageCache(cache_dir)
    ident = resolve(str(cache_dir / "models" / TINY_LLAVA), cache).identity
    ds = load_dataset("digits", data_dir, "train", ["0"], 3)
    rows = []
    for s in ds.samples:
        key = stage_key("captions", captioner.VERSION, layout=KEY_LAYOUT,
                        params={"caption_prompt": captioner.PROMPT, "caption_max_tokens": 32}, image=s.digest,
                        class_name=ds.classes[0].name, model=ident, decoding=decoding)
        rows.append({"file_name": f"0/{Path(s.source).name}", "text": cache.get("captions", key).meta["caption"]})
    return rows


def test_captions_export_finds_greedy_and_seeded_captions(vlcp, tmp_path, cache_dir):
    from vlcp.models import captioner

    base = ["--data", "digits", "--classes", "0", "--max-per-class", "3", "--tiny"]
    for extra in (["--caption-mode", "greedy"], ["--caption-seed", "7"]):
        r = vlcp("distill", *base, "--ipc", "1", "--until", "captions", *extra, "--out", tmp_path / extra[1])
        assert r.exit_code == 0, r.output
    r = vlcp("captions", "export", *base, "--out", tmp_path / "default.jsonl")  # reference, seed 0: never made
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == ("Error: no cached captions for digits with these settings; run `vlcp "
                                         "distill --data digits ... --until captions` first")
    exported = {}
    for extra, decoding in ((["--caption-mode", "greedy"], "greedy"),
                            (["--caption-seed", "7"], captioner.decoding("reference", 7)),
                            (["--caption-mode", "reference", "--caption-seed", "7"], captioner.decoding("reference", 7))):
        out = tmp_path / f"{'-'.join(extra)}.jsonl"
        r = vlcp("captions", "export", *base, *extra, "--out", out)
        assert r.exit_code == 0, r.output
        assert r.output.strip() == f"wrote {out}: 3 captions"
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert rows == _cached_captions(cache_dir, tmp_path / "data", decoding)
        exported[decoding if decoding == "greedy" else "seed 7"] = rows
    assert exported["greedy"] != exported["seed 7"]  # two sets of captions: each export read its own


def test_captions_export_help_states_the_real_max_tokens_defaults(vlcp):
    from vlcp.pipeline.config import DistillConfig

    out = " ".join(vlcp("captions", "export", "--help").output.split())
    assert ("--caption-max-tokens INTEGER RANGE New tokens per caption. [default: 1024 with --caption-mode reference "
            "(model_vqa.py), 256 greedy; 32 with --tiny]") in out
    assert "--caption-mode [reference|greedy]" in out and "[default: reference]" in out
    assert "--caption-seed INTEGER RANGE" in out and "[default: 0; 0<=x<=4294967295]" in out
    def used(**kw) -> int:  # what the export (and distill) fill in when --caption-max-tokens is not given
        cfg = DistillConfig(data="digits", ipc=1, out=Path("o"), **kw)
        cfg.fill_defaults()
        return cfg.caption_max_tokens

    assert (used(), used(caption_mode="greedy"), used(tiny=True), used(caption_mode="greedy", tiny=True)) == (
        1024, 256, 32, 32)


def test_evaluate_json_replaces_an_existing_file_only_with_force(vlcp, tmp_path):
    (tmp_path / "empty").mkdir()
    old = tmp_path / "r.json"
    old.write_text("keep me")
    for args in ([tmp_path / "empty"], ["--full"]):  # refused before the folder is read or anything trains
        r = vlcp("evaluate", *args, "--data", "digits", "--json", old)
        assert r.exit_code == 2 and r.output.splitlines() == [f"Error: --json {old} exists; pass --force to replace it"]
    assert old.read_text() == "keep me"
    r = vlcp("evaluate", tmp_path / "empty", "--data", "digits", "--force")
    assert r.exit_code == 2 and r.output.splitlines() == ["Error: --force replaces an existing --json file: give --json"]
    assert vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "1", "--out", tmp_path / "b").exit_code == 0
    r = vlcp("evaluate", tmp_path / "b", "--data", "digits", "--seeds", "1", "--epochs", "1", "--json", old, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads(old.read_text())["train_images"] == 10


def test_a_stage_error_starts_its_own_line_after_the_progress_bar(vlcp, tmp_path):
    """The user's case: a folder of 6 images per class and --ipc 7 (wherever that is found, the message is a line
    of its own, not glued to a bar)."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "data6" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data6" / c / f"{i}.png")
    r = vlcp("distill", "--data", tmp_path / "data6", "--ipc", "7", "--tiny", "--out", tmp_path / "o")
    assert r.exit_code == 1
    error = ("Error: class 'cat' (cat) has 6 usable images, fewer than --ipc 7; lower --ipc or pass "
             "--allow-duplicates")
    assert re.search(r"(\A|[\r\n])" + re.escape(error) + r"\n", r.output), repr(r.output[-300:])
    assert "/s]Error" not in r.output


def test_an_error_inside_a_stage_clears_the_open_bar_first(vlcp, tmp_path, monkeypatch):
    """An item that fails while its stage's bar is drawn (captions here: the captioner returns empty text): the
    bar is closed (tqdm clears its line: "\r", blanks, "\r") before the message, which starts the line."""
    from vlcp.models import captioner

    monkeypatch.setattr(captioner, "caption_fitting", lambda model, processor, images, *a, **k: [""] * len(images))
    r = vlcp("distill", "--data", "digits", "--classes", "0", "--max-per-class", "2", "--ipc", "1", "--tiny",
             "--until", "captions", "--out", tmp_path / "o")
    assert r.exit_code == 1
    assert "captions:   0%|" in r.output  # the bar of the failing stage was drawn
    error = ("Error: the captioner returned empty text for digits/train/0; try another --caption-prompt or "
             "--captioner")
    assert re.search(r"\r *\r+" + re.escape(error) + r"\n", r.output), repr(r.output[-300:])
    assert error in r.output.splitlines() and "/s]Error" not in r.output


LEVELS = [0, 1, 128, 129, 257, 1000, 32767, 32768, 65534, 65535]
EXPECTED = [0, 0, 0, 1, 1, 4, 127, 128, 255, 255]  # round(v / 257)


def _grey16(mode: str) -> Image.Image:
    a = np.array([LEVELS], dtype=np.uint16)
    return Image.frombytes(mode, (len(LEVELS), 1), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_levels_scale_by_the_format_s_range(mode):
    from vlcp.data.images import to_rgb

    img = _grey16(mode)
    assert img.mode == mode
    rgb = np.asarray(to_rgb(img))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, len(LEVELS), 3)
    assert rgb[..., 0].tolist() == [EXPECTED] and (rgb == rgb[..., :1]).all()
    assert [round(v / 257) for v in LEVELS] == EXPECTED


def test_a_dark_16_bit_image_stays_dark_and_8_bit_levels_widened_come_back(tmp_path):
    from vlcp.data.images import open_rgb, to_rgb

    dark = Image.fromarray(np.full((2, 2), 1000, np.uint16))  # the image's own maximum used to make it white
    assert np.asarray(to_rgb(dark)).tolist() == [[[4, 4, 4]] * 2] * 2
    grey = Image.fromarray(np.array([[0, 32767]], np.uint16))  # mid-grey, no white in the image: stays mid-grey
    assert np.asarray(to_rgb(grey)).tolist() == [[[0, 0, 0], [127, 127, 127]]]
    k = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(k * 257).save(tmp_path / "wide.png")  # 8-bit levels stored as 16 bits (255 -> 65535)
    back = np.asarray(open_rgb(tmp_path / "wide.png"))
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    assert (back == k[..., None]).all()


def test_a_16_bit_pgm_read_as_mode_i_scales_the_same(tmp_path):
    from vlcp.data.images import open_rgb

    data = np.array(LEVELS, dtype=">u2").tobytes()
    (tmp_path / "a.pgm").write_bytes(b"P5\n%d 1\n65535\n" % len(LEVELS) + data)
    assert Image.open(tmp_path / "a.pgm").mode == "I"
    assert np.asarray(open_rgb(tmp_path / "a.pgm"))[..., 0].tolist() == [EXPECTED]
    from vlcp.data.images import to_8bit

    out_of_range = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32))
    assert to_8bit(out_of_range).tolist() == [[0, 255]]


def test_the_python_api_checks_seeds_as_the_command_line_does():
    from vlcp.pipeline.config import ConfigError, DistillConfig

    for kw, msg in (({"seed": -1}, "--seed must be in [0, 4294967295], got -1"),
                    ({"caption_seed": 2**32}, "--caption-seed must be in [0, 4294967295], got 4294967296")):
        with pytest.raises(ConfigError) as err:
            DistillConfig(data="digits", ipc=1, out="x", **kw).validate()
        assert f"{err.value.param} {err.value.message}" == msg
    DistillConfig(data="digits", ipc=1, out="x", seed=2**32 - 1, caption_seed=0).validate()


def test_clearing_the_whole_cache_needs_yes_and_a_look_creates_no_folder(vlcp, tmp_path, cache_dir):
    from vlcp.store.cache import StageCache

    StageCache(cache_dir).put("captions", "k", {"caption": "a cat"})
    r = vlcp("cache", "clear")  # no terminal to ask (CliRunner's stdin is not a tty)
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        f"Error: clearing the whole cache {cache_dir} needs --yes (or --stage STAGE for one stage)")
    assert StageCache(cache_dir).has("captions", "k")
    r = vlcp("cache", "clear", "--yes")
    assert r.exit_code == 0 and not StageCache(cache_dir).has("captions", "k")
    nowhere = tmp_path / "no" / "cache"
    r = vlcp("cache", "info", cache=nowhere)
    assert r.exit_code == 0 and "(empty)" in r.output and not nowhere.exists() and not nowhere.parent.exists()


def test_ddranking_json_over_an_existing_file_needs_force_before_any_training(vlcp, tmp_path, monkeypatch):
    from vlcp.evaluation import ddranking_scores

    monkeypatch.setattr(ddranking_scores, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    (tmp_path / "set" / "0").mkdir(parents=True)
    kept = tmp_path / "scores.json"
    kept.write_text('{"mine": 1}')
    r = vlcp("ddranking", tmp_path / "set", "--dataset", "digits", "--json", kept)
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        f"Error: --json {kept} exists; pass --force to replace it")
    r = vlcp("ddranking", tmp_path / "set", "--dataset", "digits", "--force")
    assert r.exit_code == 2 and "--force replaces an existing --json file: give --json" in r.output
    assert kept.read_text() == '{"mine": 1}'


def test_one_seed_shows_its_mean_without_a_spread():
    from vlcp.cli.evaluate import mean_std

    assert mean_std({"mean": 8.36, "std": 0.0, "per_seed": [8.36]}) == "8.36 (1 seed)"
    assert mean_std({"mean": 52.0, "std": 1.0, "per_seed": [51.0, 53.0]}) == "52.00 ± 1.00"


def test_refine_judges_a_baseline_set_and_a_dc_without_its_loops_is_a_usage_error(vlcp, tmp_path):
    base = ["baseline", "--data", "digits", "--ipc", "2"]
    assert vlcp(*base, "--method", "random", "--out", tmp_path / "b").exit_code == 0
    r = vlcp("refine", tmp_path / "b", "--data", "digits", "--detector-epochs", "1", "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output  # vlcp's own set, but no distillation to rerun: detection only
    assert json.loads((tmp_path / "r" / "report.json").read_text())["mode"] == "detection only (not a vlcp distill output)"
    r = vlcp(*base, "--method", "dc", "--iterations", "1", "--out", tmp_path / "dc")
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        "Error: DC's outer/inner loops are published for IPC 1, 10, 20, 30, 40, 50; pass --outer-loop and "
        "--inner-loop for IPC 2")
    assert not (tmp_path / "dc").exists()


def test_a_dry_run_lists_a_named_dataset_it_will_download_even_unsized():
    from vlcp.cli.needs import needs
    from vlcp.pipeline.config import DistillConfig
    from vlcp.pipeline.table import STAGE_NAMES

    line = needs(DistillConfig(data="cifar10", ipc=10, out="x"), 50000, 10, STAGE_NAMES)[1]
    assert line == ("  downloads: 18.4 GB, once (then cached): llava-hf/llava-1.5-7b-hf 14.1 GB, "
                    "stable-diffusion-v1-5/stable-diffusion-v1-5 4.3 GB, cifar10 (size not known here)")
    line = needs(DistillConfig(data="digits", ipc=10, out="x"), 1438, 10, STAGE_NAMES)[1]
    assert "digits" not in line  # scikit-learn ships it
