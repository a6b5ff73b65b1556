"""The demo's Markdown report: every stage's table, plots and readings, written atomically."""
from __future__ import annotations

import os
import time
from pathlib import Path

from equiray_pipelines.demo.config import DemoConfig
from equiray_pipelines.demo.results import DemoResult
from equiray_pipelines.pretrain import PretrainResult


def backbone_table(pre: PretrainResult, group: str) -> str:
    acc = pre.accuracy
    rot = [v for v in acc if v.startswith("rot:")]
    other = [v for v in acc if v != "upright" and not v.startswith("rot:")]
    rows = [("upright test", acc["upright"]),
            (f"{group}-avg (upright + {len(rot)} rotations)", pre.metrics[f"test_{group}_avg_accuracy"])]
    rows += [(f"rotated {v.split(':')[-1]} x {360 // (len(rot) + 1)} deg", acc[v]) for v in rot]
    rows += [(f"corrupted: {v}", acc[v]) for v in other]
    width = max(len(r[0]) for r in rows)
    lines = ["| pretrained backbone".ljust(width + 2) + " | accuracy |", "|" + "-" * (width + 2) + "|----------|"]
    lines += [f"| {name.ljust(width)} | {value * 100:7.2f}% |" for name, value in rows]
    return "\n".join(lines)


