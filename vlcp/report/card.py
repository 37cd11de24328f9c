"""``OUT/README.md``: a Hugging Face dataset card for a distilled set, built from the folder's own files.

The YAML front matter is ``yaml.safe_dump`` of a dict (never text pasted into YAML), and every value the
body shows that a user or a model named (class names, prompts, dataset names, parameters, paths) goes
through ``md``: one line, HTML and Markdown specials escaped, so nothing in OUT can add markup, close the
front matter or a table. The card is rewritten by ``vlcp distill``, ``vlcp evaluate OUT`` and ``vlcp
publish``, but only while it carries ``MARKER``: a card a user edited (marker removed) is left alone.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import yaml

from vlcp import __version__
from vlcp.store.output import IMAGE_SUFFIXES, images_dir

CARD = "README.md"
MARKER = ("<!-- vlcp dataset card: rewritten by vlcp distill / evaluate / publish; "
          "remove this line to keep your edits -->")
# The licences vlcp knows for its named datasets (Hub licence ids); any other source gives "other".
LICENSES = {"digits": ("cc-by-4.0", "UCI ML hand-written digits (Optical Recognition of Handwritten Digits), "
                                    "CC BY 4.0"),
            "fashion-mnist": ("mit", "Fashion-MNIST (Zalando Research), MIT")}
SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]
MAX_PROMPTS = 200  # prompts listed in the card; more: prototypes.json has them
VLCP_BIBTEX = """@inproceedings{zou2025vlcp,
  title     = {Dataset Distillation via Vision-Language Category Prototype},
  author    = {Zou, Yawen and Li, Guang and Su, Duo and Wang, Zi and Yu, Jun and Zhang, Chao},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2025}
}"""
TOOL_BIBTEX = """@software{vlcp,
  title   = {vlcp: dataset distillation with diffusion models and vision-language category prototypes},
  version = {%s}
}"""
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#{}])")


class CardError(Exception):
    """OUT has no manifest of ``vlcp distill``: no card to write (exit code 2)."""


def md(value: Any) -> str:
    """A value as inline Markdown text: one line, ``<>&`` as entities, Markdown specials backslashed."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return html.escape(_MD_SPECIAL.sub(r"\\\1", one_line(text, None)), quote=False)


def one_line(value: Any, limit: int | None = 200) -> str:
    """A user-named value on one line: whitespace runs as one space, other unprintable characters dropped,
    at most ``limit`` characters (the YAML front matter's values)."""
    text = "".join(ch for ch in " ".join(str(value).split()) if ch.isprintable())
    return text[:limit] if limit else text


def read_manifest(out: Path) -> dict:
    """OUT's manifest of ``vlcp distill`` (parameters and classes), or CardError."""
    path = Path(out) / "manifest.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CardError(f"{out} has no readable manifest.json ({exc.__class__.__name__}): not a vlcp distill "
                        f"folder") from None
    if not isinstance(m, dict) or not isinstance(m.get("parameters"), dict) or not isinstance(m.get("classes"), list):
        raise CardError(f"{path} is not the manifest of a vlcp distill run")
    return m


