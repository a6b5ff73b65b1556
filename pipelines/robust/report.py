"""The robust selection's table, verdict and champion rule."""
from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["champion", "results_table", "verdict"]

_ANGLES = ("30", "45", "60")  # the curve's angles that get their own column, where the curve has them


def champion(rows: Sequence[Mapping], backbone_upright: float, tolerance: float, *,
             level: float = 0.0) -> tuple[Mapping, bool]:
    """The rule: the best SO(2) accuracy among the rows whose upright accuracy is within ``tolerance`` points of
    ``backbone_upright``; SO(2) accuracies within ``level`` points of the best count as level (one seed's noise),
    and of those the better upright wins (then the better SO(2)); ``(row, True)``. When none keeps the upright
    accuracy: the same among all rows, ``(row, False)``."""
    kept = [r for r in rows if keeps_upright(r, backbone_upright, tolerance)]
    pool = kept or list(rows)
    best_so2 = max(r["so2_accuracy"] for r in pool)
    level_rows = [r for r in pool if 100 * r["so2_accuracy"] >= 100 * best_so2 - level - 1e-9]
    return max(level_rows, key=lambda r: (r["upright_accuracy"], r["so2_accuracy"])), bool(kept)


def keeps_upright(row: Mapping, backbone_upright: float, tolerance: float) -> bool:
    return 100 * row["upright_accuracy"] >= 100 * backbone_upright - tolerance - 1e-9


def results_table(rows: Sequence[Mapping], *, backbone: Mapping, cn_group: str, champion_name: str,
                  tolerance: float) -> str:
    """One line per model (the backbone first), accuracies in %, ms per image and the overhead over the backbone."""
    angles = [a for a in _ANGLES if f"accuracy_angle_{a}" in backbone]
    head = ["model", "upright", *[f"at {a} deg" for a in angles], "SO(2)", "O(2)", "mirrored", f"{cn_group}-avg",
            "ms / image", "vs backbone", f"upright within {tolerance:g} pt"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + ":---:|"]
    for r in [backbone, *rows]:
        star = " **(champion)**" if r["name"] == champion_name else ""
        cells = [f"{r['name']}{star}", *(f"{100 * r[k]:.2f}" for k in (
            "upright_accuracy", *[f"accuracy_angle_{a}" for a in angles], "so2_accuracy", "o2_accuracy",
            "mirrored_accuracy", "cn_avg_accuracy")),
            f"{r['ms_per_image']:.3f}", "-" if r is backbone else f"{100 * r['overhead']:+.0f}%",
            "reference" if r is backbone else ("yes" if keeps_upright(r, backbone["upright_accuracy"], tolerance)
                                               else "no")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: Sequence[Mapping], *, backbone: Mapping, champion_row: Mapping, rule_met: bool, tolerance: float,
            images: int, curve_images: int, level: float = 0.0) -> list[str]:
    """What the table says, in sentences: the champion and why, and how far it is from the backbone."""
    b, c = backbone, champion_row
    out = [f"Judged on {images} test images (the curve and the grid on the first {curve_images}), one seeded random "
           "view each; "
           "one seed, so differences under about one point are within noise."]
    if rule_met:
        kept = [r for r in rows if keeps_upright(r, b["upright_accuracy"], tolerance)]
        best = max(kept, key=lambda r: r["so2_accuracy"])
        how = (f"the best SO(2) accuracy ({100 * c['so2_accuracy']:.2f}%)" if best is c else
               f"level on SO(2) ({100 * c['so2_accuracy']:.2f}%, within {level:g} point of the best, "
               f"{100 * best['so2_accuracy']:.2f}%) and the best upright ({100 * c['upright_accuracy']:.2f}%)")
        out.append(f"Champion: {c['name']}, {how} among the {len(kept)} candidates within {tolerance:g} point of "
                   f"the backbone's upright {100 * b['upright_accuracy']:.2f}%.")
    else:
        out.append(f"No candidate keeps the upright accuracy within {tolerance:g} point of the backbone's "
                   f"{100 * b['upright_accuracy']:.2f}%: registered the best SO(2) accuracy instead, {c['name']} "
                   f"({100 * c['so2_accuracy']:.2f}% SO(2), {100 * c['upright_accuracy']:.2f}% upright).")
    out.append(f"Against the bare backbone: SO(2) {100 * (c['so2_accuracy'] - b['so2_accuracy']):+.2f} points, "
               f"O(2) {100 * (c['o2_accuracy'] - b['o2_accuracy']):+.2f}, upright "
               f"{100 * (c['upright_accuracy'] - b['upright_accuracy']):+.2f}, at {100 * c['overhead']:+.0f}% latency.")
    return out