def write_report(path: Path, cfg: DemoConfig, meta: dict, out: DemoResult, seconds: float) -> Path:
    """A Markdown report with the tables and the plots (written next to it)."""
    tracking = out.tracking_uri
    demo_run = f", the demo's run `{out.demo_run_id}` (experiment `equiray-demo`)" if out.demo_run_id else ""
    parts = [f"""# equiray demo report

Generated {time.strftime('%Y-%m-%d %H:%M:%S')} in {seconds / 60:.1f} min. MLflow: `{tracking}`{demo_run}.

{_summary_section(out)}
{_environment_section()}
## 1. Data
`{meta['source']}` as Parquet shards in `{cfg.pretrain.data.dir}`: {', '.join(f"{s} {n}" for s, n in meta['rows'].items())}
images of shape {tuple(meta['shape'])} (H, W, C), {meta['num_classes']} classes.
"""]
    if out.pretrain is not None:
        pre = out.pretrain
        epochs = "\n".join(
            f"| {int(r['epoch']) + 1} | {r['train_loss']:.4f} | {r['train_accuracy'] * 100:.2f}% | "
            f"{r['val_accuracy'] * 100:.2f}% | {r['epoch_seconds']:.0f} |" for r in pre.epochs)
        plots = "\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in pre.plots)
        parts.append(f"""## Pretrained backbone (`{pre.registered}`, version {pre.version})
`{cfg.pretrain.model.name}` trained on upright images with Ray Train
({cfg.pretrain.scaling.num_workers} worker(s), {cfg.pretrain.train.epochs} epochs), run `{pre.run_name}`.

| epoch | train loss | train acc | val acc | seconds |
|---|---|---|---|---|
{epochs}

{backbone_table(pre, cfg.pretrain.eval.group)}

The backbone is accurate on upright images and loses much of it on rotated ones: that gap is what the
rest of equiray closes.

{plots}
""")
    if out.ensemble is not None and out.ensemble_eval is not None:
        e, tr, ev = cfg.ensemble, out.ensemble, out.ensemble_eval
        parts.append(f"""## Augmentation ensembles (`{tr.registered}`, version {tr.version})
{len(e.settings)} settings x {e.members} members of `{e.member.name}` ({e.member.kwargs}), {e.train.epochs} epochs on
{e.data.max_train or 'all'} training images at {e.data.resize or meta['shape'][0]}px, group {e.group}; run
`{tr.run_id}`. Invariance of the ensemble mean vs ensemble size (bootstrap, {e.eval.repeats} subsets per size),
in distribution (test set) and off-manifold ({e.eval.off_manifold}):

![ensemble_invariance](ensemble_invariance.png)

{ev.table}

{chr(10).join(ev.verdict)}
""")
    if out.distill is not None:
        d = out.distill
        parts.append(f"""## Distilled student (`{d.registered}`, version {d.version})
One `{cfg.distill.student.name}` trained to match the ensemble mean on {cfg.distill.group or cfg.ensemble.group}-
group-transformed inputs; the same measures, and the serving cost (the student is {d.speedup:.1f}x cheaper):

{d.table}
""")
    if out.canon is not None:
        c, can = cfg.canon, out.canon
        curve = ("\nAccuracy vs rotation angle (every test image turned by the same angle):\n\n"
                 "![canon_angles](canon_angles.png)\n") if any(p.endswith("canon_angles.png") for p in can.plots) else ""
        parts.append(f"""## Canonicalization adapters (`{can.registered}`, version {can.version})
{len(can.rows)} variants around `{c.backbone}`, each a Ray Tune trial and an MLflow run (sweep run
`{can.run_id}`): fine-tuned {c.train.epochs} epochs on {c.data.max_train or 'all'} upright training images;
accuracy on the upright test set and averaged over its {c.eval_group} rotations ({c.data.max_eval or 'all'} images);
identity rate = share of upright test images the canonicalizer leaves as they are; ms per image on a batch of
{c.latency_batch}, every model timed in the same process. SO(2)-avg: every test image at its own random angle;
O(2)-avg: after a random mirror too. Champion: **{can.champion}**.

![canon_variants](canon_variants.png)
{curve}
{can.table}

{chr(10).join(can.verdict)}
""")
    if out.any_angle is not None:
        parts.append(_any_angle_section(cfg, out.any_angle))
    if out.ftp is not None:
        f, ft = cfg.ftp, out.ftp
        parts.append(f"""## Robust fine-tuning (`{ft.registered}`, version {ft.version})
`{f.backbone}` fine-tuned on {f.task.train_images} labelled `{f.task.target_view}` images (the ID target domain)
with a new head; {len(ft.rows)} Ray Tune trials over {', '.join(f.space.methods)}, up to {f.train.epochs} epochs,
ASHA early stopping, selected on ID validation accuracy only (search run `{ft.run_id}`). OOD: the test set
under {', '.join(f.task.ood_views)}. Champion: **{ft.champion.method}** (ID val
{ft.champion.val_accuracy * 100:.1f}%).

![ftp_trials](ftp_trials.png)

{ft.table}

{chr(10).join(ft.verdict)}
""")
    if out.nfn is not None:
        nf, n = out.nfn, cfg.nfn
        parts.append(f"""## Monomial-NFN (`{nf.train.registered}`, version {nf.train.version})
A zoo of {nf.zoo_nets} Small-CNN-Zoo nets (4,970 parameters; optimizer, learning rate, L2, dropout, init scale and
training fraction drawn per net), trained {n.zoo.epochs} epoch(s) on {n.zoo.data.max_train} images as vectorized Ray
tasks. Metanetworks predict each net's test accuracy from its weights; Kendall tau on the
{round(nf.zoo_nets * n.train.test_fraction)} held-out nets, on the plain zoo and on the same zoo with every hidden
unit rescaled by a random factor in [1e-4, 1e4] (the same functions):

![nfn_scatter](nfn_scatter.png)

{nf.train.table}

{chr(10).join(nf.train.verdict)}
""")
        if nf.members is not None and nf.selection is not None:
            parts.append(f"""### Reading the ensemble's members
The ensemble's members as a zoo (accuracy on the validation split), a sign-flip Monomial-NFN over them
(`{nf.members.registered}`), and `ensemble eval --select-by nfn`: the {int(n.drop_fraction * 100)}% of members
predicted weakest are left out of the average (test set; random subsets of the same size as the control):

{nf.members.table}

{nf.selection.table}

{chr(10).join(nf.selection.verdict)}
""")
    if out.robust is not None:
        parts.append(_robust_section(cfg, out.robust))
    if out.serve is not None:
        srv = out.serve
        parts.append(f"""## Online serving (`{srv.model}`, version {srv.version})
Ray Serve hosted the model at `{srv.url}` for {srv.seconds:.0f} s: {srv.requests} HTTP requests (the
upright test images as multipart PNG files, each rotation as JSON pixel arrays, one raw PNG body), then shut
down. `equiray serve run --model {srv.model}` keeps it running (README, "Serve a model").

{srv.table}
""")
    if out.stage_seconds:
        parts.append(_costs_section(out.stage_seconds, seconds))
    tmp = path.with_suffix(".md.partial")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path


