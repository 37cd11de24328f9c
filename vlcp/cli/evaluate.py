"""``vlcp evaluate`` (train on a distilled folder, test on real images) and ``vlcp baseline`` (the
selection and matching baselines the paper compares with)."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from vlcp.cli.common import (
    Ctx,
    check_data,
    check_model_paths,
    table,
    usage_error,
    user_errors,
)
from vlcp.cli.distill_options import SEED, say_where_curves_went
from vlcp.cli.distill_options import log_dir as log_dir_option

log = logging.getLogger("vlcp")


EVALUATE_LOG_DIR = log_dir_option("evaluate", "loss, lr and training accuracy per epoch and the test accuracy "
                                              "when tested, as evaluate/<protocol>-<model>/run<seed>/..., those "
                                              "of a teacher vlcp trains, and with --caption-fusion the fused "
                                              "classifier's, as evaluate/caption_fusion/run<seed>/...",
                                              "<SYNTH_DIR name>")
BASELINE_LOG_DIR = log_dir_option("baseline", "dm/dc: matching/loss per iteration; herding/kcenter: the feature "
                                              "net's loss, lr and accuracy per epoch")


@click.command()
@click.argument("synth_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, help="The real dataset (its test split is the test set).")
@click.option("--protocol", type=click.Choice(["minimax", "dc", "rded"]),
              help="[default: minimax for ImageNet subsets, rded for ImageNet-1K and CIFAR, dc otherwise]")
@click.option("--model", type=click.Choice(["convnet3", "convnet6", "resnetap10", "resnet18", "resnet18-modified",
                                           "resnet18-bn"]),
              help="[default: resnetap10 (minimax), convnet3 (dc), rded: resnet18-modified (32 px) or resnet18-bn]")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Runs with seeds 0..N-1.")
@click.option("--epochs", type=click.IntRange(min=1), help="[default: the protocol's]")
@click.option("--ipc", type=click.IntRange(min=1), help="Use the first N images per class (sorted by file name).")
@click.option("--aug", type=click.Choice(["dsa", "none", "minimax", "flip", "rded"]), help="[default: the protocol's]")
@click.option("--full", is_flag=True, help="Train on the whole real training set (the upper-bound row).")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False),
              help="rded: teacher weights (safetensors) [default: torchvision's for ImageNet-1K, else trained by vlcp]")
@click.option("--teacher-epochs", type=click.IntRange(min=1), help="rded: epochs of the teacher vlcp trains.")
@click.option("--soft-labels", is_flag=False, flag_value="", default=None, metavar="[NAME]",
              help="Train on the stored crops and soft labels of `vlcp relabel` (SYNTH_DIR/soft_labels/NAME; without "
                   "NAME its only ones): epoch e uses crop e mod M of each image, KL to its label, instead of the "
                   "protocol's augmentation, mixing and labels (put SYNTH_DIR first).")
@click.option("--test-every", type=click.IntRange(min=0), help="Test every N epochs for best-during-training.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write all results here (an existing file only with --force).")
@click.option("--force", is_flag=True, help="Replace an existing --json file.")
@click.option("--caption-fusion", is_flag=True,
              help="Also a separate row (never the headline): a classifier whose head sees [visual features ; CLIP "
                   "text embedding of the image's prompt (vlcp distill folders) or caption]; test images use their "
                   "captions, so it changes the test-time input (vlcp's reading of the multi-modal paper).")
@click.option("--captioner", help="--caption-fusion: captioner (hub id or dir) [default: llava-hf/llava-1.5-7b-hf; "
                                  "tiny with --tiny].")
@click.option("--fusion-caption-prompt",
              help="--caption-fusion: caption prompt, must not contain {CLASSNAME} (distill's prompt names the "
                   "class, test images must not be named) [default: distill's prompt with 'the object' for the class].")
@click.option("--clip", help="--caption-fusion: text encoder, CLIP hub id or dir [default: openai/clip-vit-base-patch32].")
@click.option("--tiny", is_flag=True, help="--caption-fusion: the tiny random LLaVA and CLIP (tests, offline demos).")
@click.option(*EVALUATE_LOG_DIR[0], **EVALUATE_LOG_DIR[1])
@click.pass_obj
def evaluate(obj: Ctx, synth_dir, data, protocol, model, seeds, epochs, ipc, aug, full, teacher, teacher_epochs,
             test_every, json_path, caption_fusion, captioner, fusion_caption_prompt, clip, tiny, log_dir,
             soft_labels, force):
    """Train on a distilled ImageFolder SYNTH_DIR, report top-1 on the real test split.

    The headline number is the accuracy after the last epoch (mean +- std over seeds). The best test
    accuracy among the protocol's own tests (what the Minimax and RDED scripts report) is in its own
    column. Results of a folder vlcp made also go to SYNTH_DIR/evaluations/ (for vlcp report).
    """
    if full == bool(synth_dir):
        raise click.UsageError("give either SYNTH_DIR or --full")
    fusion_opts = {"captioner": captioner, "clip": clip, "fusion_prompt": fusion_caption_prompt, "tiny": tiny or None}
    if not caption_fusion and any(v is not None for v in fusion_opts.values()):
        raise click.UsageError("--captioner, --clip, --fusion-caption-prompt and --tiny apply only with --caption-fusion")
    if soft_labels is not None and not synth_dir:
        raise click.UsageError("--soft-labels are the stored labels of SYNTH_DIR's images: give SYNTH_DIR, not --full")
    ignored = [flag for flag, value in (("--teacher", teacher), ("--teacher-epochs", teacher_epochs), ("--aug", aug))
               if soft_labels is not None and value is not None]
    if ignored:  # the stored crops and labels replace the online teacher and the protocol's augmentation
        raise click.UsageError(f"--soft-labels trains on the stored crops and labels: {', '.join(ignored)} would be "
                               "ignored (relabel with another teacher instead)")
    if force and not json_path:
        raise usage_error("--force replaces an existing --json file: give --json")
    if json_path and json_path.exists() and not force:  # before the training, not after it
        raise usage_error(f"--json {json_path} exists; pass --force to replace it")
    check_data(data)
    check_model_paths(captioner=captioner, clip=clip)
    from vlcp.evaluation import evaluate as ev

    cfg = ev.EvalConfig(data=data, synth_dir=str(synth_dir) if synth_dir else None, full=full,
                        data_dir=obj.data_dir, protocol=protocol, model=model, seeds=seeds, epochs=epochs, ipc=ipc,
                        aug=aug, device=obj.device, teacher=teacher, teacher_epochs=teacher_epochs,
                        test_every=test_every, progress=not obj.quiet, caption_fusion=caption_fusion,
                        captioner=captioner, clip=clip, tiny=tiny, fusion_prompt=fusion_caption_prompt,
                        soft_labels=soft_labels)
    from vlcp.store import scalars

    run = scalars.run_name("evaluate" if synth_dir else "evaluate-full", synth_dir)
    with user_errors(), scalars.logging_to(log_dir, run) as curves, scalars.section("evaluate"):
        res = ev.run(cfg, obj.cache())
    p, a = res["protocol"], res["accuracy"]
    best = a.get("best_during_training")
    rows = [("model", "protocol", "top-1 (final)", res["best_label"], "per seed (final)", "epochs", "seconds"),
            (p["model"], p["name"], mean_std(a),
             mean_std(best) if best else
             "n/a (tested at end only)" if not p["test_every"] else "n/a (no test in its window)",
             " ".join(f"{v:.2f}" for v in a["per_seed"]), str(p["epochs"]), f"{res['seconds']:.1f}")]
    if not obj.quiet:
        what = "full training set" if full else f"{synth_dir} ({res['train_images']} images)"
        t = res["test_split"]
        classes, of = t.get("classes") or [], t.get("dataset_classes")
        sub = f" of the set's {len(classes)} classes (of {of})" if of and len(classes) < of else ""
        click.echo(f"{res['dataset']['name']}: {what}; test: {t['images']} real images{sub}")
        if res["teacher"]:
            click.echo(f"teacher: {res['teacher']['source']}, test accuracy {res['teacher']['accuracy']:.2f}")
        if res.get("soft_labels"):
            s = res["soft_labels"]
            click.echo(f"soft labels: {s['name']} ({s['crops']} crops per image, T={s['temperature']:g}, "
                       f"sha256 {s['sha256'][:12]})")
    table(rows)
    fused = res.get("caption_fusion")
    if fused:
        f = fused["accuracy"]
        click.echo(f"caption fusion ({fused['note']}; {fused['label']}):")
        table([("model", "protocol", "top-1 (final), caption fusion", "per seed (final)"),
                (p["model"], p["name"], mean_std(f), " ".join(f"{v:.2f}" for v in f["per_seed"]))])
    from vlcp.store.output import write_json

    if json_path:
        write_json(json_path, res)
        if not obj.quiet:
            click.echo(f"wrote {json_path}")
    saved = ev.save_in_folder(synth_dir, res) if synth_dir else None
    if saved and not obj.quiet:
        click.echo(f"wrote {saved}")
    if saved:  # the dataset card (OUT/README.md) lists every evaluation: rewritten atomically, distill folders only
        from vlcp.report.card import refresh

        try:
            refresh(synth_dir)
        except OSError as exc:
            log.warning("could not rewrite %s: %s", synth_dir / "README.md", exc)
    if synth_dir and (synth_dir / "report.html").is_file():
        if saved:  # the page shows the new results next to the paper's numbers
            from vlcp.report.html import ReportError, build

            try:
                build(synth_dir)
            except (ReportError, OSError) as exc:
                log.warning("could not rebuild %s: %s", synth_dir / "report.html", exc)
        click.echo(f"report: {synth_dir / 'report.html'}")
    say_where_curves_went(curves, obj.quiet)


@click.command()
@click.option("--method", type=click.Choice(["random", "herding", "kcenter", "dm", "dc"]), required=True,
              help="random/herding/kcenter select real images; dm (distribution matching) and dc (gradient "
                   "matching with DSA) optimise synthetic pixels.")
@click.option("--data", required=True, help="Dataset name or ImageFolder path.")
@click.option("--ipc", type=click.IntRange(min=1), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="random: the sampling seed; dm/dc: initial images, networks, batches, augmentations.")
@click.option("--feature-epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="herding/kcenter: epochs of the ConvNet-3 whose features they use.")
@click.option("--iterations", type=click.IntRange(min=1), help="dm/dc: optimisation iterations [default: dm 20000, dc 1000]")
@click.option("--lr-img", type=float, help="dm/dc: SGD lr of the synthetic pixels [default: dm 1.0, dc 0.1]")
@click.option("--batch-real", type=click.IntRange(min=1), help="dm/dc: real images per class per match [default: 256]")
@click.option("--outer-loop", type=click.IntRange(min=1), help="dc: matches per iteration [default: by IPC, as DC]")
@click.option("--inner-loop", type=click.IntRange(min=1), help="dc: network epochs between matches [default: by IPC]")
@click.option("--lr-net", type=float, help="dc: SGD lr of the network's inner loop [default: 0.01]")
@click.option("--batch-train", type=click.IntRange(min=1), help="dc: inner-loop batch size [default: 256]")
@click.option("--dsa/--no-dsa", default=True, show_default=True, help="dm/dc: siamese DSA augmentation.")
@click.option("--init", type=click.Choice(["real", "noise"]), default="real", show_default=True,
              help="dm/dc: start from random real images (seeded) or Gaussian noise.")
@click.option("--masks", help="dm/dc: match masked real images (masked feature alignment / gradient matching); "
                              "source: threshold (grey data on a flat background) or clipseg (text-prompted CLIPSeg "
                              "masks of the real images, cached per image).")
@click.option("--mask-prompt", help="--masks clipseg: what the segmenter looks for [default: the class name].")
@click.option("--segmenter", help="--masks clipseg: CLIPSeg hub id or directory "
                                  "[default: CIDAS/clipseg-rd64-refined; tiny with --tiny].")
@click.option("--mask-margin", type=float, default=8, show_default=True,
              help="threshold masks: grey levels above the background level that count as object.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="dm/dc: save the optimisation state every N iterations (0: only at the end); a killed run resumes.")
@click.option("--caption-loss", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="dm/dc: weight of caption matching (CLIP: synthetic images vs their class's real captions).")
@click.option("--captions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--caption-loss: JSON {class folder or name: [captions of its real images]}.")
@click.option("--clip", help="--caption-loss: CLIP hub id or directory [default: openai/clip-vit-base-patch32].")
@click.option("--tiny", is_flag=True, help="--caption-loss / --masks clipseg: a tiny random CLIP / CLIPSeg "
                                         "(tests, offline demos).")
@click.option(*BASELINE_LOG_DIR[0], **BASELINE_LOG_DIR[1])
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.pass_obj
def baseline(obj: Ctx, method, data, ipc, out, seed, feature_epochs, force, log_dir, **match):
    """Real-image selection (random, herding, k-center) or optimisation-based distillation (DM, DC) into an
    ImageFolder in the standard layout."""
    check_data(data)
    check_model_paths(segmenter=match["segmenter"], clip=match["clip"])
    from vlcp import __version__
    from vlcp.baselines import selection as baselines
    from vlcp.data.datasets import load_dataset
    from vlcp.store import scalars
    from vlcp.store.output import check_out, publish

    opt_only = [k for k in ("iterations", "lr_img", "batch_real", "outer_loop", "inner_loop", "lr_net", "batch_train",
                            "masks", "captions", "clip", "mask_prompt", "segmenter") if match[k] is not None]
    opt_only += ["caption_loss"] * bool(match["caption_loss"])
    if method not in ("dm", "dc") and opt_only:
        raise click.UsageError(f"--{opt_only[0].replace('_', '-')} applies to --method dm or dc only")
    with user_errors(), scalars.logging_to(log_dir, scalars.run_name("baseline", out)) as curves:
        check_out(out, force)
        ds = load_dataset(data, obj.data_dir, "train")
        manifest = {"vlcp_version": __version__, "baseline": method, "ipc": ipc, "seed": seed}
        try:
            if method in ("dm", "dc"):
                images, manifest["matching"] = _matching(obj, method, ds, data, ipc, seed, match)
            else:
                feats = None
                if method != "random":
                    with scalars.section("feature_net"):  # --log-dir: feature_net/dc-convnet3/run0/loss ...
                        feats = baselines.features(ds, data, obj.cache(), obj.device, feature_epochs, not obj.quiet)
                chosen = baselines.select(method, ds, ipc, seed, feats)
                images = baselines.selected_images(ds, chosen)
                manifest["feature_net"] = None if method == "random" else {"model": "convnet3", "epochs": feature_epochs}
                manifest["sources"] = {ds.classes[c].folder: [ds.samples[i].source for i in idx]
                                       for c, idx in chosen.items()}
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        publish(out, lambda tmp: baselines.write_folder(tmp, ds, images, manifest))
    if not obj.quiet:
        click.echo(f"wrote {out}/: {method}, {ipc} images per class, {len(ds.classes)} classes")
    say_where_curves_went(curves, obj.quiet)


def _matching(obj: Ctx, method, ds, data, ipc, seed, match) -> tuple[dict, dict]:
    """Run (or fetch from the cache) DM/DC; returns the images per class and the manifest's record."""
    from vlcp.baselines import matching
    from vlcp.baselines import selection as baselines

    every = match.pop("checkpoint_every")
    spec = None
    cap = {k: match.pop(k) for k in ("captions", "clip", "tiny")}
    if not match["caption_loss"] and (cap["captions"] or cap["clip"]):
        raise click.UsageError("--captions and --clip apply only with --caption-loss")
    if match["caption_loss"]:
        from vlcp.baselines.caption_losses import CaptionSpec, load_captions

        spec = CaptionSpec(load_captions(cap["captions"], ds.classes), cap["clip"], cap["tiny"])
    seg = {k: match.pop(k) for k in ("segmenter", "mask_prompt")}
    if match["masks"] != "clipseg" and any(v is not None for v in seg.values()):
        raise click.UsageError("--segmenter and --mask-prompt apply only with --masks clipseg")
    if seg["mask_prompt"] is not None and not seg["mask_prompt"].strip():  # as vlcp distill: never silently the name
        raise click.UsageError("--mask-prompt must not be empty (leave it out to segment the class name)")
    if match["masks"] == "clipseg":
        from vlcp.baselines.masks import Segmenter

        match["segmenter"] = Segmenter(seg["segmenter"], cap["tiny"], seg["mask_prompt"])
    try:  # a value the method cannot take (DC's loops for an unpublished IPC, an unknown mask source): usage, 2
        cfg = matching.make_config(method, ipc, seed=seed, **match)
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    res = matching.run(cfg, ds, data, obj.cache(), obj.device, not obj.quiet, every, spec)
    m = res.meta
    if not obj.quiet:
        how = "cached" if res.cached else f"{m['seconds']:.0f} s, {m['seconds_per_iteration']:.3f} s/iteration"
        click.echo(f"{method}: {cfg.iterations} iterations, final loss {m['final_loss']:.4f} ({how})")
    record = {k: v for k, v in m.items() if k != "losses"}
    record.update(cached=res.cached, loss_curve=baselines.loss_curve(m["losses"]))
    return baselines.array_images(res.images, ipc), record


def mean_std(a: dict) -> str:
    """"mean ± std" over the seeds; one seed has no spread to show, so its mean stands alone."""
    if len(a.get("per_seed") or []) == 1:
        return f"{a['mean']:.2f} (1 seed)"
    return f"{a['mean']:.2f} ± {a['std']:.2f}"
