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


# ------------------------------------------------------------------------------- any angle, any mirror
def test_angle_views_are_exact_quarter_turns_and_match_the_group_elsewhere(images):
    from equiray.data import angle_views

    assert torch.equal(apply_view(images, "angle:90"), torch.rot90(images, 1, dims=(-2, -1)))
    assert torch.equal(apply_view(images, "angle:-90"), torch.rot90(images, 3, dims=(-2, -1)))
    assert torch.equal(apply_view(images, "angle:720"), images)
    # 45 degrees by the angle view and by C8's element 1 sample the same points
    assert torch.allclose(apply_view(images, "angle:45"), cyclic(8).act(images, 1, padding="zeros"), atol=1e-5)
    assert angle_views(5)[:3] == ["angle:0", "angle:5", "angle:10"] and len(angle_views(5)) == 72
    with pytest.raises(DataError, match="bad view 'angle:nan'"):
        parse_view("angle:nan")


def test_angle_views_agree_with_an_independent_rotation():
    """torchvision's own rotate (counter-clockwise, about the centre, bilinear, zero fill) reads nearly the same
    pixels; rotating the other way does not (the sensitivity twin)."""
    import torch.nn.functional as F
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    gen = torch.Generator().manual_seed(0)
    blobs = F.avg_pool2d(torch.rand(32, 1, 36, 36, generator=gen), 9, stride=1)  # (32, 1, 28, 28), smooth
    blobs = F.pad(blobs[..., 6:22, 6:22], (6, 6, 6, 6))  # a dark border, as Fashion-MNIST has
    for deg in (30.0, 117.5):
        ours = apply_view(blobs, f"angle:{deg}")
        same = TF.rotate(blobs, deg, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        other = TF.rotate(blobs, -deg, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        assert (ours - same).abs().mean() < 0.1 * (ours - other).abs().mean()


def test_random_angle_views_are_reproducible_from_their_seed(images):
    from equiray.data import random_angles

    a, b = apply_view(images, "so2", seed=3), apply_view(images, "so2", seed=3)
    assert torch.equal(a, b) and not torch.equal(a, apply_view(images, "so2", seed=4))
    assert not torch.equal(a, apply_view(images, "o2", seed=3))
    flips, degrees = random_angles(4000, mirror=True, generator=torch.Generator().manual_seed(0))
    assert 0.45 < flips.float().mean() < 0.55 and degrees.min() >= 0 and degrees.max() < 360
    assert abs(degrees.mean().item() - 180) < 10
    none, _ = random_angles(100, mirror=False, generator=torch.Generator().manual_seed(0))
    assert not none.any()


def test_so2_view_is_each_image_at_its_own_angle(images):
    """Image i of the so2 view is the angle view of image i at the angle drawn for it."""
    import zlib

    from equiray.data import random_angles

    gen = torch.Generator().manual_seed(0 * 1_000_003 + zlib.crc32(b"so2"))
    _, degrees = random_angles(len(images), mirror=False, generator=gen)
    view = apply_view(images, "so2")
    for i in (0, 7, 31):
        assert torch.allclose(view[i:i + 1], apply_view(images[i:i + 1], f"angle:{degrees[i].item()!r}"), atol=1e-5)


def test_accuracy_curve_is_periodic_for_an_invariant_model(gen):
    """A C4-orbit-averaged network is invariant to quarter turns, so its accuracy-vs-angle curve repeats every
    90 degrees; the same network without the averaging does not (the sensitivity twin)."""
    from equiray.data import angle_views
    from equiray.train import evaluate_views

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 10 * 10, 10))

    class OrbitMean(torch.nn.Module):
        def forward(self, x):
            return torch.stack([net(torch.rot90(x, k, dims=(-2, -1))) for k in range(4)]).mean(0)

    x = torch.rand(200, 1, 12, 12, generator=gen)
    y = net(x).argmax(-1).detach()  # labels the plain net gets right upright
    views = angle_views(30)
    inv = evaluate_views(OrbitMean(), x, y, views)
    plain = evaluate_views(net, x, y, views)
    for d in (0, 30, 60):
        assert inv[f"angle:{d}"] == pytest.approx(inv[f"angle:{d + 90}"], abs=0.011)
        assert inv[f"angle:{d}"] == pytest.approx(inv[f"angle:{d + 180}"], abs=0.011)
    assert max(abs(plain[f"angle:{d}"] - plain[f"angle:{d + 90}"]) for d in (0, 30, 60)) > 0.1


def test_views_are_described_in_words_for_plots():
    from equiray.data.views import describe_view

    assert [describe_view(v) for v in ("upright", "rot:C4:1", "rot:D4:5", "rot:D4:4", "angle:22.5", "noise:3",
                                       "so2", "reflect")] == [
        "upright", "turned 90 deg", "turned 90 deg, mirrored", "mirrored", "turned 22.5 deg", "noise, severity 3",
        "random angle", "mirrored"]
