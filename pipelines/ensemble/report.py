"""The ensemble pipeline's tables, verdicts and plot: what ``equiray ensemble eval`` prints and the report quotes."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def slug(name: str) -> str:
    """``name`` as a metric-key part: every non-alphanumeric character an underscore."""
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def plot_curves(rows: Sequence[dict], path: Path, group: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for col, metric in enumerate(("osp", "kl")):
        for row_i, where in enumerate(("in-distribution", "off-manifold")):
            ax = axes[row_i, col]
            for setting in dict.fromkeys(r["setting"] for r in rows):
                pts = [r for r in rows if r["setting"] == setting and r["data"] == where]
                if not pts:
                    continue
                xs = [p["size"] for p in pts]
                ys = [p[metric] for p in pts]
                err = [p[f"{metric}_std"] for p in pts]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=setting)
            ax.set_xscale("log")
            ax.set(title=f"{'OSP (higher = more invariant)' if metric == 'osp' else 'symmetric KL (lower = more invariant)'}"
                         f"\n{where}", xlabel="ensemble size", ylabel=metric.upper())
            if metric == "kl":
                ax.set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Invariance of the ensemble mean under {group} vs ensemble size (bootstrap mean +- std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# the symmetric KL both ways (equiray.metrics): over the non-identity elements, and over all |G| as the paper's code
KL_HEADER = "sym. KL (g != e) | sym. KL (all g, the paper's)"


def _kl(row: dict) -> str:
    paper = row.get("kl_all", row["kl"] * (row["orbit_size"] - 1) / row["orbit_size"])  # rows from before kl_all
    return f"{row['kl']:.4f} | {paper:.4f}"


def results_table(rows: Sequence[dict]) -> str:
    """Markdown: per setting, single member vs the whole ensemble, in and off distribution."""
    out = [f"| setting | data | size | accuracy | orbit accuracy | OSP | {KL_HEADER} |", "|---|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for where in ("in-distribution", "off-manifold"):
            pts = [r for r in rows if r["setting"] == setting and r["data"] == where]
            for p in (pts[0], pts[-1]) if len(pts) > 1 else pts:
                acc = f"{p['accuracy'] * 100:.1f}%" if "accuracy" in p else "-"
                oacc = f"{p['orbit_accuracy'] * 100:.1f}%" if "orbit_accuracy" in p else "-"
                out.append(f"| {setting} | {where} | {p['size']} | {acc} | {oacc} | {p['osp']:.3f} / {p['orbit_size']} "
                           f"| {_kl(p)} |")
    return "\n".join(out)


def verdict(rows: Sequence[dict]) -> list[str]:
    """Plain statements of whether the paper's finding shows in these numbers."""
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for where in ("in-distribution", "off-manifold"):
            pts = [r for r in rows if r["setting"] == setting and r["data"] == where]
            if len(pts) < 2:
                continue
            first, last = pts[0], pts[-1]
            change = last["kl"] / max(first["kl"], 1e-12)
            lines.append(f"- {setting}, {where}: KL {first['kl']:.4f} (1 member) -> {last['kl']:.4f} "
                         f"({last['size']} members), x{change:.2f}; OSP {first['osp']:.2f} -> {last['osp']:.2f}")
    return lines


def selection_table(rows: Sequence[dict], model: str) -> str:
    out = [f"Members chosen by {model} (predicted accuracy from weights) vs all and vs random subsets of the "
           "same size:", "", f"| setting | members | accuracy | orbit accuracy | OSP | {KL_HEADER} |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['setting']} | {r['members']} | {r['accuracy'] * 100:.1f}% | {r['orbit_accuracy'] * 100:.1f}% "
                   f"| {r['osp']:.3f} / {r['orbit_size']} | {_kl(r)} |")
    return "\n".join(out)


def selection_verdict(rows: Sequence[dict]) -> list[str]:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        full, nfn, rand = [r for r in rows if r["setting"] == setting]
        lines.append(f"- {setting}: {nfn['members']} by predicted accuracy {nfn['accuracy'] * 100:.1f}% vs "
                     f"{full['members']} {full['accuracy'] * 100:.1f}% vs {rand['members']} "
                     f"{rand['accuracy'] * 100:.1f}%; KL {nfn['kl']:.4f} vs {full['kl']:.4f} vs {rand['kl']:.4f}")
    return lines