def class_rows(out: Path, m: dict) -> list[tuple[str, str, int]]:
    """(folder, name, images on disk) per class of the manifest."""
    root, rows = images_dir(Path(out)), []
    for c in m["classes"]:
        c = c if isinstance(c, dict) else {}
        folder = str(c.get("folder", ""))
        d = root / folder
        inside = folder and ".." not in Path(folder).parts and not Path(folder).is_absolute()
        n = sum(1 for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if inside and d.is_dir() else 0
        rows.append((folder, str(c.get("name", folder)), n))
    return rows


def evaluations(out: Path) -> list[tuple[str, dict]]:
    """(file name, results) of OUT/evaluations/*.json, unreadable files left out."""
    found = []
    for p in sorted((Path(out) / "evaluations").glob("*.json")):
        try:
            res = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(res, dict):
            found.append((p.name, res))
    return found


def prompts(out: Path) -> dict[str, list[str]]:
    """Class folder -> the prompts its images were generated from (prototypes.json)."""
    try:
        data = json.loads((Path(out) / "prototypes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    classes = data.get("classes") if isinstance(data, dict) else None
    out_ = {}
    for folder, c in (classes if isinstance(classes, dict) else {}).items():
        clusters = c.get("clusters") if isinstance(c, dict) else None
        out_[str(folder)] = [str(k.get("prompt", "")) for k in clusters or [] if isinstance(k, dict)]
    return out_


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of ``n`` examples."""
    return next((name for limit, name in SIZES if n < limit), "other")


def dataset_name(m: dict) -> str:
    ds = m.get("dataset") if isinstance(m.get("dataset"), dict) else {}
    return one_line(public(ds.get("name") or m["parameters"].get("data") or "?"), 80)


def named_dataset(m: dict) -> str | None:
    """The vlcp dataset name the run read (``--data cifar10``), None for an ImageFolder path."""
    from vlcp.data.datasets import KNOWN

    data = m["parameters"].get("data")
    return data if isinstance(data, str) and data in KNOWN else None


def front_matter(m: dict, n_images: int, images_sub: str | None) -> dict:
    """The card's metadata as data (the Hub's dataset-card YAML: ``DatasetCardData`` fields plus ``configs``).
    No ``dataset_info``: ``datasets`` takes the column types from ``metadata.jsonl`` (it does not apply the
    card's features when loading), so declared ones could only disagree with what users get."""
    name, p, named = dataset_name(m), m["parameters"], named_dataset(m)
    tags = ["dataset-distillation", "synthetic", "vlcp", "vision-language-category-prototype",
            "stable-diffusion", *(["tiny-random-models"] if m.get("tiny") else [])]
    files = f"{images_sub}/**" if images_sub else [f"{_glob_escape(f)}/**" for f, _ in _folders(m)]
    return {"license": LICENSES[named][0] if named in LICENSES else "other",
            "pretty_name": one_line(f"{name} distilled by vlcp (VLCP, IPC {p.get('ipc', '?')})", 120),
            "task_categories": ["image-classification"], "tags": tags,
            "size_categories": [size_category(n_images)],
            "source_datasets": [f"extended|{named}" if named else "extended"],
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": files}]}]}


def _folders(m: dict) -> list[tuple[str, str]]:
    return [(str(c.get("folder")), str(c.get("name"))) for c in m["classes"] if isinstance(c, dict)]


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", name)


def render(out: Path, repo_id: str | None = None) -> str:
    """The whole card: YAML front matter, then the body."""
    out = Path(out)
    m = read_manifest(out)
    rows = class_rows(out, m)
    root = images_dir(Path(out))
    sub = root.name if root != out else None
    meta = front_matter(m, sum(n for *_, n in rows), sub)
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=False, width=1000)
    return f"---\n{head}---\n\n" + body(out, m, rows, sub, repo_id)


def body(out: Path, m: dict, rows: list[tuple[str, str, int]], sub: str | None, repo_id: str | None) -> str:
    p, name = m["parameters"], dataset_name(m)
    n = sum(r[2] for r in rows)
    ds = m.get("dataset") if isinstance(m.get("dataset"), dict) else {}
    parts = [MARKER, "", f"# {md(name)} distilled by vlcp (IPC {md(p.get('ipc', '?'))})", "",
             f"{n} synthetic images, {md(p.get('ipc', '?'))} per class for {len(rows)} classes of **{md(name)}** "
             f"({md(ds.get('images', '?'))} {md(ds.get('split', 'train'))} images), made by `vlcp distill` "
             f"(vlcp {md(m.get('vlcp_version', __version__))}) with the VLCP method (*Dataset Distillation via "
             f"Vision-Language Category Prototype*, Zou et al., ICCV 2025): image prototypes from K-Means on VAE "
             f"latents, text prototypes from captions of the real images, both fed to a Stable Diffusion "
             f"img2img pipeline{' fine-tuned on the (image, caption) pairs' if p.get('finetune') else ''}."]
    if m.get("tiny"):
        parts += ["", "**Made with tiny random models (`--tiny`): the images are noise, for tests and demos only.**"]
    parts += ["", *_load(sub, repo_id), "", *_classes(out, rows), "", *_models(m), "",
              *_evaluation(out, m), *_readings(out, m), "## Parameters", "",
              "Every parameter of the run, as `manifest.json` records it (`vlcp distill --config manifest.json` "
              "reruns it):", "", "| parameter | value |", "|---|---|",
              *[f"| {md(k)} | {md(json.dumps(public_values(v), default=str, ensure_ascii=False))} |"
                for k, v in p.items()], "",
              *_license(m, name), "", "## Citation", "", "```bibtex", VLCP_BIBTEX, "", TOOL_BIBTEX % __version__,
              "```", ""]
    return "\n".join(parts)


def public(value: Any) -> Any:
    """A local absolute path (``/…``, ``~…``, ``C:\\…``) as ``…/<its last part>``: a published card names no
    user's folders; ``vlcp publish`` hides the paths in the JSON files it uploads by this same rule."""
    if isinstance(value, str) and (value.startswith(("/", "~")) or (len(value) > 2 and value[1:3] in (":\\", ":/"))):
        return "…/" + value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value


def public_values(value: Any) -> Any:
    """``value`` with every string in it (nested in lists and dicts; keys kept) passed through ``public``: what
    the card and the report show of a manifest's parameters, and what ``vlcp publish`` sends of a JSON file."""
    if isinstance(value, dict):
        return {k: public_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_values(v) for v in value]
    return public(value)


def _load(sub: str | None, repo_id: str | None) -> list[str]:
    where, local = (f"{sub}/", f"path/to/this/folder/{sub}") if sub else ("", "path/to/this/folder")
    hub = repo_id or "USER/REPO"
    return ["## Load it", "",
            f"The images are in `{where}<class folder>/` (an ImageFolder)"
            + (f", with `{where}metadata.jsonl`" if sub else "") + ":", "", "```python",
            "from datasets import load_dataset", "",
            f'ds = load_dataset("{hub}")  # from the Hub' + ("" if repo_id else " (this repository's id)"),
            f'ds = load_dataset("imagefolder", data_dir="{local}")  # a local copy', "",
            "from torchvision.datasets import ImageFolder", "",
            f'train = ImageFolder("{local}")', "```"]


def _classes(out: Path, rows: list[tuple[str, str, int]]) -> list[str]:
    found = prompts(out)
    total = sum(len(v) for v in found.values())
    show = 0 < total <= MAX_PROMPTS
    lines = ["## Classes", "", "| folder | class | images |" + (" prompts |" if show else ""),
             "|---|---|---|" + ("---|" if show else "")]
    for folder, name, n in rows:
        extra = " " + " · ".join(md(t) or "(empty prompt)" for t in found.get(folder, [])) + " |" if show else ""
        lines.append(f"| {md(folder)} | {md(name)} | {n} |{extra}")
    if total > MAX_PROMPTS:
        lines += ["", f"The {total} prompts (text prototypes) are in `prototypes.json`."]
    return lines


def _models(m: dict) -> list[str]:
    lines = ["## Models", "", "| role | model | identity | revision |", "|---|---|---|---|"]
    for role, ref in (m.get("models") or {}).items():
        ref = ref if isinstance(ref, dict) else {"name": ref}
        lines.append(f"| {md(role)} | {md(public(ref.get('name', '')))} | {md(public(ref.get('identity', '')))} | "
                     f"{md(ref.get('revision') or '–')} |")
    ft = m.get("finetune") if isinstance(m.get("finetune"), dict) else {}
    if ft:
        params = ft.get("params") if isinstance(ft.get("params"), dict) else {}
        lines += ["", f"Fine-tuning: {md(params.get('method', m['parameters'].get('finetune_method', '?')))}, "
                      f"{md(ft.get('steps', '?'))} steps, loss {md(ft.get('first_loss', '?'))} → "
                      f"{md(ft.get('last_loss', '?'))} (`vlcp export OUT --format diffusers DIR` writes the weights)."]
    return lines


def _pm(acc: Any) -> str:
    acc = acc if isinstance(acc, dict) else {}
    if not isinstance(acc.get("mean"), (int, float)):
        return "–"
    std = acc.get("std")
    return f"{acc['mean']:.2f} ± {std:.2f}" if isinstance(std, (int, float)) else f"{acc['mean']:.2f}"


def _evaluation(out: Path, m: dict) -> list[str]:
    """One row per ``vlcp evaluate`` run saved in OUT/evaluations/ (the headline: final top-1 over seeds)."""
    evals = [(n, r) for n, r in evaluations(out) if isinstance(r.get("accuracy"), dict)]  # vlcp evaluate's files
    if not evals:
        return []
    lines = ["## Evaluation", "", "Top-1 accuracy (%) on the real test split of a network trained on these images "
             "(`vlcp evaluate`; mean ± std over runs, after the last epoch):", "",
             "| protocol | model | epochs | accuracy | runs | file |", "|---|---|---|---|---|---|"]
    fused = []
    for name, res in evals:
        proto = res.get("protocol") if isinstance(res.get("protocol"), dict) else {}
        acc = res.get("accuracy") if isinstance(res.get("accuracy"), dict) else {}
        runs = len(acc.get("per_seed") or []) or len(res.get("seeds") or [])
        soft = res.get("soft_labels") if isinstance(res.get("soft_labels"), dict) else {}
        label = proto.get("name", "?") if not soft else f"{proto.get('name', '?')}, soft labels {soft.get('name', '?')}"
        lines.append(f"| {md(label)} | {md(proto.get('model', '?'))} | {md(proto.get('epochs', '?'))}"
                     f" | {_pm(acc)} | {runs} | {md(name)} |")
        if isinstance(res.get("caption_fusion"), dict):
            fu = res["caption_fusion"]
            fused.append(f"- {md(proto.get('model', '?'))} ({md(proto.get('name', '?'))}): {_pm(fu.get('accuracy'))}"
                         f", {md(fu.get('label', ''))}")
    if fused:
        lines += ["", "With `--caption-fusion` (a separate classifier that also sees text; not the headline):", "",
                  *fused]
    return [*lines, ""]


def readings(obj: Any, path: str = "") -> list[tuple[str, str]]:
    """(JSON path, text) of every string saying it is vlcp's reading, formulation or proposal rather than
    the authors' method (not "vlcp's choice": a default, not a method)."""
    if isinstance(obj, dict):
        return [r for k, v in obj.items() for r in readings(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, list):
        return [r for i, v in enumerate(obj) for r in readings(v, f"{path}[{i}]")]
    if isinstance(obj, str) and re.search(r"vlcp's (reading|formulation|proposal)|not the authors'", obj):
        return [(path, obj)]
    return []


def _readings(out: Path, m: dict) -> list[str]:
    found = readings({k: v for k, v in m.items() if k != "parameters"})
    found += [(f"evaluations/{n}: {p}", t) for n, res in evaluations(out) for p, t in readings(res)]
    if not found:
        return []
    seen, lines = set(), ["## vlcp's reading vs the authors' method", "",
                          "Where the run used vlcp's own reading of a paper rather than the authors' method, the "
                          "manifest says so:", ""]
    for path, text in found:  # each text once, at its first place
        if text not in seen:
            seen.add(text)
            lines.append(f"- {md(path)}: {md(text)}")
    return [*lines, ""]


def _license(m: dict, name: str) -> list[str]:
    diffusion = (m.get("models") or {}).get("diffusion") or {}
    named = named_dataset(m)
    src = LICENSES[named][1] if named in LICENSES else None
    first = (f"The source dataset is {md(src)}." if src else
             f"vlcp does not know the licence of {md(name)} (`license: other`): check its terms before publishing.")
    return ["## Licence", "", first + " The images were generated by "
            f"{md(public(diffusion.get('name', 'the diffusion model') if isinstance(diffusion, dict) else diffusion))}; "
            "its licence may restrict their use."]


def is_vlcp_card(path: Path) -> bool:
    """Whether ``path`` is missing or a card vlcp wrote (so it may be rewritten)."""
    try:
        return MARKER in path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError):
        return False


def build(out: Path, repo_id: str | None = None) -> Path | None:
    """Write OUT/README.md atomically; None (nothing written) when a user-edited card is there."""
    from vlcp.store.cache import atomic_write_text

    path = Path(out) / CARD
    text = render(out, repo_id)
    if not is_vlcp_card(path):
        return None
    atomic_write_text(path, text)
    return path


def refresh(out: Path, repo_id: str | None = None) -> Path | None:
    """``build`` for a folder that has a vlcp distill manifest; None for any other folder."""
    try:
        read_manifest(out)
    except CardError:
        return None
    return build(out, repo_id)
