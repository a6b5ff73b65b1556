"""The pretraining stage's summary metrics and plots (training curves, accuracy per test view)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from equiray_pipelines.pretrain.config import EvalConfig


def summary_metrics(acc: Mapping[str, float], ev: EvalConfig, train_seconds: float) -> dict[str, float]:
    """What the run logs once training is done: upright and group-averaged test accuracy, the accuracy of each
    view (``test_accuracy/rot_1``) and the time to a trained model."""
    rot_views = ev.rotated_views()
    return {
        "test_accuracy": acc["upright"],
        f"test_{ev.group}_avg_accuracy": sum(acc[v] for v in rot_views) / len(rot_views),
        **{f"test_accuracy/{v.replace(':', '_')}": a for v, a in acc.items()},
        "train_seconds": train_seconds,
    }


def view_accuracy(metrics: Mapping[str, float], ev: EvalConfig) -> dict[str, float]:
    """The accuracy per view back from the metrics :func:`summary_metrics` logged."""
    return {v: metrics[f"test_accuracy/{v.replace(':', '_')}"] for v in ev.views()}


def plots(curves: Sequence[Mapping[str, float]], acc: Mapping[str, float], out_dir: Path | None,
          group: str) -> list[Path]:
    """Training curves and accuracy per test view, as PNGs (in ``out_dir`` or a temporary folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="equiray-plots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if curves:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ep = [c["epoch"] + 1 for c in curves]
        ax[0].plot(ep, [c["train_loss"] for c in curves], marker="o")
        ax[0].set(xlabel="epoch", ylabel="train loss", title="loss")
        ax[1].plot(ep, [100 * c["train_accuracy"] for c in curves], marker="o", label="train")
        ax[1].plot(ep, [100 * c["val_accuracy"] for c in curves], marker="o", label="validation")
        ax[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
        ax[1].legend()
        fig.tight_layout()
        paths.append(out_dir / "pretrain_curves.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    from matplotlib.patches import Patch

    from equiray.data.views import describe_view

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = list(acc)
    kinds = {"upright": ("tab:green", "upright"), "rot": ("tab:red", f"{group}-rotated"),
             "other": ("tab:orange", "corrupted")}
    kind = ["upright" if n == "upright" else "rot" if n.startswith("rot") else "other" for n in names]
    bars = ax.bar(range(len(names)), [100 * acc[n] for n in names], color=[kinds[k][0] for k in kind])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), [describe_view(n) for n in names], rotation=30, ha="right")
    ax.set(ylim=(0, 110), ylabel="test accuracy (%)", title=f"pretrained backbone: upright vs {group}-rotated vs corrupted")
    ax.legend(handles=[Patch(color=kinds[k][0], label=kinds[k][1]) for k in dict.fromkeys(kind)], fontsize=8,
              loc="upper center", ncols=3, frameon=False)
    fig.tight_layout()
    paths.append(out_dir / "pretrain_views.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
