"""`vlcp distill --config`: YAML/TOML files, shipped configs and manifests set defaults; flags win."""
import json
import re
from importlib import resources
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.conftest import read_manifest
from vlcp.cli.main import cli
from vlcp.data.defaults import DEFAULTS
from vlcp.pipeline.config import DistillConfig

# (dataset, IPC) -> the paper's "Ours" top-1 (mean, std) per evaluation network, read by hand from
# /work/shared/papers/vlcp_iccv2025.md (columns checked against each header and the text's own figures)
PAPER = {
    # Table 1, ImageWoof, IPC 10/20/50/70/100 x ConvNet-6, ResNetAP-10, ResNet-18 (Minimax's protocol)
    ("imagewoof", 10): {"ConvNet-6": (34.8, 2.4), "ResNetAP-10": (39.5, 1.5), "ResNet-18": (39.9, 2.6)},
    ("imagewoof", 20): {"ConvNet-6": (37.9, 1.9), "ResNetAP-10": (44.5, 2.2), "ResNet-18": (44.5, 2.0)},
    ("imagewoof", 50): {"ConvNet-6": (54.5, 0.6), "ResNetAP-10": (57.3, 0.5), "ResNet-18": (58.9, 1.5)},
    ("imagewoof", 70): {"ConvNet-6": (55.8, 1.7), "ResNetAP-10": (60.6, 0.3), "ResNet-18": (60.3, 0.3)},
    ("imagewoof", 100): {"ConvNet-6": (62.7, 1.4), "ResNetAP-10": (65.7, 0.5), "ResNet-18": (68.3, 0.4)},
    # Table 2, ImageNette and ImageIDC, IPC 10/20/50, ResNetAP-10 only (= Table 5's DCS row)
    ("imagenette", 10): {"ResNetAP-10": (64.8, 3.6)},
    ("imagenette", 20): {"ResNetAP-10": (71.4, 0.5)},
    ("imagenette", 50): {"ResNetAP-10": (81.2, 0.8)},
    ("imageidc", 10): {"ResNetAP-10": (57.0, 1.4)},
    ("imageidc", 20): {"ResNetAP-10": (63.3, 1.2)},
    ("imageidc", 50): {"ResNetAP-10": (71.9, 0.4)},
    # Table 3, ImageNet-1K, IPC 10/50 (RDED's protocol; the table names no network)
    ("imagenet", 10): {"": (46.7, 0.4)},
    ("imagenet", 50): {"": (60.5, 0.2)},
    # Table 4, CIFAR-10 and CIFAR-100, IPC 10/50 (RDED's protocol; no network named)
    ("cifar10", 10): {"": (39.0, 0.7)},
    ("cifar10", 50): {"": (63.2, 0.3)},
    ("cifar100", 10): {"": (50.6, 0.7)},
    ("cifar100", 50): {"": (66.1, 0.3)},
}
SHIPPED = [f"{data}-ipc{ipc}" for data, ipc in PAPER]
TABLES = {"imagewoof": "Table 1", "imagenette": "Table 2", "imageidc": "Table 2", "imagenet": "Table 3",
          "cifar10": "Table 4", "cifar100": "Table 4"}
