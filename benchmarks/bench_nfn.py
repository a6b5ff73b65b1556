"""Accuracy prediction from weights: equiray's Monomial-NFN vs the `nfn` package's NP and HNP layers and STATNN.

    .venv/bin/python benchmarks/bench_nfn.py [--zoo data/zoo-bench --nets 256 --epochs 100 --seeds 3]
    .venv/bin/python benchmarks/bench_nfn.py --zoo data/zoo-large --zoo-config configs/nfn_zoo_large.yaml \
        --epochs 15 --seeds 5   # the 2,048-net zoo (issue 22; BENCHMARKS.md)

One zoo of Small-CNN-Zoo nets (``equiray nfn zoo``: 4,970-parameter ReLU CNNs, optimizer / learning rate / L2 /
dropout / init scale / training fraction drawn per net; built first with ``--nets`` nets when ``--zoo`` does not
exist), and the same zoo with every net's hidden units permuted and rescaled by factors log-uniform in
[1e-4, 1e4] (functions unchanged: the regime of Tran et al. 2024). Every metanetwork gets the same train / val /
test split of nets, the same training recipe (``equiray.nfn.fit_metanetwork``: MSE on standardised accuracy,
Adam, the epoch with the best validation tau kept) and is scored by Kendall tau on the held-out nets, for
``--seeds`` different splits and initialisations: the mean and its 95% interval over splits, and each
metanetwork against Monomial-NFN + path norms paired split by split ("above / level / below" decided by the
interval, :func:`equiray.stats.compare`). Architectures, as in the papers:

- Monomial-NFN (equiray): 2 monomial-equivariant layers (16 channels), ReLU, the scale-removing invariant pool,
  MLP head; and the same with ``path_norms=True`` (``equiray.nfn.path_norms``: log l1/l2 path norms per class
  and per-layer statistics of the path flow through each hidden unit, exact invariants of the same group, into
  the head);
- NP and HNP (`nfn` package, Zhou et al. 2023): 2 NPLinear / HNPLinear layers (16 channels), ReLU, NPPool /
  HNPPool, the same MLP head;
- STATNN (Unterthiner et al. 2020): 7 statistics per weight and bias tensor, MLP.

Goal (issue): Monomial-NFN matches or beats them on the plain zoo with about 10x fewer parameters than NP/HNP, and
holds its tau on the scaled zoo where they fall.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit, machine

from equiray.nfn import (MonomialNFN, StatNN, count_parameters, fit_metanetwork, kendall_tau, predict)
from equiray.stats import compare, mean_interval

HIDDEN, MLP = 16, (32, 32)


class NFNPeer(nn.Module):
    """The `nfn` package's invariant NFN (NP or HNP): equivariant layers, ReLU, invariant pool, MLP head."""

    def __init__(self, spec, kind: str, hidden: int = HIDDEN, num_layers: int = 2, mlp_hidden=MLP):
        super().__init__()
        from nfn.common import ArraySpec, NetworkSpec
        from nfn.layers import HNPLinear, HNPPool, NPLinear, NPPool, TupleOp

        self.nspec = NetworkSpec([ArraySpec((lay.out_features, lay.in_features, *lay.kernel_size)) for lay in spec.layers],
                                 [ArraySpec((lay.out_features,)) for lay in spec.layers])
        linear, pool = (NPLinear, NPPool) if kind == "np" else (HNPLinear, HNPPool)
        layers, c = [], 1
        for _ in range(num_layers):
            layers += [linear(self.nspec, c, hidden), TupleOp(nn.ReLU())]
            c = hidden
        self.equivariant = nn.Sequential(*layers)
        self.pool = pool(self.nspec)
        dims, d = [], pool.get_num_outs(self.nspec) * hidden
        for h in mlp_hidden:
            dims += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.head = nn.Sequential(*dims, nn.Linear(d, 1))

    def forward(self, features) -> torch.Tensor:
        from nfn.common import WeightSpaceFeatures

        out = self.equivariant(WeightSpaceFeatures(list(features.weights), list(features.biases)))
        return self.head(self.pool(out).flatten(1))


def build(name: str, spec):
    if name == "Monomial-NFN (equiray)":
        return MonomialNFN(spec, group="positive", hidden_channels=HIDDEN, num_layers=2, mlp_hidden=MLP)
    if name == "Monomial-NFN + path norms (equiray)":
        return MonomialNFN(spec, group="positive", hidden_channels=HIDDEN, num_layers=2, mlp_hidden=MLP,
                           path_norms=True)
    if name == "NP (nfn)":
        return NFNPeer(spec, "np")
    if name == "HNP (nfn)":
        return NFNPeer(spec, "hnp")
    return StatNN(spec, mlp_hidden=(64, 64))


