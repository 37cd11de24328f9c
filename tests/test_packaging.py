"""The image, the README and CI install what setup.cfg declares, at the versions constraints.txt pins."""
import configparser
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", v).group().split("."))


def _floors() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].strip().splitlines()]
    return {m.group(1).lower(): m.group(2) for r in reqs if (m := re.match(r"([\w-]+)>=([\d.]+)", r))} | {
        "python": re.match(r">=([\d.]+)", cfg["options"]["python_requires"]).group(1)}


def _pins() -> dict[str, str]:
    return {k.lower(): v for k, v in re.findall(r"^([\w.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)}


def test_dockerfile_torch_and_python_satisfy_the_declared_floors():
    docker = (ROOT / "Dockerfile").read_text()
    floors = _floors()
    base = re.search(r"^FROM python:(\d+\.\d+)", docker, re.M)
    assert base, "the image is built on an official python base"
    assert _version(base.group(1)) >= _version(floors["python"])
    torch = re.search(r"torch==([\d.]+)", docker).group(1)
    vision = re.search(r"torchvision==([\d.]+)", docker).group(1)
    assert _version(torch) >= _version(floors["torch"]) and _version(vision) >= _version(floors["torchvision"])
    assert "-c constraints.txt ." in docker  # the package itself resolves to the tested versions


def test_floors_are_what_the_code_needs_and_pins_satisfy_them():
    floors, pins = _floors(), _pins()
    assert _version(floors["python"]) >= (3, 11) and _version(floors["torch"]) >= (2, 6)
    assert _version(floors["transformers"]) >= (5,) and _version(floors["diffusers"]) >= (0, 40)  # dtype= (PR #14205)
    assert _version(floors["huggingface_hub"]) >= (1,)  # the `hf` command
    for name, floor in floors.items():
        if name != "python":
            assert name in pins, f"{name} is not pinned in constraints.txt"
            assert _version(pins[name]) >= _version(floor), (name, pins[name], floor)


def test_readme_ci_and_image_install_the_same_torch_with_the_constraints():
    pins = _pins()
    torch = f"torch=={pins['torch']} torchvision=={pins['torchvision']}"
    readme = (ROOT / "README.md").read_text()
    setup = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(setup) == 2 and all(f"pip install -c constraints.txt {torch}" in line for line in setup)
    assert all("pip install -c constraints.txt -e " in line for line in setup)
    assert setup[1].split("&& ", 2)[2] in (ROOT / ".ci" / "run").read_text()  # CI runs the second verbatim
    assert f"-c constraints.txt {torch}" in (ROOT / "Dockerfile").read_text()
