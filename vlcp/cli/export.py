"""``vlcp export OUT --format diffusers DIR``: the fine-tuned UNet (or LoRA adapter) of a distillation, taken from
the cache where ``vlcp distill`` stored it, written so that diffusers loads it; ``--format ddranking``: the set
in DD-Ranking's layout (``vlcp.evaluation.ddranking``).

Full fine-tuning: ``DIR`` is a diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
``UNet2DConditionModel.from_pretrained(DIR)``). LoRA: ``DIR/pytorch_lora_weights.safetensors`` as diffusers'
training scripts save it (``StableDiffusionPipeline.save_lora_weights``; ``pipe.load_lora_weights(DIR)``).
Either way ``DIR/README.md`` names the base model and its revision. safetensors only; ``DIR`` is written
to a temporary folder and renamed into place, and a non-empty ``DIR`` is replaced only with ``--force``.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from vlcp.cli.common import Ctx, usage_error, user_errors


@click.command("export")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dest", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["diffusers", "ddranking"]), required=True,
              help="diffusers: the fine-tuned UNet or LoRA adapter of OUT's run, from the cache (--cache-dir); "
                   "ddranking: the images (and a teacher) in DD-Ranking's layout.")
@click.option("--dataset", help="ddranking: the dataset name [default: OUT's manifest].")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="ddranking: teacher weights to export [default: the one vlcp trained for --protocol rded, if any].")
@click.option("--soft-labels", "soft_labels", metavar="NAME",
              help="ddranking: which of OUT's soft labels (vlcp relabel) to write as DIR/soft_labels.pt for "
                   "DD-Ranking's mode S [default: OUT's only ones; none: no file].")
@click.option("--force", is_flag=True, help="Replace a non-empty DIR.")
@click.pass_obj
def export_cmd(obj: Ctx, out: Path, dest: Path, fmt: str, dataset, teacher, soft_labels, force):
    """Export what OUT's distillation made for other tools: the fine-tuned diffusion weights (diffusers), or the
    synthetic set for DD-Ranking."""
    if fmt == "diffusers" and (dataset or teacher):
        raise click.UsageError("--dataset and --teacher apply only with --format ddranking")
    if fmt == "diffusers" and soft_labels is not None:
        raise click.UsageError("--soft-labels applies only with --format ddranking")
    if fmt == "ddranking":
        with user_errors():
            from vlcp.evaluation import ddranking

            done = ddranking.export(out, dest, dataset=dataset, teacher=teacher, force=force, cache_dir=obj.cache_dir,
                                    soft_labels=soft_labels)
        if not obj.quiet:
            click.echo(f"wrote {dest}/: {done['dataset']}, IPC {done['ipc']}, {len(done['classes'])} classes"
                       + (", teacher" if done.get("teacher") else "")
                       + (f", soft labels {done['soft_labels']['name']}" if done.get("soft_labels") else "")
                       + (f" (no soft labels: OUT has several, {', '.join(done['soft_label_choices'])}; name one with "
                          "--soft-labels NAME)" if done.get("soft_label_choices") else ""))
        return
    from vlcp.store.output import check_export

    with user_errors():
        check_export(out, dest, force)  # DIR: a folder of its own, empty unless --force (exit code 2)
    m = finetuned_run(out)
    method = m["parameters"].get("finetune_method", "full")
    weights = cached_weights(obj, m)
    with user_errors():
        write_diffusers(dest, m, weights, method)
    if not obj.quiet:
        what = "UNet" if method == "full" else f"LoRA adapter (rank {m['parameters'].get('finetune_lora_rank')})"
        click.echo(f"wrote {dest}/: the fine-tuned {what} for diffusers ({len(weights)} tensors)")


def finetuned_run(out: Path) -> dict:
    """OUT's manifest, if its run fine-tuned the diffusion model (exit code 2 otherwise)."""
    try:
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise usage_error(f"{out} has no readable manifest.json ({exc.__class__.__name__}): not a folder vlcp "
                          f"distill wrote") from None
    if not isinstance(m, dict) or not isinstance(m.get("parameters"), dict):
        raise usage_error(f"{out}/manifest.json is not the manifest of a vlcp distill run")
    stage = m["stages"].get("finetune") if isinstance(m.get("stages"), dict) else None
    if not m["parameters"].get("finetune") or not isinstance(stage, dict) or not stage.get("key"):
        raise usage_error(f"{out}: its run did not fine-tune the diffusion model (--no-finetune, or stopped before "
                          f"the finetune stage): there are no fine-tuned weights to export")
    return m


def cached_weights(obj: Ctx, m: dict) -> dict:
    """The fine-tuned tensors (name -> numpy array) of the manifest's finetune stage, checksum-verified."""
    from vlcp.store.cache import CorruptEntry

    key = m["stages"]["finetune"]["key"]
    try:
        entry = obj.cache().get("finetune", key, verify=True)
    except CorruptEntry as exc:
        raise click.ClickException(str(exc)) from None
    if entry is None or not entry.tensors:
        raise click.ClickException(
            f"the fine-tuned weights of this run (cache entry finetune/{key[:12]}) are not in the cache "
            f"{obj.cache_dir} (cleared, or another --cache-dir): rerun `vlcp --cache-dir {obj.cache_dir} distill "
            f"--config OUT/manifest.json --until finetune --out NEW_DIR` to recompute them")
    return entry.tensors