MODELS = ("Monomial-NFN (equiray)", "Monomial-NFN + path norms (equiray)", "NP (nfn)", "HNP (nfn)", "STATNN")
REFERENCE = MODELS[1]  # equiray nfn train's default


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", default="data/zoo-bench")
    ap.add_argument("--nets", type=int, default=256, help="zoo size when the zoo must be built first")
    ap.add_argument("--zoo-epochs", type=int, default=1)
    ap.add_argument("--zoo-config", help="build the zoo from this `equiray nfn zoo` config instead (its `out` is "
                                         "replaced by --zoo)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    try:
        import nfn  # noqa: F401
    except ImportError:
        print("the peer is missing: pip install nfn (or pip install -e '.[bench]')", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from equiray_pipelines.nfn import ZooConfig, read_zoo, run_zoo, scaled_zoo, split_nets, zoo_features

    if not Path(args.zoo).exists():
        from equiray.config import load_config

        if args.zoo_config:
            cfg = load_config(ZooConfig, args.zoo_config, overrides=[f"out={args.zoo}"])
        else:
            cfg = load_config(ZooConfig, {"nets": args.nets, "epochs": args.zoo_epochs, "out": args.zoo,
                                          "data": {"max_train": 3000, "max_eval": 1000}})
        print(f"building a zoo of {cfg.nets} nets in {args.zoo} (equiray nfn zoo) ...", flush=True)
        built = run_zoo(cfg)
        print(f"built in {built.seconds / 60:.1f} min; test accuracy {built.test_accuracy}", flush=True)
    rows, states = read_zoo(args.zoo)
    feats, spec, group = zoo_features(states, rows)
    targets = torch.tensor([r["test_accuracy"] for r in rows])
    zoos = {"plain": feats, "scaled": scaled_zoo(feats, spec, group=group, max_scale=1e4, seed=1)}
    results: dict[tuple[str, str], list[dict]] = {}
    for seed in range(args.seeds):
        splits = split_nets(len(rows), test_fraction=0.25, val_fraction=0.15, seed=seed)
        for zoo, f in zoos.items():
            for name in MODELS:
                torch.manual_seed(seed)
                model = build(name, spec)
                fit = fit_metanetwork(model, f, targets, train_idx=splits[0], val_idx=splits[1], epochs=args.epochs,
                                      seed=seed)
                tau = kendall_tau(predict(model, f[splits[2]]), targets[splits[2]])
                results.setdefault((name, zoo), []).append({"tau": tau, "seconds": fit.seconds,
                                                             "params": count_parameters(model)})
                print(f"seed {seed} {zoo:6s} {name:24s} tau {tau:.3f} ({fit.seconds:.1f} s)", flush=True)

    def taus(name, zoo):
        return [r["tau"] for r in results[(name, zoo)]]

    def cell(name, zoo):
        return mean_interval(taus(name, zoo)).format(3)

    def against(name, zoo):  # Monomial-NFN + path norms minus this one, split by split
        if name == REFERENCE:
            return "-"
        diff, verdict = compare(taus(REFERENCE, zoo), taus(name, zoo))
        return f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] {verdict}" if diff.n > 1 else verdict

    ours = results[(MODELS[0], "plain")][0]["params"]
    accs = sorted(float(t) for t in targets)
    lines = [f"Zoo: {len(rows)} nets ({args.zoo}; test accuracy {accs[0]:.1%} / {accs[len(accs) // 2]:.1%} / "
             f"{accs[-1]:.1%} min / median / max), {len(splits[2])} held out per split, {args.seeds} splits; "
             f"{args.epochs} epochs each; Kendall tau on the held-out nets, mean +- 95% interval over splits; "
             f"\"path norms vs\": Monomial-NFN + path norms minus the row, paired by split; {machine()}; "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| metanetwork | parameters | params vs Monomial-NFN | Kendall tau, plain zoo | path norms vs, plain "
             "| Kendall tau, scaled zoo | path norms vs, scaled | training s / fit |", "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        p = results[(name, "plain")][0]["params"]
        secs = statistics.mean(r["seconds"] for z in zoos for r in results[(name, z)])
        lines.append(f"| {name} | {p:,} | {p / ours:.1f}x | {cell(name, 'plain')} | {against(name, 'plain')} | "
                     f"{cell(name, 'scaled')} | {against(name, 'scaled')} | {secs:.1f} |")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
