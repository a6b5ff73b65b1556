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


def test_fast_tanh_is_tanh_with_tanhs_gradient():
    """The members' sigmoid-based tanh: values and gradients of torch.tanh (float64 reference), works under
    vmap; and it really is a different kernel from the sigmoid it is built on (a twin that would pass for any
    elementwise op fails)."""
    from torch.func import grad, vmap

    from equiray.models.small import SmallCNN, Tanh, fast_tanh

    x = (torch.randn(4096) * 4).requires_grad_()
    y = fast_tanh(x)
    y.sum().backward()
    ref = x.detach().double().requires_grad_()
    torch.tanh(ref).sum().backward()
    assert (y.double() - torch.tanh(ref)).abs().max() < 5e-7
    assert (x.grad.double() - ref.grad).abs().max() < 1e-6
    assert (torch.sigmoid(x) - torch.tanh(x)).abs().max() > 0.1  # the test can tell functions apart
    batched = vmap(grad(lambda t: fast_tanh(t).sum()))(x.detach().view(64, 64))
    assert torch.allclose(batched.flatten(), x.grad, atol=1e-6)
    assert fast_tanh(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    assert any(isinstance(m, Tanh) for m in SmallCNN().modules())


def test_orbit_averaging_is_invariant_to_its_group_and_only_to_it():
    """Test-time averaging over C4: the same output for every quarter turn of the input (the mean of the same
    probabilities in another order), a probability distribution; not invariant to a mirror, which C4 lacks, and
    not the bare backbone's output."""
    import torch

    from equiray.models import OrbitAveraged, create_model

    torch.manual_seed(0)
    backbone = create_model("small_cnn", width=4).eval()
    net = create_model("orbit_averaged", backbone="small_cnn", backbone_kwargs={"width": 4}, group="C4").eval()
    net.backbone.load_state_dict(backbone.state_dict())
    assert isinstance(net, OrbitAveraged)
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        out = net(x)
        assert torch.allclose(out.exp().sum(-1), torch.ones(6), atol=1e-5)
        for k in (1, 2, 3):
            assert torch.allclose(net(torch.rot90(x, k, (-2, -1))), out, atol=1e-5)
        assert (net(x.flip(-1)) - out).abs().max() > 1e-3
        assert (out - backbone(x).log_softmax(-1)).abs().max() > 1e-3


def test_averaging_over_cosets_equals_the_whole_orbit_for_a_backbone_invariant_to_the_subgroup():
    """OrbitAveraged(net, G, modulo=H): one copy per coset of H. For a net already invariant to H (here itself a
    C4 average) that is the whole D4 average at 2 passes instead of 8, so it is invariant to mirrors and quarter
    turns; around a net that is not H-invariant it is not (the subgroup's invariance is the backbone's to bring)."""
    from equiray.errors import ConfigError
    from equiray.groups import get_group
    from equiray.models import OrbitAveraged, averaged
    from equiray.models.orbit import coset_representatives, parse_orbit

    assert coset_representatives(get_group("C16"), get_group("C8")).tolist() == [0, 1]  # 0 and 22.5 degrees
    assert coset_representatives(get_group("D4"), get_group("C4")).tolist() == [0, 4]  # upright and mirrored
    assert coset_representatives(get_group("D4"), get_group("C2")).tolist() == [0, 1, 4, 5]
    assert coset_representatives(get_group("D8")).tolist() == list(range(16))
    for bad in ("C8/D4", "C4/C8", "C8/C3"):
        with pytest.raises(ConfigError, match="is not a subgroup"):
            parse_orbit(bad)
    assert parse_orbit("d16/d8") == ("D16", "D8") and parse_orbit("D1") == ("D1", None) and parse_orbit("") is None

    torch.manual_seed(0)
    net = create_model("small_cnn", width=4).eval()
    c4 = OrbitAveraged(net, "C4")
    whole, by_coset = OrbitAveraged(net, "D4"), OrbitAveraged(c4, "D4", modulo="C4")
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        out = by_coset(x)
        torch.testing.assert_close(out, whole(x), atol=1e-5, rtol=1e-5)
        for turned in (x.flip(-1), torch.rot90(x, 1, (-2, -1)), torch.rot90(x.flip(-1), 3, (-2, -1))):
            torch.testing.assert_close(by_coset(turned), out, atol=1e-5, rtol=1e-5)
        assert (out - c4(x)).abs().max() > 1e-4  # the mirror copy counts (10x the tolerance above)
        bare = OrbitAveraged(net, "D4", modulo="C4")  # not C4-invariant inside: not D4-invariant outside
        assert (bare(torch.rot90(x, 1, (-2, -1))) - bare(x)).abs().max() > 1e-4
        assert averaged(net, "") is net and isinstance(averaged(net, "D1"), OrbitAveraged)


def test_an_averaged_canonicalized_model_tells_the_pose_of_the_inputs_as_they_came():
    """forward_with_info through OrbitAveraged: the averaged logits, and the canonicalizer's decision on the input
    itself (not on the other copies), batch-sized; the serving path (predict_detailed) reports that pose."""
    from equiray.canon import canonicalized_in
    from equiray.inference import predict_detailed
    from equiray.models import Mixture, OrbitAveraged

    torch.manual_seed(0)
    canon = create_model("canonicalized", backbone="small_cnn", backbone_kwargs={"width": 4},
                         canonicalizer_kwargs={"channels": 4}, group="C8", pose="angle").eval()
    avg = OrbitAveraged(canon, "C16", modulo="C8")
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        out, info = avg.forward_with_info(x)
        own = canon.forward_with_info(x)[1]
        torch.testing.assert_close(out, avg(x))
        assert torch.equal(info.element, own.element) and info.scores.shape == own.scores.shape
        assert canonicalized_in(avg) is canon and canonicalized_in(create_model("small_cnn")) is None
        served = predict_detailed(Mixture([avg, create_model("small_cnn", width=4).eval()]), x)
        assert torch.equal(served.element, own.element) and served.pose_deg.shape == (6,)


def test_the_papers_network_has_its_structure_and_10480_weights():
    """nf_cnn is Nordenfors & Flinth's experiment net: 3 bias-free convs (5-tap supports), two 2x2 average pools,
    tanh, LayerNorm over positions without affine, a flattened linear head without bias; N(0, 1) weights."""
    from equiray.models import PaperCNN, effective_parameters

    torch.manual_seed(0)
    for support in ("symmetric", "cross_corner"):
        net = create_model("nf_cnn", support=support)
        assert isinstance(net, PaperCNN) and effective_parameters(net) == 10_480
        assert net.head.bias is None and net.head.in_features == 16 * 7 * 7
        assert all(c.bias is None and torch.equal(c.weight * c.mask, c.weight) for c in net.convs)
        assert not any(isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) for m in net.modules())  # no affine
        assert net.head.weight.std().item() == pytest.approx(1.0, abs=0.05)  # N(0, 1), not PyTorch's default
    assert effective_parameters(create_model("small_cnn", support="symmetric")) == 2_906  # equiray's compact one
    assert effective_parameters(create_model("nf_cnn", input_size=12)) == 2_640 + 16 * 3 * 3 * 10
    with pytest.raises(EquirayError, match="multiple of 4"):
        create_model("nf_cnn", input_size=14)
    # the paper's asymmetric support: the plus's four arms and a corner, no centre
    assert SUPPORTS["cross_corner"].sum() == 5 and SUPPORTS["cross_corner"][1, 1] == 0
    assert not torch.equal(torch.rot90(SUPPORTS["cross_corner"], 1), SUPPORTS["cross_corner"])


