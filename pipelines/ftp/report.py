"""The search's table, verdict and plot, from its trial rows and the pretrained backbone's accuracies."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from equiray_pipelines.ftp.config import METHOD_ORDER, FTPConfig
from equiray_pipelines.ftp.result import TrialRow


def results_table(rows: Sequence[TrialRow], pretrained: Mapping[str, float], cfg: FTPConfig) -> str:
    """Best trial per method (by ID validation accuracy), next to the pretrained backbone with no fine-tuning."""
    views = list(cfg.task.ood_views)
    head = (f"| method (best of its trials by ID val) | trials | ID val | ID test ({cfg.task.target_view}) | "
            + " | ".join(f"OOD {v}" for v in views) + " | OOD mean | s / epoch |")
    lines = [head, "|" + "---|" * (6 + len(views))]
    ood_mean = sum(pretrained[v] for v in views) / len(views)
    lines.append(f"| pretrained backbone, no fine-tuning | - | - | {pretrained['id_test'] * 100:.1f}% | "
                 + " | ".join(f"{pretrained[v] * 100:.1f}%" for v in views) + f" | {ood_mean * 100:.1f}% | - |")
    for method in METHOD_ORDER:
        mine = [r for r in rows if r.method == method]
        if not mine:
            continue
        b = max(mine, key=lambda r: r.val_accuracy)
        lines.append(f"| {method} | {len(mine)} | {b.val_accuracy * 100:.1f}% | {b.id_test_accuracy * 100:.1f}% | "
                     + " | ".join(f"{b.ood[v] * 100:.1f}%" for v in views)
                     + f" | {b.ood_mean_accuracy * 100:.1f}% | {b.epoch_seconds:.1f} |")
    return "\n".join(lines)


def verdict(rows: Sequence[TrialRow], pretrained: Mapping[str, float]) -> list[str]:
    """One line on what plain fine-tuning costs OOD, then each robust method's best against it."""
    best: dict[str, TrialRow] = {}
    for r in rows:
        if r.method not in best or r.val_accuracy > best[r.method].val_accuracy:
            best[r.method] = r
    views = list(rows[0].ood) if rows else []
    out = []
    if "finetune" in best and views:
        pre = sum(pretrained[v] for v in views) / len(views)
        ft = best["finetune"]
        lost = pre - ft.ood_mean_accuracy
        out.append(f"- The pretrained backbone averages {pre * 100:.1f}% on the OOD views; plain fine-tuning on the "
                   f"target set {'loses' if lost > 0 else 'keeps'} {abs(lost) * 100:.1f} points of it "
                   f"({ft.ood_mean_accuracy * 100:.1f}%) while reaching {ft.id_test_accuracy * 100:.1f}% ID.")
        for m in ("ftp", "tpgm", "spd", "l2sp"):
            if m in best:
                r = best[m]
                d_ood = (r.ood_mean_accuracy - ft.ood_mean_accuracy) * 100
                d_id = (r.id_test_accuracy - ft.id_test_accuracy) * 100
                out.append(f"- {m.upper() if m != 'l2sp' else 'L2-SP'} vs plain fine-tuning: OOD mean {d_ood:+.1f} "
                           f"points, ID test {d_id:+.1f} points.")
    counts = [sum(r.method == m for r in rows) for m in best]
    if counts and min(counts) < 8:
        out.append(f"- Illustrative: {min(counts)}-{max(counts)} trial(s) per method and one training seed each; "
                   "these differences move by several points from run to run. Each method tuned by 8 trials, then "
                   "10 seeds: FTP's OOD mean above TPGM (two runs) and L2-SP (one of two), level with plain "
                   "fine-tuning and SPD, ID level (BENCHMARKS.md, `benchmarks/bench_ftp_accuracy.py`).")
    return out


def plot_trials(rows: Sequence[TrialRow], pretrained: Mapping[str, float], out_dir: Path | None) -> Path:
    """Every trial's ID test vs OOD mean accuracy (marker size: epochs run), the pretrained backbone as a star;
    written to ``out_dir/ftp_trials.png`` (a temporary folder without one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="equiray-plots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {"finetune": "tab:gray", "l2sp": "tab:blue", "ftp": "tab:red", "tpgm": "tab:green",
              "spd": "tab:purple"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in METHOD_ORDER:
        mine = [r for r in rows if r.method == method]
        if mine:
            ax.scatter([100 * r.id_test_accuracy for r in mine], [100 * r.ood_mean_accuracy for r in mine],
                       c=colors[method], label=method, alpha=0.8, s=[18 + 12 * r.epochs for r in mine])
    views = list(rows[0].ood) if rows else []
    if views:
        ax.scatter([100 * pretrained["id_test"]], [100 * sum(pretrained[v] for v in views) / len(views)], marker="*", s=220,
                   c="black", label="pretrained, no fine-tuning")
    ax.set(xlabel="ID test accuracy, target domain (%)", ylabel="OOD accuracy, mean over shifts (%)",
           title="robust fine-tuning trials (marker size: epochs run before ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "ftp_trials.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