def _any_angle_section(cfg: DemoConfig, aa) -> str:
    """The any-angle recipe: what it trains and its sweep's row."""
    a, t = cfg.any_angle, cfg.any_angle.train
    recipe = next((v.name for v in a.variants() if v.canonicalized), aa.champion)
    beside = ""
    if a.baselines:
        beside = (f" Beside it, on the same turned inputs, the backbone fine-tuned alone for "
                  f"{t.baseline_epochs or t.epochs} epochs ({', '.join(v.name for v in a.variants() if not v.canonicalized)})")
        beside += (f", and the mixture of the two: their class probabilities averaged, {a.mix_weight:g} on the "
                   "canonicalized one (the canonicalizer misreads some upright images, the baseline is weaker at odd "
                   "angles: they err on different images)" + (_tta_words(a.mix_tta) if a.mix_tta else "") + "."
                   if a.mix else ".")
    return f"""## Any angle, any mirror (`{aa.registered}`, version {aa.version}: {aa.champion})
{recipe}: the canonicalizer reads a continuous pose (any angle, and a mirror) off {a.data.max_train or 'all'}
training images, each turned by a random angle after a random mirror ({t.upright_share:.0%} left upright), for
{t.pose_epochs} epochs; then {'the backbone alone' if t.freeze_pose else 'both'} for {t.epochs} epochs on the inputs
turned back.{beside} The first {a.data.max_eval or 'all'} test images; the robust stage judges every row on all of
them, beside every other candidate. Sweep run `{aa.run_id}`.

{aa.table}
"""


def _tta_words(mix_tta) -> str:
    """How the mixture's members are read at test time, in words."""
    from equiray.models.orbit import coset_representatives, parse_orbit
    from equiray.groups import get_group

    def pose(g, e: int) -> str:
        turn, mirror = int(g.rotation(e)) * 360 / g.n, int(g.reflection(e))
        said = ([f"turned {turn:g} deg"] if turn else []) + (["mirrored"] if mirror else [])
        return " and ".join(said) or "as it came"

    def words(orbit: str) -> str:
        parsed = parse_orbit(orbit)
        if parsed is None:
            return "as it came"
        g = get_group(parsed[0])
        reps = coset_representatives(g, get_group(parsed[1]) if parsed[1] else None).tolist()
        return f"{', '.join(pose(g, e) for e in reps[:-1])} and {pose(g, reps[-1])} ({orbit})"

    return (f"; at test time the members also read transformed copies of every input, each member's probabilities "
            f"averaged over its copies: the canonicalized one {words(mix_tta[0])}, the baseline {words(mix_tta[1])}")


def _robust_section(cfg: DemoConfig, rb) -> str:
    """The robust champion: every candidate's row, the verdict, the curve."""
    r = cfg.robust
    curve = f"![robust_angles]({Path(rb.plot).name})\n" if rb.plot else ""
    return f"""## The robust champion (`{rb.registered}`, version {rb.version})
Every candidate judged the same way (`equiray robust`): the test set upright, mirrored, at a uniformly random
angle per image (SO(2)) and after a random mirror too (O(2)); the {r.cn_group} grid and the curve (every
{r.curve_step:g} degrees) read the first {r.curve_images} test images. The rule: the best SO(2) accuracy among the
candidates whose upright accuracy is within {r.upright_tolerance:g} point of the backbone's; SO(2) accuracies within
{r.so2_level:g} point of the best count as level (one seed's noise), and the better upright of those wins. Accuracies in %;
ms per image on a batch of {r.latency_batch} on this machine, next to the backbone.

{rb.table}

{chr(10).join(rb.verdict)}

{curve}"""


