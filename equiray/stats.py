"""Claims over seeds: a mean with its 95% interval, and "above / level / below" decided by the interval.

One run is an anecdote: :func:`mean_interval` over one value says so (its interval is undefined, ``str`` reads
"one run"). The interval is Student's t on the seeds' values (their spread, not the test set's sampling error);
:func:`compare` takes the difference per seed when both sides ran the same seeds (paired: same initialisation,
same batch order), else Welch's difference of means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

__all__ = ["Interval", "mean_interval", "compare", "t_quantile"]

# Student's t, two-sided 95% (the 0.975 quantile) for 1..30 degrees of freedom; beyond 30 it is within 4% of 1.96
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: float) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (a fractional df, as Welch's,
    is rounded down: the wider interval)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    d = int(math.floor(df))
    if d <= len(_T975):
        return _T975[d - 1]
    return 1.96 + 2.4 / d  # within 0.003 of the exact quantile for d > 30


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` runs and its two-sided 95% interval (``nan`` bounds for one run)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, digits: int = 2, scale: float = 1.0) -> str:
        """``"88.84 +- 0.41 (n=3)"``, or ``"88.84 (one run)"``; ``scale`` e.g. 100 for fractions as percent."""
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f} (one run)"
        return f"{self.mean * scale:.{digits}f} +- {self.half_width * scale:.{digits}f} (n={self.n})"

    def __str__(self) -> str:
        return self.format()


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of ``values`` (one per seed) and its 95% Student-t interval."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values: an interval needs at least one run")
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"a value is NaN: {vals}")
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


Verdict = Literal["above", "level", "below", "one run"]


def compare(a: Sequence[float], b: Sequence[float], *, paired: bool = True) -> tuple[Interval, Verdict]:
    """``a`` against ``b``: the 95% interval of ``mean(a) - mean(b)`` and the verdict it decides: ``above`` (the
    whole interval > 0), ``below`` (< 0), else ``level``; ``one run`` when either side has a single value.

    ``paired``: ``a[i]`` and ``b[i]`` come from the same seed, so the per-seed differences carry the comparison
    (their spread excludes what the seed does to both); otherwise Welch's interval for two independent samples.
    """
    if paired and len(a) != len(b):
        raise ValueError(f"paired comparison needs one value per seed on both sides, got {len(a)} and {len(b)}")
    ia, ib = mean_interval(a), mean_interval(b)  # (validates: at least one value each, no NaN)
    if ia.n < 2 or ib.n < 2:
        return Interval(ia.mean - ib.mean, math.nan, math.nan, min(ia.n, ib.n)), "one run"
    if paired:
        d = mean_interval([x - y for x, y in zip(a, b)])
    else:
        va = (ia.half_width / t_quantile(ia.n - 1)) ** 2  # squared standard errors
        vb = (ib.half_width / t_quantile(ib.n - 1)) ** 2
        se = math.sqrt(va + vb)
        diff = ia.mean - ib.mean
        n = min(ia.n, ib.n)  # the smaller sample: what limits the comparison
        if se == 0:
            d = Interval(diff, diff, diff, n)
        else:
            df = se ** 4 / (va ** 2 / (ia.n - 1) + vb ** 2 / (ib.n - 1))  # Welch-Satterthwaite
            half = t_quantile(max(df, 1.0)) * se
            d = Interval(diff, diff - half, diff + half, n)
    verdict: Verdict = "above" if d.low > 0 else "below" if d.high < 0 else "level"
    return d, verdict