NAMES = {"imagewoof": "ImageWoof", "imagenette": "ImageNette", "imageidc": "ImageIDC", "imagenet": "ImageNet-1K",
         "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
NETS = {"ConvNet-6": "convnet6", "ResNetAP-10": "resnetap10", "ResNet-18": "resnet18"}  # vlcp evaluate --model


def parse(*args) -> dict:
    """The values distill would receive (options parsed, callback not run). Under the group's context, as the CLI
    runs it: a context without a parent would give the command click's default help names (--help only), which
    click caches on the command and later --help pages in this process would show."""
    parent = cli.context_class(cli, info_name="vlcp", **cli.context_settings)
    with cli.commands["distill"].make_context("distill", [str(a) for a in args], parent=parent) as ctx:
        return dict(ctx.params)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_keys_in_either_spelling_with_their_types(tmp_path):
    f = write(tmp_path / "run.yaml", "data: digits\nipc: 2\nmax-per-class: 6\nfinetune_lr: 1e-5\nfinetune: false\n"
                                     "classes: [0, 1]\nout: o\nuntil: clusters\ncrop: center\ntiny: true\n")
    p = parse("--config", f)
    assert (p["data"], p["ipc"], p["max_per_class"], p["finetune_lr"], p["finetune"]) == ("digits", 2, 6, 1e-5, False)
    assert (p["classes"], p["out"], p["until"], p["crop"], p["tiny"]) == ("0,1", Path("o"), "clusters", "center", True)
    assert p["steps"] == 50 and p["seed"] == 0  # not in the file: the usual defaults
    t = write(tmp_path / "run.toml", 'data = "digits"\nipc = 2\nfinetune-lr = 2e-5\nclean_captions = false\n'
                                     'out = "o"\n')
    p = parse("--config", t)
    assert (p["finetune_lr"], p["clean_captions"], p["ipc"]) == (2e-5, False, 2)


def test_null_is_taken_where_the_config_takes_none(tmp_path):
    f = write(tmp_path / "n.yaml", "data: d\nipc: 1\nout: o\nbeta: null\nfinetune_max_grad_norm: null\n"
                                   "gradient-checkpointing: null\n")
    p = parse("--config", f)
    assert p["beta"] is None and p["finetune_max_grad_norm"] is None and p["gradient_checkpointing"] is None


def test_the_command_line_wins_wherever_it_stands(tmp_path):
    f = write(tmp_path / "run.yml", "data: digits\nipc: 2\nout: o\nseed: 4\nfinetune: false\n")
    assert parse("--config", f, "--ipc", "3")["ipc"] == 3
    p = parse("--ipc", "5", "--finetune", "--config", f)
    assert (p["ipc"], p["finetune"], p["seed"]) == (5, True, 4)


def usage_error(vlcp, *args) -> str:
    r = vlcp("distill", *args)
    assert r.exit_code == 2, r.output
    return r.output.split("Error: ", 1)[1].replace("\n", " ")


def test_mistakes_are_usage_errors_naming_key_and_file(vlcp, tmp_path):
    def err(text, suffix=".yaml"):
        return usage_error(vlcp, "--config", write(tmp_path / f"c{suffix}", text))

    f = tmp_path / "c.yaml"
    assert f"{f}: 'frobnicate' is not a vlcp distill option" in err("data: digits\nfrobnicate: 1\n")
    assert f"{f}: ipc: must be an integer, got 2.5" in err("ipc: 2.5\n")
    assert f"{f}: tiny: must be true or false, got 'yes please'" in err("tiny: yes please\n")
    assert f"{f}: finetune_lr: must be a number, got 'fast'" in err("finetune_lr: fast\n")
    assert f"{f}: data: must be a string, got ['digits']" in err("data: [digits]\n")
    assert f"{f}: steps: 0 is not in the range x>=1." in err("steps: 0\n")
    assert f"{f}: crop: 'diagonal' is not one of 'none', 'center'." in err("crop: diagonal\n")
    assert f"{f}: steps: must not be empty (null)" in err("steps: null\n")
    assert f"{f}: max_per_class is given twice" in err("max_per_class: 2\nmax-per-class: 3\n")
    assert f"{f}: must be a mapping of option names to values, got list" in err("- data\n")
    assert f"{f}: 'config' is not a vlcp distill option" in err("config: other.yaml\n")
    assert str(f) in err("data: [digits\n")  # a YAML syntax error
    t = tmp_path / "c.toml"
    assert f"{t}: ipc: must be an integer, got '2'" in err('ipc = "2"\n', ".toml")
    assert str(t) in err("ipc = = 2\n", ".toml")
    missing = tmp_path / "none.yaml"
    assert f"{missing}: no such file, nor a shipped config" in usage_error(vlcp, "--config", missing)
    assert "imagenette-ipc10" in usage_error(vlcp, "--config", "imagenette-ipc11")
    (tmp_path / "dir.yaml").mkdir()
    assert f"{tmp_path / 'dir.yaml'}: cannot be read (IsADirectoryError" in usage_error(
        vlcp, "--config", tmp_path / "dir.yaml")
    ini = write(tmp_path / "c.ini", "ipc = 2\n")
    assert f"{ini}: not a .yaml, .yml, .toml or manifest.json file" in usage_error(vlcp, "--config", ini)
    assert "not a vlcp manifest" in err('{"stages": {}}', ".json")
    manifest = write(tmp_path / "manifest.json", json.dumps({"parameters": {"data": "digits", "ipc": 1, "x": 1}}))
    assert f"{manifest}: 'x' is not a distill parameter of another vlcp version" in usage_error(
        vlcp, "--config", manifest)


def test_an_empty_file_changes_nothing(tmp_path):
    assert parse("--config", write(tmp_path / "e.yaml", ""), "--data", "d", "--ipc", "1", "--out", "o") == \
        parse("--data", "d", "--ipc", "1", "--out", "o")


def test_a_manifest_gives_its_parameters_but_not_force_or_global_options(tmp_path):
    cfg = DistillConfig(data="digits", ipc=2, out=tmp_path / "A", data_dir=tmp_path / "elsewhere", device="cpu",
                        force=True, seed=7, classes=["0", "1"], finetune_max_steps=3)
    m = write(tmp_path / "manifest.json", json.dumps({"parameters": cfg.params()}))
    p = parse("--config", m)
    assert (p["data"], p["ipc"], p["seed"], p["classes"], p["finetune_max_steps"]) == ("digits", 2, 7, "0,1", 3)
    assert p["out"] == tmp_path / "A" and p["force"] is False
    assert "data_dir" not in p and "device" not in p
    assert parse("--config", m, "--out", tmp_path / "B", "--force")["out"] == tmp_path / "B"


def test_list_configs_names_every_shipped_config_and_its_table():
    r = CliRunner().invoke(cli, ["distill", "--list-configs"])
    assert r.exit_code == 0
    rows = [line.split(None, 1) for line in r.output.splitlines()]
    by_ipc = sorted(SHIPPED, key=lambda n: (n.rsplit("-ipc", 1)[0], int(n.rsplit("-ipc", 1)[1])))
    assert [name for name, _ in rows] == by_ipc  # imagewoof-ipc10, -ipc20, -ipc50, -ipc70, -ipc100
    assert [n for n in by_ipc if n.startswith("imagewoof-")][-1] == "imagewoof-ipc100"
    for name, what in rows:
        data, ipc = name.rsplit("-ipc", 1)
        assert what.startswith(f"{TABLES[data]} of the VLCP paper (ICCV 2025)") and f", IPC {ipc};" in what, name


def config_text(name: str) -> str:
    return resources.files("vlcp.configs").joinpath(f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_validates(name, tmp_path):
    text = config_text(name)
    data, ipc = name.rsplit("-ipc", 1)
    assert re.match(rf"# {TABLES[data]} of the VLCP paper \(ICCV 2025\): .+, IPC {ipc}; reported top-1", text)
    p = parse("--config", name, "--out", tmp_path / name)
    assert (p["data"], p["ipc"]) == (data, int(ipc))
    row = DEFAULTS[data]
    assert {k: p[k] for k in ("contamination", "beta", "top_k", "image_size")} == \
        {k: row[k] for k in ("contamination", "beta", "top_k", "image_size")}
    assert (p["finetune"], p["finetune_epochs"], p["finetune_batch_size"], p["text_strategy"]) == (True, 8, 8, "dcs")
    p.pop("dry_run")
    assert p.pop("classes") is None
    DistillConfig(data_dir=tmp_path / "data", **p).validate()


def test_the_shipped_configs_are_the_rows_the_paper_reports():
    files = {f.name for f in resources.files("vlcp.configs").iterdir() if not f.name.startswith("__")}
    assert files == {f"{data}-ipc{ipc}.yaml" for data, ipc in PAPER}
    assert set(PAPER) == {  # every (dataset, IPC) of Tables 1-4, no more
        *(("imagewoof", ipc) for ipc in (10, 20, 50, 70, 100)),  # Table 1
        *((data, ipc) for data in ("imagenette", "imageidc") for ipc in (10, 20, 50)),  # Table 2
        ("imagenet", 10), ("imagenet", 50),  # Table 3
        *((data, ipc) for data in ("cifar10", "cifar100") for ipc in (10, 50)),  # Table 4
    }


HEADER = re.compile(r"# (Table \d) of the VLCP paper \(ICCV 2025\): (.+), IPC (\d+); reported top-1(?: on ([\w-]+))?: "
                    r"(.+)\.\n")


@pytest.mark.parametrize("name", SHIPPED)
def test_the_header_names_the_row_its_numbers_and_the_commands(name):
    text = config_text(name)
    data, ipc = name.rsplit("-ipc", 1)
    m = HEADER.match(text)
    assert m and (m[1], m[2], m[3]) == (TABLES[data], NAMES[data], ipc), text.splitlines()[0]
    reported = {}
    for item in m[5].split(", "):
        n = re.fullmatch(r"(?:([\w-]+) )?(\d+\.\d) ± (\d+\.\d)", item)
        assert n, item
        reported[n[1] or m[4] or ""] = (float(n[2]), float(n[3]))
    assert reported == PAPER[(data, int(ipc))]
    lines = text.splitlines()
    assert lines[1] == f"# Run:      vlcp distill --config {name} --out out/{name}"
    nets = "|".join(NETS[net] for net in PAPER[(data, int(ipc))] if net)
    how = f"--model {nets} --seeds 3   (Minimax's protocol)" if nets else "--protocol rded --seeds 3   (RDED's protocol)"
    assert lines[2] == f"# Evaluate: vlcp evaluate out/{name} --data {data} {how}"


def test_configs_of_one_dataset_differ_only_in_ipc_and_header():
    for data in TABLES:
        bodies = set()
        for ipc in (ipc for d, ipc in PAPER if d == data):
            lines = config_text(f"{data}-ipc{ipc}").splitlines()[3:]
            assert lines.count(f"ipc: {ipc}") == 1, (data, ipc)
            bodies.add(tuple("ipc: N" if line == f"ipc: {ipc}" else line for line in lines))
        assert len(bodies) == 1, data


def test_header_numbers_are_the_reports_published_vlcp_figures():
    entries = json.loads(resources.files("vlcp.report").joinpath("published.json").read_text())["entries"]
    published = {(e["dataset"], e["ipc"], e["model"] if e["protocol"] == "minimax" else "", e["mean"], e["std"])
                 for e in entries if e["method"] == "VLCP" and "text_strategy" not in e}
    assert published == {(data, ipc, NETS.get(net, ""), mean, std)
                         for (data, ipc), row in PAPER.items() for net, (mean, std) in row.items()}


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "imagenette-ipc10", "")  # no suffix: a file that exists is never taken for a shipped name
    with pytest.raises(click.BadParameter, match="not a .yaml, .yml, .toml or manifest.json file"):
        parse("--config", "imagenette-ipc10")


# -- end to end: the same parameters from flags, a file or a manifest hit the same cache entries ----------
FLAGS = ["--data", "digits", "--tiny", "--ipc", "2", "--classes", "0,1", "--max-per-class", "6", "--steps", "2",
         "--seed", "3", "--beta", "0.3", "--finetune-max-steps", "1", "--guidance-scale", "7.5"]
YAML = ("data: digits\ntiny: true\nipc: 2\nclasses: ['0', '1']\nmax-per-class: 6\nsteps: 2\nseed: 3\nbeta: 0.3\n"
        "finetune_max_steps: 1\nguidance-scale: 7.5\n")


def all_hits(out: Path) -> dict:
    m = read_manifest(out)
    for name, s in m["stages"].items():
        if name != "output":  # the output stage writes OUT every time
            assert s["cached"] and s["items_computed"] == 0 and not s["model_loaded"], (name, s)
    return m


@pytest.mark.e2e
def test_a_config_file_and_a_manifest_reproduce_the_flags_run(vlcp, tmp_path):
    r = vlcp("distill", *FLAGS, "--out", tmp_path / "A")
    assert r.exit_code == 0, r.output
    first = read_manifest(tmp_path / "A")
    assert "finetune" in first["stages"] and not first["stages"]["finetune"]["cached"]

    def same_but_out(m: dict, out: Path, force: bool = False) -> None:
        assert m["parameters"]["out"] == str(out) and m["parameters"]["force"] is force
        assert {**m["parameters"], "out": None, "force": None} == {**first["parameters"], "out": None, "force": None}

    r = vlcp("distill", "--config", write(tmp_path / "run.yaml", YAML), "--out", tmp_path / "B")
    assert r.exit_code == 0, r.output
    same_but_out(all_hits(tmp_path / "B"), tmp_path / "B")

    r = vlcp("distill", "--config", tmp_path / "A" / "manifest.json", "--out", tmp_path / "C")
    assert r.exit_code == 0, r.output
    same_but_out(all_hits(tmp_path / "C"), tmp_path / "C")

    # OUT comes from the manifest, --force does not: rerunning into A must be asked for
    r = vlcp("distill", "--config", tmp_path / "A" / "manifest.json")
    assert r.exit_code == 2 and f"--out {tmp_path / 'A'} is not empty; pass --force" in r.output
    r = vlcp("distill", "--config", tmp_path / "A" / "manifest.json", "--force")
    assert r.exit_code == 0, r.output
    same_but_out(all_hits(tmp_path / "A"), tmp_path / "A", force=True)


def test_a_manifest_replayed_from_another_folder_finds_its_relative_data(vlcp, tmp_path, monkeypatch):
    """--data as typed (``ds``) is relative to where the run ran; the manifest also records the folder in full."""
    import numpy as np
    from PIL import Image

    work = tmp_path / "work"
    for c in ("cat", "dog"):
        (work / "ds" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i + (c == "dog") * 100, np.uint8)).save(work / "ds" / c / f"{i}.png")
    monkeypatch.chdir(work)
    assert vlcp("distill", "--data", "ds", "--tiny", "--ipc", "1", "--until", "images", "--out", tmp_path / "a"
                ).exit_code == 0
    first = read_manifest(tmp_path / "a")
    assert first["parameters"]["data"] == "ds"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = vlcp("distill", "--config", tmp_path / "a" / "manifest.json", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    again = read_manifest(tmp_path / "b")
    assert again["parameters"]["data"] == str((work / "ds").resolve())
    same = ("name", "digest", "images", "classes")
    assert [again["dataset"][k] for k in same] == [first["dataset"][k] for k in same]  # the same images
