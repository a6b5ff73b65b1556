"""What ``equiray nfn train`` shows: the Kendall-tau table, one verdict line per (zoo, baseline), the taus by
``metanetwork/zoo``, and the predicted-vs-true scatter plot of the held-out nets."""
from __future__ import annotations

import tempfile
from pathlib import Path

from equiray_pipelines.nfn.config import ZOOS
from equiray_pipelines.nfn.metanet import MetanetworkFit


def tau_table(fits: list[MetanetworkFit]) -> str:
    """One row per metanetwork: parameters, held-out Kendall tau per zoo, training seconds over the zoos."""
    zoos = [z for z in ZOOS if any(f.zoo == z for f in fits)]
    names = list(dict.fromkeys(f.name for f in fits))
    get = {(f.name, f.zoo): f for f in fits}
    lines = ["| metanetwork | parameters | " + " | ".join(f"Kendall tau, {z} zoo" for z in zoos) +
             " | training s |", "|---|---|" + "---|" * len(zoos) + "---|"]
    for n in names:
        some = next(f for f in fits if f.name == n)
        taus = " | ".join(f"{get[(n, z)].test_tau:.3f}" if (n, z) in get else "-" for z in zoos)
        secs = sum(f.seconds for f in fits if f.name == n)
        lines.append(f"| {n} | {some.params:,} | {taus} | {secs:.0f} |")
    return "\n".join(lines)


def taus(fits: list[MetanetworkFit]) -> dict[str, float]:
    """Held-out Kendall tau by ``"metanetwork/zoo"``."""
    return {f"{f.name}/{f.zoo}": f.test_tau for f in fits}


def verdict(fits: list[MetanetworkFit]) -> tuple[str, ...]:
    """Per zoo and baseline: does Monomial-NFN match or beat it (within 0.01 tau)?"""
    zoos = [z for z in ZOOS if any(f.zoo == z for f in fits)]
    names = list(dict.fromkeys(f.name for f in fits))
    get = {(f.name, f.zoo): f for f in fits}
    lines = []
    if "monomial-nfn" in names and "plain" in zoos:
        others = [n for n in names if n != "monomial-nfn"]
        for z in zoos:
            mine = get[("monomial-nfn", z)].test_tau
            for o in others:
                theirs = get[(o, z)].test_tau
                lines.append(f"{z} zoo: Monomial-NFN tau {mine:.3f} vs {o} {theirs:.3f} "
                             f"({'matches or beats' if mine >= theirs - 0.01 else 'below'})")
    return tuple(lines)


def panel_range(true: list[float]) -> tuple[float, float]:
    """A scatter panel's axes (both the same): the true accuracies' range and 5% of it either side, so predictions
    far outside it (an unfit metanetwork's, 1e7 on a rescaled zoo) do not squash every point into a corner."""
    lo, hi = min(true), max(true)
    pad = 0.05 * (hi - lo) or 1.0
    return lo - pad, hi + pad


def scatter(fits: list[MetanetworkFit], report_dir) -> Path:
    """``nfn_scatter.png`` in ``report_dir`` (or a temporary folder): one panel per (zoo, metanetwork)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zoos = list(dict.fromkeys(f.zoo for f in fits))
    names = list(dict.fromkeys(f.name for f in fits))
    fig, axes = plt.subplots(len(zoos), len(names), figsize=(3.6 * len(names), 3.4 * len(zoos)), squeeze=False)
    for f in fits:
        ax = axes[zoos.index(f.zoo)][names.index(f.name)]
        true, pred = [100 * t for t in f.true], [100 * p for p in f.pred]
        lo, hi = panel_range(true)
        shown = [min(max(p, lo), hi) for p in pred]  # off the chart: drawn at its edge, in red
        off = [p != q for p, q in zip(pred, shown)]
        ax.scatter([t for t, o in zip(true, off) if not o], [q for q, o in zip(shown, off) if not o], s=14, alpha=0.8)
        if any(off):
            ax.scatter([t for t, o in zip(true, off) if o], [q for q, o in zip(shown, off) if o], s=14, marker="x",
                       color="tab:red")
            worst = max((p for p, o in zip(pred, off) if o), key=abs)
            ax.text(0.03, 0.97, f"{sum(off)} of {len(pred)} predictions off the chart (x, at its edge; up to "
                    f"{worst:.3g}%)", transform=ax.transAxes, va="top", fontsize=7, color="tab:red", wrap=True)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"{f.name}, {f.zoo} zoo: tau {f.test_tau:.3f}", fontsize=9)
        ax.set_xlabel("true test accuracy (%)")
        ax.set_ylabel("predicted test accuracy (%)")
    fig.suptitle("Held-out nets: accuracy predicted from weights", fontsize=10)
    fig.tight_layout()
    out_dir = Path(report_dir) if report_dir else Path(tempfile.mkdtemp(prefix="equiray-plots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "nfn_scatter.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
