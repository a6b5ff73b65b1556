"""The any-angle recipe against plain rotation augmentation, over training seeds, with 95% intervals (issue 18).

Both start from the registered backbone and see the full training split turned by a uniformly random angle after a
random mirror (the recipe's ``upright_share`` of them left upright): the recipe (``configs/canon_any_angle_fast.yaml``,
what ``make demo`` trains: a D8 canonicalizer's continuous pose, then the backbone on the inputs turned back) and
the plainest peer, the backbone fine-tuned on the turned images (AdamW, one-cycle to ``--baseline-lr``, as many
epochs as the recipe trains in all, or ``--baseline-epochs``), and the two mixed in probability (what the demo
serves: ``mix: true``). Every seed trains both (seed s seeds the batch order and the rotation draws of both, paired
in the comparison); the test views are fixed (seed 0), so the intervals say what a retraining
changes. Judged on the full test set upright, at a uniformly random angle (SO(2)) and after a random mirror too
(O(2)); the verdicts come from the intervals (:mod:`equiray.stats`).

    .venv/bin/python benchmarks/bench_any_angle.py [--seeds 3] [--config configs/canon_any_angle_fast.yaml]
        [--baseline-lr 2e-3] [--baseline-epochs 6[,8..]] [--mix-weight 0.5] [--tta D16/D8,D1 [--tta ,D1 ...]]
        [--out table.md] [--first-seed 3] [--save seeds.json]
    .venv/bin/python benchmarks/bench_any_angle.py --load a.json --load b.json [the same options]   # pooled seeds

``--tta RECIPE,BASELINE`` (repeatable) also judges the mixture with its members averaged at test time (``GROUP`` or
``GROUP/SUBGROUP``: one copy per coset, :class:`equiray.models.OrbitAveraged`; empty: that member as it is),
paired with the plain mixture on the same trained members. ``--baseline-epochs 6,8`` trains one baseline per count
on every seed (the recipe once) and pairs each mixture with the first count's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, machine  # noqa: E402

VIEWS = ("upright", "so2", "o2")
GOALS = {"upright": 90.0, "so2": 87.0, "o2": 85.0}  # issue 18


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/canon_any_angle_fast.yaml", help="the recipe (a canon config)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (>= 2 for an interval)")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds are FIRST .. FIRST + SEEDS - 1")
    parser.add_argument("--save", help="also write every seed's accuracies to this JSON file")
    parser.add_argument("--load", action="append", default=[],
                        help="train nothing: pool the seeds saved by earlier runs (--save) with the same options, "
                             "and print their table (repeatable)")
    parser.add_argument("--baseline-lr", type=float, default=2e-3, help="the augmentation baseline's peak rate")
    parser.add_argument("--baseline-epochs", help="the baseline's epochs, or several comma-separated (default: as many "
                        "as the recipe trains in all)")
    parser.add_argument("--mix-weight", type=float, default=0.5,
                        help="the recipe's share of the mixture's probabilities (the other: the baseline's)")
    parser.add_argument("--tta", action="append", default=[], help="RECIPE,BASELINE test-time averaging of the mixture's members, each GROUP or "
                        "GROUP/SUBGROUP or empty (e.g. D16/D8,D1: the recipe also at the half step of its D8 grid, "
                        "the baseline also mirrored)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-train", type=int, help="train on the first N images only (a quick check of the script)")
    parser.add_argument("--max-eval", type=int, help="judge on the first N test images only")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)

    import mlflow

    from equiray.canon import Variant, build_variant, train_variant
    from equiray.config import load_config
    from equiray.data.views import apply_view
    from equiray.errors import ConfigError
    from equiray.models import Mixture, averaged
    from equiray.models.orbit import parse_orbit
    from equiray.stats import compare, mean_interval
    from equiray.train import accuracy, predict
    from equiray_pipelines import tracking
    from equiray_pipelines.canon import CanonConfig
    from equiray_pipelines.canon.stage import load_data

    torch.set_num_threads(args.threads)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    cfg = load_config(CanonConfig, args.config)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_train=args.max_train,
                                                            max_eval=args.max_eval))
    try:
        backbone, spec = tracking.load_model(cfg.backbone)
    except Exception as e:  # noqa: BLE001 - one line, what to do next
        print(f"error: cannot load {cfg.backbone} ({e}); run `make demo` (or `equiray pretrain`) first",
              file=sys.stderr)
        return 2
    x, y, xt, yt = load_data(cfg)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    views = {v: apply_view(xt, v, seed=0) for v in VIEWS}

    def judge(model) -> dict[str, float]:
        model.eval()
        return {v: 100 * accuracy(predict(model, xv, batch_size=512), yt) for v, xv in views.items()}

    variants = [v for v in cfg.variants() if v.canonicalized]
    if len(variants) != 1:
        print(f"error: {args.config} defines {len(variants)} canonicalized variants; the recipe is one (narrow its "
              f"grid)", file=sys.stderr)
        return 2
    recipe = variants[0]
    total = cfg.train.total_epochs(recipe)
    try:
        counts = [int(e) for e in args.baseline_epochs.split(",")] if args.baseline_epochs else [total]
        if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
            raise ValueError
    except ValueError:
        print(f"error: --baseline-epochs {args.baseline_epochs!r}: distinct whole numbers >= 1, comma-separated "
              f"(e.g. 6,8)", file=sys.stderr)
        return 2
    several = len(counts) > 1

    def named(text: str, epochs: int) -> str:  # a row per baseline count when there are several
        return f"{text}, {epochs}-epoch baseline" if several else text

    baselines = {e: Variant(name=f"fine-tune + O(2) aug ({e} epochs, one-cycle to {args.baseline_lr:g})",
                            kind="none", group=recipe.group, prior_weight=0.0, backbone="finetune", rotations="o2")
                 for e in counts}
    ttas = []  # (recipe's, baseline's) test-time averaging, one pair per --tta
    for text in args.tta:
        pair = [t.strip() or None for t in text.split(",")]
        try:
            if len(pair) != 2:
                raise ConfigError("two entries, RECIPE,BASELINE (e.g. D16/D8,D1)")
            for t in pair:
                parse_orbit(t)
        except ConfigError as e:
            print(f"error: --tta {text!r}: {e}", file=sys.stderr)
            return 2
        ttas.append(tuple(pair))

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results: dict[str, list[dict]] = {"backbone": [judge(backbone)]} if not args.load else {}
    if args.load:
        seeds = []
    for path in args.load:  # earlier runs' seeds, pooled (the backbone row is the same in each: keep one)
        saved = json.loads(Path(path).read_text())
        clash = set(saved["seeds"]) & set(seeds)
        if clash:
            print(f"error: --load {path}: seeds {sorted(clash)} were loaded already", file=sys.stderr)
            return 2
        seeds += saved["seeds"]
        for name, rows in saved["results"].items():
            if name == "backbone":
                results.setdefault(name, rows)
            else:
                results.setdefault(name, []).extend(rows)
    started, runs, done = time.perf_counter(), (1 + len(counts)) * len(seeds), 0
    plain = f"mixture ({args.mix_weight:g} on the recipe)"  # the two models' probabilities averaged
    tta_names = {t: f"mixture, members averaged (recipe {t[0] or 'as is'}, baseline {t[1] or 'as is'})"
                 for t in ttas}  # each member's probabilities averaged over copies of the input, then mixed
    mixtures = {e: [(named(plain, e), (None, None)), *((named(n, e), t) for t, n in tta_names.items())]
                for e in counts}

    def train(variant, train_cfg, seed):
        nonlocal done
        t = dataclasses.replace(train_cfg, seed=seed)
        model, _ = build_variant(variant, spec, state, beta=t.beta, pose_snap=t.pose_snap,
                                 upright_backbone=t.upright_backbone and variant.canonicalized, seed=seed,
                                 canonicalizer_kwargs=cfg.canonicalizers.kwargs(variant.kind)
                                 if variant.canonicalized else None)
        train_variant(model, variant, x, y, **t.options(variant))
        row = judge(model)
        results.setdefault(variant.name, []).append(row)
        done += 1
        eta = (time.perf_counter() - started) / done * (runs - done)
        print(f"[{done}/{runs}] seed {seed} {variant.name}: " + ", ".join(f"{v} {row[v]:.2f}" for v in VIEWS)
              + f" (ETA {eta / 60:.1f} min)", file=sys.stderr, flush=True)
        return model

    for seed in seeds if not args.load else ():
        recipe_model = train(recipe, cfg.train, seed)
        for epochs, baseline in baselines.items():
            base_train = dataclasses.replace(cfg.train, baseline_epochs=epochs, baseline_lr=args.baseline_lr,
                                             pose_epochs=0, freeze_pose=False)
            baseline_model = train(baseline, base_train, seed)
            # the mixtures the demo serves (`mix: true`, `mix_tta`): no training of their own
            for name, (on_recipe, on_baseline) in mixtures[epochs]:
                row = judge(Mixture([averaged(recipe_model, on_recipe), averaged(baseline_model, on_baseline)],
                                    [args.mix_weight, 1 - args.mix_weight]))
                results.setdefault(name, []).append(row)
                print(f"seed {seed} {name}: " + ", ".join(f"{v} {row[v]:.2f}" for v in VIEWS), file=sys.stderr,
                      flush=True)

    def cells(name):
        ivs = [mean_interval([r[v] for r in results[name]]) for v in VIEWS]
        return [iv.format() if iv.n < 2 else f"{iv.mean:.2f} +- {iv.half_width:.2f}" for iv in ivs]

    if args.save:
        Path(args.save).write_text(json.dumps({"seeds": seeds, "results": results}, indent=1))
    missing = [n for n in (recipe.name, *(b.name for b in baselines.values())) if n not in results]
    if missing:
        print(f"error: no rows for {missing} (the loaded runs had other options)", file=sys.stderr)
        return 2
    bb = results["backbone"][0]
    mixture_rows = [name for e in counts for name, _ in mixtures[e]]
    lines = [
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_any_angle.py "
        f"{' '.join(f'--load {p}' for p in args.load) or f'--seeds {args.seeds}'}"
        f"{f' --first-seed {args.first_seed}' if args.first_seed and not args.load else ''} "
        f"--config {args.config} --baseline-lr {args.baseline_lr:g}"
        f"{f' --baseline-epochs {args.baseline_epochs}' if args.baseline_epochs else ''} --mix-weight {args.mix_weight:g}"
        f"{''.join(f' --tta {t}' for t in args.tta)}"
        f"{f' --max-train {args.max_train}' if args.max_train else ''}"
        f"{f' --max-eval {args.max_eval}' if args.max_eval else ''}`. Backbone: {cfg.backbone}; {len(x):,} training "
        f"images turned by a random angle after a random mirror ({cfg.train.upright_share:.0%} left upright); "
        f"{len(xt):,} test images, views fixed (seed 0); "
        f"accuracy in % as the mean over {len(seeds)} training seeds ({', '.join(map(str, seeds))}) +- the 95% "
        f"interval (Student t).", "",
        "| model | upright | SO(2) | O(2) |", "|---|---|---|---|",
        f"| backbone, upright-trained (no seeds) | {bb['upright']:.2f} | {bb['so2']:.2f} | {bb['o2']:.2f} |",
        f"| {recipe.name} (the recipe, {total} epochs in all) | " + " | ".join(cells(recipe.name)) + " |",
        *(f"| {b.name} | " + " | ".join(cells(b.name)) + " |" for b in baselines.values()),
        *(f"| {n} | " + " | ".join(cells(n)) + " |" for n in mixture_rows), "",
        "| comparison | upright | SO(2) | O(2) |", "|---|---|---|---|"]
    pairs = []
    for e, b in baselines.items():
        mix = named(plain, e)
        pairs += [(named("recipe - augmentation", e), recipe.name, b.name), (f"{mix} - recipe", mix, recipe.name),
                  (f"{mix} - augmentation", mix, b.name),
                  *((f"{name} - {mix}", name, mix) for name, _ in mixtures[e][1:])]
    for e in counts[1:]:  # each count's mixtures against the first count's
        pairs += [(f"{name} - {first}", name, first)
                  for (name, _), (first, _) in zip(mixtures[e], mixtures[counts[0]])]
    for label, a, b in pairs:
        diffs = [compare([r[v] for r in results[a]], [r[v] for r in results[b]]) for v in VIEWS]
        lines.append(f"| {label} (paired by seed) | "
                     + " | ".join(f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]: {verdict}" for d, verdict in diffs)
                     + " |")
    for name in (recipe.name, *mixture_rows):
        label = "recipe" if name == recipe.name else name
        goal = []
        for v in VIEWS:
            iv = mean_interval([r[v] for r in results[name]])
            verdict = ("one run" if iv.n < 2 else "above" if iv.low > GOALS[v] else "below" if iv.high < GOALS[v]
                       else "level")
            goal.append(f"{iv.mean - GOALS[v]:+.2f} vs {GOALS[v]:g}: {verdict}")
        lines.append(f"| {label} against the issue's goal | " + " | ".join(goal) + " |")
        rule = mean_interval([r["upright"] - bb["upright"] for r in results[name]])
        lines.append(f"| {label} upright - backbone upright (the champion rule: within 1 point) | "
                     f"{rule.mean:+.2f} [{rule.low:+.2f}, {rule.high:+.2f}] | | |")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
