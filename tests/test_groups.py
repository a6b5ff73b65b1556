import itertools
import math

import pytest
import torch

from equiray.groups import OutputKind, cyclic, dihedral, get_group, list_groups, rotate, trivial

GROUPS = list_groups()
EXACT = [g for g in GROUPS if get_group(g).is_exact().all()]
INTERPOLATED = [g for g in GROUPS if not get_group(g).is_exact().all()]


def smooth_images(gen, b=4, c=2, size=33):
    """Band-limited images that vanish outside the inscribed disc, so rotations lose nothing at the corners."""
    coarse = torch.rand(b, c, 6, 6, generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    r = torch.linspace(-1, 1, size)
    disc = ((r[:, None] ** 2 + r[None, :] ** 2) < 0.7).float()
    return x * torch.nn.functional.avg_pool2d(disc[None, None], 5, 1, 2)[0, 0]


@pytest.mark.parametrize("name", GROUPS)
def test_group_axioms(name):
    g = get_group(name)
    els = torch.tensor(g.elements())
    table = g.cayley_table()
    # closure and a Latin square (every row and column a permutation)
    assert sorted(table.flatten().unique().tolist()) == g.elements()
    for row in table:
        assert sorted(row.tolist()) == g.elements()
    # identity and inverses
    assert torch.equal(g.compose(g.identity, els), els) and torch.equal(g.compose(els, g.identity), els)
    assert torch.equal(g.compose(els, g.inverse(els)), torch.zeros_like(els))
    # associativity over all triples
    a, b, c = (t.flatten() for t in torch.meshgrid(els, els, els, indexing="ij"))
    assert torch.equal(g.compose(g.compose(a, b), c), g.compose(a, g.compose(b, c)))


def test_group_objects_are_cached_and_named():
    assert cyclic(4) is get_group("C4") and dihedral(8) is get_group("d8") and trivial() is get_group("trivial")
    assert cyclic(4).order == 4 and dihedral(4).order == 8 and trivial().order == 1
    with pytest.raises(ValueError, match="unknown group"):
        get_group("Q8")
    with pytest.raises(ValueError, match="elements of C4 are 0..3"):
        cyclic(4).act(torch.zeros(1, 1, 4, 4), 4)


def test_dihedral_is_not_abelian_and_cyclic_is():
    d4, c4 = dihedral(4), cyclic(4)
    assert not torch.equal(d4.cayley_table(), d4.cayley_table().T)
    assert torch.equal(c4.cayley_table(), c4.cayley_table().T)


@pytest.mark.parametrize("name", EXACT)
def test_action_is_an_exact_homomorphism(name, gen):
    g = get_group(name)
    x = torch.rand(64, 3, 7, 7, generator=gen)
    a = g.sample(64, generator=gen)
    b = g.sample(64, generator=gen)
    assert torch.equal(g.act(g.act(x, b), a), g.act(x, g.compose(a, b)))
    assert torch.equal(g.act(g.act(x, a), g.inverse(a)), x)
    assert torch.equal(g.act(x, g.identity), x)


@pytest.mark.parametrize("name", INTERPOLATED)
def test_action_is_an_approximate_homomorphism(name, gen):
    g = get_group(name)
    x = smooth_images(gen)
    for a, b in itertools.product(g.elements(), repeat=2):
        lhs = g.act(g.act(x, b), a)
        rhs = g.act(x, int(g.compose(a, b)))
        assert (lhs - rhs).abs().max() < 0.08, (a, b)  # two bilinear resamplings vs one


@pytest.mark.parametrize("name", [n for n in GROUPS if get_group(n).order > 1])
def test_action_sensitivity(name, gen):
    """Every non-identity element moves a generic image, and composing in the wrong order is detected."""
    g = get_group(name)
    x = smooth_images(gen)
    for e in g.elements()[1:]:
        assert (g.act(x, e) - x).abs().max() > 0.05, e
    table = g.cayley_table()
    if not torch.equal(table, table.T):  # non-abelian: act(act(x, b), a) must differ from act(x, b*a)
        a, b = 1, g.n  # a rotation and the reflection
        assert (g.act(g.act(x, b), a) - g.act(x, int(g.compose(b, a)))).abs().max() > 0.05


def test_interpolated_quarter_turn_matches_rot90(gen):
    x = torch.rand(5, 2, 9, 9, generator=gen)
    assert torch.allclose(rotate(x, math.pi / 2), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert not torch.allclose(rotate(x, -math.pi / 2), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-2)


def test_c8_exact_elements_take_the_exact_path(gen):
    c8 = cyclic(8)
    x = torch.rand(2, 1, 8, 8, generator=gen)
    assert torch.equal(c8.act(x, 2), torch.rot90(x, 1, dims=(-2, -1)))
    assert c8.is_exact().tolist() == [True, False] * 4


@pytest.mark.parametrize("name", ["C4", "D4", "C8", "D8"])
def test_mixed_batch_matches_each_image_alone(name, gen):
    """A batch with one element per image (augmentation, canonicalization) gives each image exactly what acting
    on it alone gives; quarter turns are torch.rot90 bit for bit (after the flip, for reflections)."""
    g = get_group(name)
    x = torch.rand(3 * g.order, 2, 11, 11, generator=gen)
    el = torch.randperm(3 * g.order, generator=gen) % g.order
    out = g.act(x, el, padding="zeros")
    for i in range(len(x)):
        assert torch.allclose(out[i:i + 1], g.act(x[i:i + 1], int(el[i]), padding="zeros"), atol=1e-6)
        k, refl = int(el[i]) % g.n, int(el[i]) >= g.n
        if (4 * k) % g.n == 0:
            img = x[i].flip(-1) if refl else x[i]
            assert torch.equal(out[i], torch.rot90(img, 4 * k // g.n, dims=(-2, -1)))
    assert not torch.allclose(out, g.act(x, el.roll(1), padding="zeros"), atol=1e-3)  # elements must match images


@pytest.mark.parametrize("channels", [1, 3])
def test_action_keeps_the_memory_layout(channels, gen):
    """Channels-last in, channels-last out (decoded images are channels-last, and a backbone's convolutions pick
    their algorithm by the layout), with the same values as in NCHW."""
    g = get_group("C8")
    nchw = torch.rand(16, channels, 12, 12, generator=gen)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    if channels == 1:  # what decoding (H, W, C) -> (C, H, W) by permute gives
        nhwc = nchw.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    el = torch.arange(16) % 8
    a, b = g.act(nchw, el), g.act(nhwc, el)
    assert torch.equal(a, b)
    assert b.stride() == nhwc.stride() and a.stride() == nchw.stride()


def test_half_turns_of_non_square_images(gen):
    x = torch.rand(4, 1, 5, 8, generator=gen)
    c4 = cyclic(4)
    out = c4.act(x, torch.tensor([0, 2, 2, 0]))
    assert torch.equal(out[1], torch.rot90(x[1], 2, dims=(-2, -1))) and torch.equal(out[0], x[0])
    with pytest.raises(ValueError, match="square"):
        c4.act(x, torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("name", ["C8", "D8", "C6"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_interpolated_elements_match_grid_sample(name, padding, gen):
    """act's cached gather plan samples exactly where grid_sample does, and passes gradients to the image."""
    g = get_group(name)
    x = torch.randn(16, 2, 13, 13, generator=gen, requires_grad=True)
    el = torch.randint(g.order, (16,), generator=gen)
    el[:2] = torch.tensor([1, g.order - 1])  # at least one interpolated element of each kind
    odd = ~g.is_exact(el)
    flipped = torch.where((el >= g.n)[:, None, None, None], x.flip(-1), x)
    reference = rotate(flipped, g.angles(el), padding=padding)
    out = g.act(x, el, padding=padding)
    torch.testing.assert_close(out[odd], reference[odd], atol=1e-4, rtol=0)
    # sensitivity: a plan for the wrong angle is far off
    assert (g._rotate_by_plan(x[odd], (g.rotation(el[odd]) + 1) % g.n, padding) - reference[odd]).abs().max() > 0.3
    out.square().sum().backward()
    assert x.grad is not None and x.grad[odd].abs().sum() > 0


def test_zero_padding_reads_zeros_outside():
    x = torch.ones(1, 1, 16, 16)
    c8 = cyclic(8)
    zeros = c8.act(x, 1, padding="zeros")
    border = c8.act(x, 1, padding="border")
    assert zeros[0, 0, 0, 0] < 0.5 and torch.allclose(border, x)


def _correlations(x, template, g):
    """f(x)[h] = <x, h . t>: a function whose output transforms by the regular representation."""
    copies = g.orbit(template)[0]  # (|G|, C, H, W)
    return torch.einsum("bchw,gchw->bg", x, copies)[:, None]  # (B, 1, |G|)


@pytest.mark.parametrize("name", EXACT)
def test_regular_output_action_is_equivariant(name, gen):
    g = get_group(name)
    x = torch.rand(6, 2, 5, 5, generator=gen, dtype=torch.float64)
    t = torch.rand(1, 2, 5, 5, generator=gen, dtype=torch.float64)
    el = g.sample(6, generator=gen)
    lhs = _correlations(g.act(x, el), t, g)
    rhs = g.act_output(_correlations(x, t, g), el, OutputKind.REGULAR)
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=0)
    if g.n > 2:  # sensitivity: permuting by g instead of g^-1 is not the symmetry (rotation 1 has order n)
        el = torch.full((6,), 1)
        wrong = g.act_output(_correlations(x, t, g), g.inverse(el), OutputKind.REGULAR)
        assert not torch.allclose(_correlations(g.act(x, el), t, g), wrong)


@pytest.mark.parametrize("name", EXACT)
def test_output_actions(name, gen):
    g = get_group(name)
    el = g.sample(3, generator=gen)
    logits = torch.rand(3, 10, generator=gen)
    assert torch.equal(g.act_output(logits, el, "invariant"), logits)
    dense = torch.rand(3, 4, 6, 6, generator=gen)
    assert torch.equal(g.act_output(dense, el, "dense"), g.act(dense, el))
    fields = torch.rand(3, 2, g.order, 6, 6, generator=gen)
    a, b = g.sample(3, generator=gen), g.sample(3, generator=gen)
    assert torch.equal(g.act_output(g.act_output(fields, b, "regular"), a, "regular"),
                       g.act_output(fields, g.compose(a, b), "regular"))
    with pytest.raises(ValueError, match="regular-representation"):
        g.act_output(torch.rand(3, 2, g.order + 1), el, "regular")


def test_orbit_layout(gen):
    g = dihedral(4)
    x = torch.rand(3, 1, 5, 5, generator=gen)
    orb = g.orbit(x)  # (B, |G|, C, H, W)
    assert orb.shape == (3, 8, 1, 5, 5)
    for e in g.elements():
        assert torch.equal(orb[:, e], g.act(x, e))
