import pytest
import torch

from equiray.groups import cyclic, dihedral
from equiray.metrics import bootstrap_curve, invariance, orbit_logits, osp, size_grid, symmetric_kl


def invariant_fn(x):
    return torch.stack([x.mean((1, 2, 3)), x.pow(2).mean((1, 2, 3)), x.amax((1, 2, 3))], -1) * 10


def corner_fn(x):
    return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0]], -1) * 10


@pytest.mark.parametrize("group", [cyclic(4), dihedral(4)])
def test_invariant_function_scores_perfectly(group, gen):
    x = torch.rand(32, 1, 6, 6, generator=gen)
    logits = orbit_logits(invariant_fn, x, group)
    assert logits.shape == (group.order, 32, 3)
    m = invariance(logits)
    assert m["osp"] == group.order and m["kl"] == pytest.approx(0, abs=1e-10)


@pytest.mark.parametrize("group", [cyclic(4), dihedral(4)])
def test_non_invariant_function_is_caught(group, gen):
    x = torch.rand(32, 1, 6, 6, generator=gen)
    m = invariance(orbit_logits(corner_fn, x, group))
    assert m["osp"] < group.order - 0.5 and m["kl"] > 0.1


def test_osp_and_kl_by_hand():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # |G| = 2, one input: prediction flips
    assert float(osp(logits)) == 1.0
    p, q = torch.softmax(logits[0, 0], -1), torch.softmax(logits[1, 0], -1)
    expected = float((p * (p / q).log()).sum() + (q * (q / p).log()).sum())
    assert float(symmetric_kl(logits)) == pytest.approx(expected)


def test_kl_normalizations_known_answer():
    """|G| = 4, one input: x and its first turn agree, the other two turns each differ by a known KL. equiray's
    kl is the mean over the 3 non-identity turns, the paper's over all 4 (the identity's 0 included)."""
    a, b = [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]
    logits = torch.tensor([[a], [a], [b], [b]])
    p, q = torch.softmax(torch.tensor(a), -1), torch.softmax(torch.tensor(b), -1)
    d = float(((p - q) * (p.log() - q.log())).sum())
    assert float(symmetric_kl(logits)) == pytest.approx(2 * d / 3)
    assert float(symmetric_kl(logits, over="all")) == pytest.approx(2 * d / 4)
    m = invariance(logits)
    assert m["kl_all"] == pytest.approx(m["kl"] * 3 / 4)
    with pytest.raises(ValueError, match="over"):
        symmetric_kl(logits, over="some")


def test_bootstrap_curve_of_members_averaging_out(gen):
    """Members = an invariant signal + independent non-invariant noise: the mean's KL falls with size."""
    n, g, b = 200, 4, 50
    base = torch.randn(1, 1, b, 10, generator=gen).expand(n, g, b, 10)
    member = base + 2.0 * torch.randn(n, g, b, 10, generator=gen)
    rows = bootstrap_curve(member, [1, 10, 100], labels=torch.zeros(b, dtype=torch.long), repeats=5, generator=gen)
    assert [r["size"] for r in rows] == [1, 10, 100]
    assert rows[0]["kl"] > 5 * rows[2]["kl"] and rows[2]["osp"] > rows[0]["osp"]
    assert "accuracy" in rows[0] and "kl_std" in rows[0]


def test_size_grid():
    assert size_grid(24) == [1, 2, 5, 10, 20, 24]
    assert size_grid(1) == [1] and size_grid(100)[-1] == 100
