import pytest
import torch

from equiray.errors import EquirayError
from equiray.models import SUPPORTS, create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_registered_models_build_and_run(name):
    model = create_model(name, in_chans=1, num_classes=7)
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_timm_models_by_name():
    model = create_model("resnet18", in_chans=3, num_classes=5)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    assert model.__class__.__module__.startswith("timm.")


def test_unknown_models_and_options_are_clear():
    with pytest.raises(EquirayError, match="resnet18"):
        create_model("resnet-18")
    with pytest.raises(EquirayError, match="no hub weights"):
        create_model("small_cnn", pretrained=True)
    with pytest.raises(EquirayError, match="filter support"):
        create_model("small_cnn", support="diagonal")


def test_filter_supports():
    for name in ("full", "symmetric"):
        mask = SUPPORTS[name]
        assert torch.equal(torch.rot90(mask, 1), mask) and torch.equal(mask.flip(-1), mask)
    assert not torch.equal(torch.rot90(SUPPORTS["asymmetric"], 1), SUPPORTS["asymmetric"])


def test_weights_outside_the_support_never_matter(gen):
    model = create_model("small_cnn", support="symmetric")
    x = torch.rand(4, 1, 12, 12, generator=gen)
    before = model(x)
    conv = model.features[0]
    with torch.no_grad():
        conv.weight[:, :, 0, 0] += 10.0  # a corner: outside the plus-shaped support
    assert torch.allclose(model(x), before)
    with torch.no_grad():
        conv.weight[:, :, 1, 1] += 1.0  # the centre: inside
    assert not torch.allclose(model(x), before)


def test_small_cnn_symmetric_support_is_c4_equivariant_up_to_filters():
    """The architecture's layer set is closed under rot90 (condition (a)): rotating every filter of a
    symmetric-support net gives a net whose output on rotated inputs equals the original's."""
    torch.manual_seed(0)
    net = create_model("small_cnn", support="symmetric").double()
    rotated = create_model("small_cnn", support="symmetric").double()
    rotated.load_state_dict(net.state_dict())
    with torch.no_grad():
        for conv in (m for m in rotated.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.copy_(torch.rot90(conv.weight, 1, dims=(-2, -1)))
    x = torch.rand(5, 1, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(rotated(torch.rot90(x, 1, dims=(-2, -1))), net(x))
    # sensitivity: without rotating the filters, the same net is not invariant
    assert not torch.allclose(net(torch.rot90(x, 1, dims=(-2, -1))), net(x))
