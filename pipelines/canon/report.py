"""What a canonicalization sweep reads out: the variants' table, the verdict on the papers' claims, the plot."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["results_table", "verdict", "plot_variants", "plot_angle_curves"]


def results_table(rows: Sequence[Mapping], group: str) -> str:
    """The variants as a Markdown table (what the CLI prints and the report quotes)."""
    lines = [f"| variant | upright acc | {group}-avg acc | SO(2)-avg acc | O(2)-avg acc | identity rate | ms / image | "
             "overhead vs backbone |", "|---|---|---|---|---|---|---|---|"]

    def pct(r, key):
        return f"{r[key] * 100:.2f}%" if r.get(key) is not None else "n/a"

    for r in rows:
        ident = f"{r['identity_rate'] * 100:.1f}%" if r.get("identity_rate") is not None else "n/a"
        lines.append(f"| {r['name']} | {pct(r, 'upright_accuracy')} | {pct(r, 'cn_avg_accuracy')} | "
                     f"{pct(r, 'so2_accuracy')} | {pct(r, 'o2_accuracy')} | {ident} | {r['ms_per_image']:.3f} | "
                     f"{r['overhead'] * 100:+.0f}% |")
    return "\n".join(lines)


def verdict(rows: Sequence[Mapping], group: str) -> list[str]:
    """The papers' shape, checked on these numbers: vanilla collapses on rotated inputs, augmentation pays in
    upright accuracy, canonicalization without the prior pays in upright accuracy, with the prior keeps both."""
    by = {r["name"]: r for r in rows}
    plain = next((r for r in rows if r["kind"] == "none" and not r["augment"]
                  and r.get("rotations", "none") == "none"), None)
    aug = next((r for r in rows if r["kind"] == "none" and r["augment"]), None)
    out = []

    def pct(v):
        return f"{v * 100:.1f}%"

    if plain:
        ok = plain["cn_avg_accuracy"] < plain["upright_accuracy"] - 0.2
        out.append(f"- Plain fine-tuning {'collapses' if ok else 'does not collapse'} on rotated inputs: "
                   f"{pct(plain['upright_accuracy'])} upright, {pct(plain['cn_avg_accuracy'])} {group}-avg.")
    if plain and aug:
        ok = aug["upright_accuracy"] < plain["upright_accuracy"]
        out.append(f"- Augmentation {'pays' if ok else 'does not pay'} in upright accuracy: "
                   f"{pct(aug['upright_accuracy'])} vs {pct(plain['upright_accuracy'])}, for "
                   f"{pct(aug['cn_avg_accuracy'])} {group}-avg.")
    for r in rows:
        if r["kind"] == "none" or not r["prior_weight"]:
            continue
        twin = by.get(r["name"].replace(f"prior {r['prior_weight']:g}", "no prior"))
        if twin is None:
            continue
        pays = twin["upright_accuracy"] < r["upright_accuracy"]
        line = (f"- {r['kind']} {r['group']} ({r['backbone']}): without the prior "
                f"{pct(twin['upright_accuracy'])} upright / {pct(twin['cn_avg_accuracy'])} {group}-avg (identity rate "
                f"{pct(twin.get('identity_rate') or 0)}); with it {pct(r['upright_accuracy'])} / "
                f"{pct(r['cn_avg_accuracy'])} (identity rate {pct(r.get('identity_rate') or 0)}): the prior "
                f"{'keeps' if pays else 'does not keep'} upright accuracy better")
        if plain:
            gap = plain["upright_accuracy"] - r["upright_accuracy"]
            line += (f"; {gap * 100:.1f} points below plain fine-tuning upright" if gap > 0.005 else
                     "; level with plain fine-tuning upright")
        if aug:
            better = r["cn_avg_accuracy"] > aug["cn_avg_accuracy"]
            line += f", {'above' if better else 'below'} augmentation on {group}-avg"
        out.append(line + ".")
    return out


def plot_variants(rows: Sequence[Mapping], group: str, out_dir: Path | None) -> Path:
    """Upright vs Cn-avg accuracy of every variant, as ``canon_variants.png`` in ``out_dir`` (or a temporary
    folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="equiray-plots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 3.9))
    idx = range(len(rows))
    for offset, key, label in ((-0.2, "upright_accuracy", "upright"), (0.2, "cn_avg_accuracy", f"{group}-avg")):
        bars = ax.bar([i + offset for i in idx], [100 * r[key] for r in rows], 0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(idx), [r["name"] for r in rows], rotation=25, ha="right", fontsize=8)
    # headroom above 100 for the legend, so it covers no bar
    ax.set(ylim=(0, 118), yticks=range(0, 101, 20), ylabel="test accuracy (%)",
           title="canonicalization variants: upright vs rotated accuracy")
    ax.legend(loc="upper center", ncols=2, frameon=False, fontsize=8)
    fig.tight_layout()
    path = out_dir / "canon_variants.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_angle_curves(rows: Sequence[Mapping], out_dir: Path | None, *, name: str = "canon_angles.png",
                      title: str = "accuracy vs rotation angle, every variant") -> Path | None:
    """Accuracy vs rotation angle (0-360 degrees) of every row (its ``accuracy_angle_{deg}`` values) in one figure,
    as ``name`` in ``out_dir`` (or a temporary folder); None when no row has a curve (``curve_step: 0``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(r) -> tuple[list[float], list[float]]:
        """(degrees, accuracy in %), closed at 360 degrees with the value at 0."""
        pts = sorted((float(k[len("accuracy_angle_"):]), v) for k, v in r.items() if k.startswith("accuracy_angle_"))
        if not pts:
            return [], []
        return [d for d, _ in pts] + [360.0], [100 * v for _, v in pts] + [100 * pts[0][1]]

    if not any(k.startswith("accuracy_angle_") for r in rows for k in r):
        return None
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="equiray-plots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for r in rows:
        degrees, acc = curve(r)
        if degrees:
            ax.plot(degrees, acc, marker=".", label=r["name"])
    ax.set(xlim=(0, 360), ylim=(0, 100), xlabel="rotation of the test images (degrees, counter-clockwise)",
           ylabel="test accuracy (%)", title=title)
    ax.set_xticks(range(0, 361, 45))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