def _summary_section(out: DemoResult) -> str:
    """What the demo trained and serves, in a few lines, and where each stage's run is."""
    lines = ["## Summary"]
    rb = out.robust
    if rb is not None and rb.rows:
        best = next((r for r in rb.rows if r["name"] == rb.champion), None)
        if best is not None:
            bb = rb.backbone
            lines.append(
                f"**Served by default: `{rb.registered}`** (version {rb.version}, the candidate `{rb.champion}`): "
                f"{100 * best['upright_accuracy']:.2f}% upright, {100 * best['so2_accuracy']:.2f}% at a random angle "
                f"(SO(2)), {100 * best['o2_accuracy']:.2f}% after a random mirror too (O(2)) on the test set, one "
                f"seed; the upright-trained backbone reads {100 * bb['upright_accuracy']:.2f}% / "
                f"{100 * bb['so2_accuracy']:.2f}% / {100 * bb['o2_accuracy']:.2f}%. "
                + ("It keeps the backbone's upright accuracy within the rule's tolerance." if rb.rule_met else
                   "No candidate kept the backbone's upright accuracy within the rule's tolerance: it is the best "
                   "SO(2) of all."))
    if out.serve is not None:
        lines.append(f"The Serve endpoint answered {out.serve.requests} HTTP requests with `{out.serve.model}` "
                     f"(version {out.serve.version}) in {out.serve.seconds:.1f} s.")
    runs = dict(out.stage_runs())
    registered = out.registering_stages()
    if registered:
        lines += ["", "| model registered | version | made by the run | temperature (fitted on) | ECE upright: raw -> "
                  "calibrated | ECE SO(2): raw -> calibrated |", "|---|---:|---|---|---|---|"]
        lines += [f"| `{r.registered}` | {r.version} | {stage} `{runs.get(stage, '-')}` | {_calibration_cells(r.calibration)} |"
                  for stage, r in registered]
        if any(r.calibration for _, r in registered):
            lines += ["", "Every classifier is registered with a softmax temperature fitted on the validation split "
                          "under the inputs it was trained for; the endpoint divides its logits by it. ECE (15 bins) "
                          "on the test split, before and after."]
    lines.append("")
    return "\n".join(lines)


def _calibration_cells(cal) -> str:
    """A registered version's temperature and ECE before -> after (upright, SO(2)) as three table cells."""
    if not cal:
        return "- | - | -"
    from equiray.data.views import describe_view

    ece = " | ".join(f"{100 * cal[f'{v}_ece_before']:.1f}% -> {100 * cal[f'{v}_ece_after']:.1f}%"
                     if f"{v}_ece_before" in cal else "-" for v in ("upright", "so2"))
    where = f" ({describe_view(str(cal['view']))})" if "view" in cal else ""
    return f"{cal['temperature']:.2f}{where} | {ece}"


def _environment_section() -> str:
    """The code and the machine behind the numbers (the stage runs carry the same as tags)."""
    import os
    import platform

    from equiray_pipelines.tracking import source_tags

    tags = source_tags()
    commit = tags.get("mlflow.source.git.commit")
    code = (f"commit `{commit[:12]}`" + (" with uncommitted changes" if tags.get("equiray.git.dirty") == "true" else "")
            if commit else "not a git checkout")
    return (f"Environment: equiray {tags['equiray.version']} ({code}); Python {tags['python.version']}, torch "
            f"{tags['torch.version']}, Ray {tags['ray.version']}, MLflow {tags['mlflow.version']}; "
            f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs. Seeds: each stage's config "
            "(`train.seed`, 0 unless set; the robust views' `seed`).\n")


def _costs_section(stage_seconds, seconds: float) -> str:
    """Wall time per stage."""
    rows = "\n".join(f"| {stage} | {sec / 60:.1f} |" for stage, sec in stage_seconds)
    return f"""## What each stage cost
Wall time on this machine (a reused stage costs only its look-up and report):

| stage | minutes |
|---|---:|
{rows}
| all | {seconds / 60:.1f} |
"""