def write_diffusers(dest: Path, m: dict, weights: dict, method: str) -> None:
    """DIR, atomically: the UNet (full) or the LoRA adapter (lora) as diffusers saves them, and a README."""
    from vlcp.store.output import publish

    def build(tmp: Path) -> None:
        if method == "lora":
            _save_lora(tmp, weights, int(m["parameters"].get("finetune_lora_rank") or 4))
        else:
            _save_unet(tmp, m, weights)
        (tmp / "README.md").write_text(model_card(m, method), encoding="utf-8")
        shared_modes(tmp)

    publish(dest, build)


def shared_modes(folder: Path) -> None:
    """Give the files libraries wrote with 0600 (safetensors) the mode ``open`` gives: 0666 less the umask,
    found from a file ``vlcp.store.files.new_file`` makes (reading the umask would change it for a moment)."""
    import os

    from vlcp.store.files import new_file

    fd, probe = new_file(folder, ".mode-")
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    os.unlink(probe)
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(mode)


def _save_unet(tmp: Path, m: dict, weights: dict) -> None:
    """The whole UNet: the base model's UNet config with the fine-tuned weights, via ``save_pretrained``."""
    from diffusers import UNet2DConditionModel

    from vlcp.models.loading import ModelError, ModelRef, read_config
    from vlcp.store.tensors import numpy_to_state

    ref = _diffusion(m)
    name = ref.get("name") or m["parameters"].get("diffusion")
    if not isinstance(name, str) or not name:
        raise click.ClickException("the manifest names no diffusion model: the UNet's config comes from it")
    base = ModelRef(name, name, ref.get("identity", ""), ref.get("revision"), Path(str(name)).is_dir())
    try:
        config = read_config(base, "unet/config.json")
    except ModelError as exc:
        raise click.ClickException(f"the UNet's config comes from the base model: {exc}") from None
    unet = UNet2DConditionModel.from_config(config)
    try:
        unet.load_state_dict(numpy_to_state(weights), strict=True, assign=True)
    except RuntimeError as exc:  # a local base model folder that changed since the run
        raise click.ClickException(f"the fine-tuned weights do not fit the UNet of {name} as it is now: "
                                   f"{str(exc).splitlines()[0]}") from None
    unet.save_pretrained(tmp, safe_serialization=True)


def _save_lora(tmp: Path, weights: dict, rank: int) -> None:
    """The adapter as diffusers' LoRA training scripts save it (PEFT keys converted, adapter config as metadata)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    from vlcp.method.finetune import LORA_TARGETS
    from vlcp.store.tensors import numpy_to_state

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(
        numpy_to_state(weights)), safe_serialization=True, unet_lora_adapter_metadata=config.to_dict())


def _diffusion(m: dict) -> dict:
    """The manifest's record of the diffusion model ({"name", "identity", "revision"})."""
    models = m.get("models") if isinstance(m.get("models"), dict) else {}
    return models.get("diffusion") if isinstance(models.get("diffusion"), dict) else {}


def model_card(m: dict, method: str) -> str:
    """DIR/README.md: a model card naming the base model, its revision and the run that trained the weights."""
    import yaml

    from vlcp.report.card import dataset_name, md

    ref = _diffusion(m)
    name, rev, identity = str(ref.get("name", "?")), ref.get("revision"), str(ref.get("identity", "?"))
    hub = not Path(name).is_absolute() and not name.startswith((".", "~")) and not identity.startswith("local:")
    p, ft = m["parameters"], m.get("finetune") if isinstance(m.get("finetune"), dict) else {}
    meta = {"library_name": "diffusers", **({"base_model": name} if hub else {}),
            "tags": ["vlcp", "dataset-distillation", "stable-diffusion", *(["lora"] if method == "lora" else [])]}
    what = "a LoRA adapter of its UNet" if method == "lora" else "its whole UNet"
    load = (["from diffusers import StableDiffusionPipeline", "",
             f'pipe = StableDiffusionPipeline.from_pretrained("{name if hub else "BASE_MODEL"}")',
             'pipe.load_lora_weights("path/to/this/folder")'] if method == "lora" else
            ["from diffusers import StableDiffusionPipeline, UNet2DConditionModel", "",
             'unet = UNet2DConditionModel.from_pretrained("path/to/this/folder")',
             f'pipe = StableDiffusionPipeline.from_pretrained("{name if hub else "BASE_MODEL"}", unet=unet)'])
    lines = ["# Fine-tuned by vlcp", "",
             f"The diffusion model {md(name)} (identity {md(identity)}, revision {md(rev or '–')}) with {what} "
             f"fine-tuned by `vlcp distill` on the (image, caption) pairs of {md(dataset_name(m))} "
             f"(Algorithm 1, step 3 of VLCP, Zou et al., ICCV 2025): {md(ft.get('steps', '?'))} steps, "
             f"learning rate {md((ft.get('params') or {}).get('lr', p.get('finetune_lr')))}, "
             f"EMA {md(p.get('finetune_ema'))}; vlcp {md(m.get('vlcp_version', '?'))}.",
             *(["", "**Trained with tiny random models (`--tiny`): for tests only.**"] if m.get("tiny") else []),
             "", "```python", *load, "```", ""]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n" + "\n".join(lines)
