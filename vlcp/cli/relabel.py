"""``vlcp relabel``: store a teacher's soft labels of M crops of every image of a set (FKD / SRe²L relabelling),
for ``vlcp evaluate --soft-labels``. The work is ``vlcp.evaluation.relabel``; this module checks the arguments
(the folder, the options, an existing output) before torch is imported."""
from __future__ import annotations

from pathlib import Path

import click

from vlcp.cli.common import Ctx, check_data, usage_error, user_errors
from vlcp.cli.distill_options import SEED, say_where_curves_went
from vlcp.cli.distill_options import log_dir as log_dir_option

MODELS = ["convnet3", "convnet6", "resnetap10", "resnet18", "resnet18-modified", "resnet18-bn"]
RELABEL_LOG_DIR = log_dir_option("relabel", "--teacher auto, when it trains the teacher: its loss, lr and training "
                                            "accuracy per epoch and its test accuracy, as "
                                            "relabel/rded-<model>/teacher/...")


@click.command("relabel")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--teacher", required=True,
              help="auto (the teacher vlcp trained for this data, e.g. by `vlcp evaluate --protocol rded`; trained "
                   "now if there is none) or a safetensors file (vlcp's <cache>/teachers/*.safetensors or your own).")
@click.option("--data", help="The real dataset the set distils [default: the one in OUT/manifest.json].")
@click.option("--crops", type=click.IntRange(min=1), default=300, show_default=True,
              help="Crops per image (M); `evaluate --soft-labels` trains epoch e on crop e mod M (SRe²L: 300).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the crop positions and flips.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Stored labels are softmax(teacher logits / T); evaluate trains with the same T.")
@click.option("--min-scale", type=click.FloatRange(min=0, max=1, min_open=True), default=0.08, show_default=True,
              help="Smallest crop area, as a share of the image (RandomResizedCrop's scale).")
@click.option("--top-k", type=click.IntRange(min=0),
              help="Store only the K largest probabilities per crop (0: all) [default: all up to 100 classes, else 10].")
@click.option("--name", help="OUT/soft_labels/NAME.safetensors [default: m<crops>-seed<seed>-T<temperature>].")
@click.option("--model", type=click.Choice(MODELS),
              help="auto: the teacher's network; your own weights without vlcp's JSON: how to build them "
                   "[default: auto: any vlcp teacher of the data, else rded's network].")
@click.option("--teacher-epochs", type=click.IntRange(min=1), help="auto: epochs of a teacher vlcp trains [default: 50].")
@click.option("--force", is_flag=True, help="Replace soft labels of the same name.")
@click.option(*RELABEL_LOG_DIR[0], **RELABEL_LOG_DIR[1])
@click.pass_obj
def relabel_cmd(obj: Ctx, out: Path, teacher, data, crops, seed, temperature, min_scale, top_k, name, model,
                teacher_epochs, force, log_dir):
    """Store a teacher's soft labels of CROPS random crops of every image of OUT (a vlcp set, or any folder with
    its classes in OUT/train/) in OUT/soft_labels/NAME.safetensors + .json, for `vlcp evaluate OUT --soft-labels
    NAME`."""
    from vlcp.evaluation import relabel as rl
    from vlcp.evaluation.protocols import EvalError

    try:
        rl.class_dirs(out)
    except (EvalError, OSError) as exc:
        raise usage_error(str(exc)) from None
    from vlcp.store.output import IMAGES_DIR, images_dir

    if images_dir(out) == Path(out):  # soft_labels/ beside the class folders: ImageFolder(OUT) would take it for one
        raise usage_error(f"{out} has its class folders at the top, where soft_labels/ would be read as one more "
                          f"class; move them into {out}/{IMAGES_DIR}/ (the layout vlcp writes) and rerun")
    if teacher != "auto" and not Path(teacher).is_file():
        raise usage_error(f"--teacher {teacher}: neither auto nor a file")
    from vlcp.store.output import set_data

    data = data or set_data(out)
    if not data:
        raise click.UsageError("--data is needed: OUT has no vlcp manifest naming its dataset")
    check_data(data)
    name = name or rl.default_name(crops, seed, temperature)
    if not rl.NAME.match(name):
        raise usage_error(f"--name {name}: use letters, digits, '.', '_' and '-'")
    if any(p.exists() for p in rl.soft_paths(out, name)) and not force:
        raise usage_error(f"{out}/soft_labels/{name}.safetensors exists; pass --force to replace it or --name")
    cfg = rl.RelabelConfig(out=str(out), data=data, teacher=teacher, crops=crops, seed=seed, temperature=temperature,
                        min_scale=min_scale, top_k=top_k, name=name, model=model, teacher_epochs=teacher_epochs,
                        data_dir=str(obj.data_dir), device=obj.device, progress=not obj.quiet)
    from vlcp.store import scalars

    # only a teacher `--teacher auto` trains now logs: one taken from the cache (or a file) trains nothing
    with user_errors(), scalars.logging_to(log_dir, scalars.run_name("relabel", out)) as curves, \
            scalars.section("relabel"):
        rec = rl.relabel(cfg, obj.cache())
    say_where_curves_went(curves, obj.quiet)
    if obj.quiet:
        return
    t, a = rec["teacher"], rec["agreement"]
    click.echo(f"wrote {out}/soft_labels/{name}.safetensors (+ .json): {len(rec['images'])} images x {crops} crops, "
               f"{len(rec['classes'])} classes ({rec['labels']['kind']} float16 labels), T={temperature:g}, "
               f"seed {seed}")
    acc = f", test accuracy {t['accuracy']:.2f}%" if t.get("accuracy") is not None else ""
    click.echo(f"teacher: {t['file'] or t['source']} ({t['model']}{acc})")
    click.echo(f"the teacher's top-1 is the folder's class for {a['crops']:.1f}% of the crops, "
               f"{a['images']:.1f}% of the whole images")
