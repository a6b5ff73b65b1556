import math

import pytest

from equiray.stats import compare, mean_interval, t_quantile


def test_interval_is_students_t_on_the_seeds_spread():
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.mean == pytest.approx(2.0)
    assert iv.half_width == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)  # sd 1, t(2)
    assert (iv.low, iv.high, iv.n) == pytest.approx((2.0 - iv.half_width, 2.0 + iv.half_width, 3))
    assert str(iv) == "2.00 +- 2.48 (n=3)"


def test_interval_narrows_with_more_seeds_and_vanishes_without_spread():
    few, many = mean_interval([0.8, 0.9] * 2), mean_interval([0.8, 0.9] * 10)
    assert many.half_width < few.half_width
    assert mean_interval([0.5, 0.5, 0.5]).half_width == 0.0


def test_one_run_is_an_anecdote():
    iv = mean_interval([0.887])
    assert iv.n == 1 and math.isnan(iv.low) and math.isnan(iv.high)
    assert iv.format(scale=100) == "88.70 (one run)"
    assert compare([0.9], [0.8])[1] == "one run"
    with pytest.raises(ValueError, match="at least one run"):
        mean_interval([])


def test_t_quantile_table_and_tail():
    assert t_quantile(1) == pytest.approx(12.706)
    assert t_quantile(30) == pytest.approx(2.042)
    assert t_quantile(60) == pytest.approx(2.000, abs=0.002)
    assert t_quantile(1000) == pytest.approx(1.962, abs=0.002)
    assert t_quantile(2.7) == t_quantile(2)  # Welch's fractional df: rounded down (wider)
    with pytest.raises(ValueError):
        t_quantile(0.5)


def test_compare_decides_by_the_interval():
    base = [0.850, 0.870, 0.860, 0.880]
    up = [v + 0.02 for v in base]  # every seed 2 points higher: paired, the interval is tight
    d, verdict = compare(up, base)
    assert verdict == "above" and d.mean == pytest.approx(0.02)
    assert compare(base, up)[1] == "below"
    # the same shift is not resolved as independent samples with this much spread between seeds
    assert compare(up, base, paired=False)[1] == "level"
    noisy = [0.861, 0.869, 0.852, 0.878]
    assert compare(noisy, base)[1] == "level"
    assert compare([0.9, 0.91, 0.92], [0.5, 0.51, 0.52], paired=False)[1] == "above"
    with pytest.raises(ValueError, match="one value per seed"):
        compare([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="at least one run"):
        compare([], [0.5], paired=False)
    with pytest.raises(ValueError, match="NaN"):
        compare([0.5, float("nan")], [0.5, 0.6])


def test_welch_interval_matches_a_reference_case():
    # a: mean 0.9225, sd 0.02217; b: mean 0.54, sd 0.05292; Welch-Satterthwaite df = 2.53 (scipy), rounded down to 2
    a, b = [0.9, 0.91, 0.95, 0.93], [0.5, 0.6, 0.52]
    d, verdict = compare(a, b, paired=False)
    se = math.sqrt(0.02217 ** 2 / 4 + 0.05292 ** 2 / 3)
    assert d.mean == pytest.approx(0.3825)
    assert d.half_width == pytest.approx(4.303 * se, rel=2e-3)
    assert verdict == "above"
