import pytest
import torch

from equiray.data import CORRUPTIONS, apply_view, corruption_views, group_views, parse_view
from equiray.errors import DataError
from equiray.groups import cyclic


@pytest.fixture
def images(gen):
    return torch.rand(50, 1, 12, 12, generator=gen)


@pytest.mark.parametrize("spec", [f"{c}:3" for c in CORRUPTIONS] + ["reflect", "rot:C8:3", "rot:D4:5"])
def test_views_are_deterministic_and_change_the_images(images, spec):
    a, b = apply_view(images, spec), apply_view(images, spec)
    assert torch.equal(a, b) and a.shape == images.shape
    assert (a - images).abs().mean() > 1e-3
    assert a.min() >= 0 and a.max() <= 1 + 1e-6


def test_random_corruptions_depend_on_the_seed_and_severity(images):
    assert not torch.equal(apply_view(images, "noise:3", seed=0), apply_view(images, "noise:3", seed=1))
    mild = (apply_view(images, "blur:1") - images).abs().mean()
    strong = (apply_view(images, "blur:5") - images).abs().mean()
    assert strong > mild


def test_rotated_views_are_the_group_action_with_zero_padding(images):
    c8 = cyclic(8)
    views = group_views("C8")
    assert views[0] == "rot:C8:0" and len(views) == 8
    assert torch.equal(apply_view(images, "upright"), images)
    assert torch.equal(apply_view(images, "rot:C8:0"), images)
    assert torch.equal(apply_view(images, "rot:C8:1"), c8.act(images, 1, padding="zeros"))
    assert torch.equal(apply_view(images, "rot:C4:1"), torch.rot90(images, 1, dims=(-2, -1)))


def test_bad_views_are_named():
    for bad, msg in [("rot:C4:4", "element 4 not in C4"), ("noise:9", "severity"), ("sepia:1", "unknown view"),
                     ("rot:Q4:1", "unknown group"), ("rot:C4", "unknown view")]:
        with pytest.raises(DataError, match=msg):
            parse_view(bad)
    assert corruption_views(2, ["noise"]) == ["noise:2"]
