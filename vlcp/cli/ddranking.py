"""``vlcp ddranking``: DD-Ranking's Label-Robust Score (hard and soft labels) and Augmentation-Robust Score of a
synthetic set, from accuracies vlcp's own evaluation produces (``vlcp.evaluation.ddranking_scores``)."""
from __future__ import annotations

from pathlib import Path

import click

from vlcp.cli.common import Ctx, check_data, table, usage_error, user_errors

SCORES = ("lrs-hard", "lrs-soft", "ars")  # vlcp.evaluation.ddranking_scores.SCORES, without importing numpy here
MODELS = ["convnet3", "convnet6", "resnetap10", "resnet18", "resnet18-modified", "resnet18-bn"]
LABELS = {"hlr": "HLR (pp)", "ior": "IOR (pp)", "alpha": "alpha (x100)", "lrs": "LRS (%)",
          "with_aug": "syn - rdm, with aug (pp)", "without_aug": "syn - rdm, without aug (pp)", "beta": "beta (x100)",
          "ars": "ARS (%)"}


@click.command("ddranking")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dataset", help="The real dataset [default: the one OUT/manifest.json names].")
@click.option("--score", "scores", multiple=True, type=click.Choice(SCORES),
              help="Repeatable [default: all three]. lrs-soft and ars train on a teacher's soft labels.")
@click.option("--protocol", type=click.Choice(["rded", "dc", "minimax"]), default="rded", show_default=True,
              help="vlcp's evaluation protocol of every training (soft labels: rded only).")
@click.option("--model", type=click.Choice(MODELS), help="[default: the protocol's]")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Evaluation runs (DD-Ranking's num_eval): seed i and a fresh random real subset each.")
@click.option("--epochs", type=click.IntRange(min=1), help="[default: the protocol's]")
@click.option("--ipc", type=click.IntRange(min=1), help="Use the first N images per class [default: all; the "
                                                         "random subsets take the smallest class count].")
@click.option("--full-epochs", type=click.IntRange(min=1), help="Epochs on the full real set [default: --epochs].")
@click.option("--full-accuracy", type=click.FloatRange(0, 100),
              help="A known full-data hard-label accuracy, in percent, instead of training on the full set.")
@click.option("--lrs-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="w in alpha = w IOR - (1 - w) HLR (DD-Ranking's lrs_lambda).")
@click.option("--ars-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="gamma in beta = gamma (with aug) + (1 - gamma) (without) (DD-Ranking's ars_lambda).")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False),
              help="Teacher weights (safetensors) [default: as vlcp evaluate --protocol rded].")
@click.option("--teacher-epochs", type=click.IntRange(min=1), help="Epochs of the teacher vlcp trains.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results here (an existing file only with --force).")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
@click.pass_obj
def ddranking(obj: Ctx, out: Path, dataset, scores, protocol, model, runs, epochs, ipc, full_epochs, full_accuracy,
              lrs_weight, ars_weight, teacher, teacher_epochs, json_path, force):
    """DD-Ranking's scores of the synthetic set OUT: LRS with hard labels, LRS with soft labels, ARS.

    The formulas are DD-Ranking's (alpha = w IOR - (1 - w) HLR, LRS = (e^alpha - e^-1) / (e - e^-1); ARS
    alike), on accuracies (as fractions) of vlcp's protocol trained on OUT, on random real subsets of the same
    IPC and on the full real set. Results of a folder vlcp made also go to OUT/evaluations/ddranking-<hash>.json.
    """
    scores = tuple(scores) or SCORES
    if force and not json_path:
        raise usage_error("--force replaces an existing --json file: give --json")
    if json_path and json_path.exists() and not force:  # before the training, as vlcp evaluate
        raise usage_error(f"--json {json_path} exists; pass --force to replace it")
    from vlcp.store.output import set_data

    dataset = dataset or set_data(out)
    if not dataset:
        raise usage_error(f"{out} has no vlcp manifest naming its dataset: pass --dataset")
    check_data(dataset)
    if protocol != "rded" and set(scores) != {"lrs-hard"}:
        raise usage_error(f"--protocol {protocol} has no soft labels: lrs-soft and ars need --protocol rded "
                          "(or ask for --score lrs-hard only)")
    if full_accuracy is not None and full_epochs:
        raise usage_error("--full-accuracy replaces the training --full-epochs sets: give one")
    from vlcp.evaluation import ddranking_scores as ds
    from vlcp.evaluation.evaluate import written_by_vlcp
    from vlcp.store.output import write_json

    cfg = ds.ScoreConfig(out=str(out), data=dataset, data_dir=str(obj.data_dir), protocol=protocol, model=model,
                         runs=runs, epochs=epochs, full_epochs=full_epochs, full_accuracy=full_accuracy, ipc=ipc,
                         scores=scores, lrs_weight=lrs_weight, ars_weight=ars_weight, teacher=teacher,
                         teacher_epochs=teacher_epochs, device=obj.device, progress=not obj.quiet)
    with user_errors():
        res = ds.run(cfg, obj.cache())
    if not obj.quiet:
        p = res["protocol"]
        click.echo(f"{res['dataset']['name']}: {out} ({res['ipc']} per class); {p['name']} {p['model']}, "
                   f"{p['epochs']} epochs, {runs} run(s); {res['trainings']['new']} trained, "
                   f"{res['trainings']['cached']} cached")
        if res["teacher"]:
            click.echo(f"teacher: {res['teacher']['source']}, test accuracy {res['teacher']['accuracy']:.2f}")
        accs = res["accuracies"]
        table([("accuracy (%)", "mean", "per run")] + [
            (k, f"{sum(a[k] for a in accs) / len(accs):.2f}", " ".join(f"{a[k]:.2f}" for a in accs)) for k in accs[0]])
        click.echo("")
    table([("score", "measure", "mean ± std", "per run")] + [
        (s, LABELS[k], f"{v['mean']:.2f} ± {v['std']:.2f}", " ".join(f"{x:.2f}" for x in v["per_run"]))
        for s, parts in res["scores"].items() for k, v in parts.items()])
    if json_path:
        write_json(json_path, res)
    if written_by_vlcp(out):
        path = ds.result_path(out, res)
        try:
            path.parent.mkdir(exist_ok=True)
            write_json(path, res)
        except OSError as exc:  # a read-only folder must not cost the scores just computed
            raise click.ClickException(f"could not save the results in {path.parent}: {exc}") from None
        if not obj.quiet:
            click.echo(f"wrote {path}")