def _c4_projected(net):
    """``net`` with every conv kernel and the head's per-position map averaged over the four quarter turns."""
    with torch.no_grad():
        for conv in net.convs:
            conv.weight.copy_(sum(torch.rot90(conv.weight, k, dims=(-2, -1)) for k in range(4)) / 4)
        w = net.head.weight.view(net.head.out_features, -1, 7, 7)
        net.head.weight.copy_((sum(torch.rot90(w, k, dims=(-2, -1)) for k in range(4)) / 4).flatten(1))
    return net


def test_the_papers_network_with_c4_invariant_weights_is_c4_invariant(gen):
    """Equivariance: every layer commutes with rot90 once its weights are rot90-invariant (the pools, tanh and
    the per-map LayerNorm do by construction), so the net is invariant; sensitivity: with its drawn weights it
    is not."""
    torch.manual_seed(1)
    net = create_model("nf_cnn", support="symmetric").double()
    x = torch.rand(5, 1, 28, 28, generator=gen, dtype=torch.float64)
    turned = torch.rot90(x, 1, dims=(-2, -1))
    assert (net(turned) - net(x)).abs().max() > 1e-2
    net = _c4_projected(net)
    torch.testing.assert_close(net(turned), net(x))


class _Fixed(torch.nn.Module):
    """A 'model' that answers the same logits for every input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float64)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_mixture_is_the_weighted_mean_of_the_members_probabilities():
    """Known answer: members sure of different classes, mixed 3:1, give probabilities 0.75 / 0.25 (up to the
    members' own softmax); the output is a log-probability (its softmax is itself)."""
    from equiray.models import Mixture

    a, b = _Fixed([20.0, 0.0, 0.0]), _Fixed([0.0, 20.0, 0.0])
    out = Mixture([a, b], [3, 1])(torch.zeros(2, 1, 4, 4))
    torch.testing.assert_close(out.exp(), torch.tensor([[0.75, 0.25, 0.0]] * 2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    # sensitivity: other weights, another answer; equal weights by default
    torch.testing.assert_close(Mixture([a, b])(torch.zeros(1, 1, 4, 4)).exp()[0, :2],
                               torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6, rtol=0)


def test_mixture_by_name_averages_real_members_and_rebuilds_from_its_spec(gen):
    """``create_model("mixture", members=...)`` averages its members' softmax as a hand-written average does, and a
    second build from the same spec with the first's weights answers the same (how a registered model reloads)."""
    torch.manual_seed(0)
    spec = {"members": [{"name": "small_cnn", "kwargs": {"width": 4}}, {"name": "resnet8"}], "weights": [0.6, 0.4]}
    mix = create_model("mixture", **spec).eval()
    x = torch.rand(3, 1, 28, 28, generator=gen)
    with torch.no_grad():
        by_hand = 0.6 * mix.members[0](x).softmax(-1) + 0.4 * mix.members[1](x).softmax(-1)
        torch.testing.assert_close(mix(x).exp(), by_hand)
        again = create_model("mixture", **spec).eval()
        assert not torch.allclose(again(x), mix(x))  # drawn afresh: different until loaded
        again.load_state_dict(mix.state_dict())
        torch.testing.assert_close(again(x), mix(x))


def test_mixture_rejects_what_it_cannot_mix():
    from equiray.errors import ConfigError
    from equiray.models import Mixture

    with pytest.raises(ConfigError, match="at least one member"):
        Mixture([])
    with pytest.raises(ConfigError, match="one non-negative weight per member"):
        Mixture([_Fixed([0.0]), _Fixed([1.0])], [1.0])
    with pytest.raises(ConfigError, match="not all 0"):
        Mixture([_Fixed([0.0])], [0.0])
