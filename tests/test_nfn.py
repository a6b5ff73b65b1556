"""Monomial-NFN: equivariance of every layer, invariance of the metanetwork, the zoo symmetry itself, and
sensitivity twins (transformations that are not symmetries must change the result)."""
import copy

import pytest
import torch
import torch.nn as nn

from equiray.errors import EquirayError
from equiray.nfn import (FirstLayerMap, HiddenLayerMap, LastLayerMap, LayerSpec, MonomialLinear, MonomialNFN,
                         NetworkSpec, StatNN, WeightSpaceFeatures, WeightSymmetry, apply_symmetry,
                         create_metanetwork, features_from_models, features_from_normalized_cnns,
                         features_from_state_dicts, fit_metanetwork,
                         kendall_tau, list_metanetworks, load_features_into, path_norms, predict,
                         random_symmetry, zoo_cnn)

torch.set_num_threads(1)

TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}}
ACT = {"positive": "relu", "sign": "tanh"}
ZOO = NetworkSpec((LayerSpec(16, 1, (3, 3)), LayerSpec(16, 16, (3, 3)), LayerSpec(16, 16, (3, 3)), LayerSpec(10, 16)))
SMALL_CNN = NetworkSpec((LayerSpec(5, 2, (3, 3)), LayerSpec(4, 5, (3, 3)), LayerSpec(3, 4)))
MLP = NetworkSpec((LayerSpec(6, 3), LayerSpec(5, 6), LayerSpec(4, 5), LayerSpec(2, 4)))
SPECS = {"small_cnn": SMALL_CNN, "mlp": MLP}


def random_features(spec, gen, batch=3, channels=2):
    weights = tuple(torch.randn(batch, channels, *s.weight_shape, generator=gen, dtype=torch.float64)
                    for s in spec.layers)
    biases = tuple(torch.randn(batch, channels, *s.bias_shape, generator=gen, dtype=torch.float64)
                   for s in spec.layers)
    return WeightSpaceFeatures(weights, biases)


def randomize(module, gen):
    """Random float64 parameters (default init leaves e.g. the free bias at zero)."""
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def max_rel_gap(a: WeightSpaceFeatures, b: WeightSpaceFeatures) -> float:
    pairs = zip(a.weights + a.biases, b.weights + b.biases)
    return max(float((x - y).detach().abs().max() / y.detach().abs().max()) for x, y in pairs)


def assert_features_close(a: WeightSpaceFeatures, b: WeightSpaceFeatures):
    for x, y in zip(a.weights + a.biases, b.weights + b.biases):
        torch.testing.assert_close(x, y, **TOL[torch.float64])


def permute_rows_only(features, index, perm):
    """An uncoupled transform: permute W_index's output axis, leave its bias and W_{index+1}'s input axis alone."""
    weights = list(features.weights)
    weights[index] = weights[index][:, :, perm]
    return WeightSpaceFeatures(tuple(weights), features.biases)


def layer_map_gap(layer_map, index, x, transform):
    """|g^-1 f(g x) - f(x)| on layer ``index``: comparing in the un-transformed frame keeps every entry at its own
    scale (g rescales entries by up to max_scale^2 in both directions)."""
    gx = apply_symmetry(x, transform)
    out_g = layer_map(gx.weights[index], gx.biases[index])
    back = transform.inverse().act_layer(index, *out_g)
    return back, layer_map(x.weights[index], x.biases[index])


# ----------------------------------------------------------------------------------------- the zoo
def test_zoo_cnn_has_4970_parameters():
    for activation in ("relu", "tanh"):
        assert sum(p.numel() for p in zoo_cnn(activation=activation).parameters()) == 4970
    assert sum(p.numel() for p in zoo_cnn(width=8).parameters()) != 4970


def test_features_from_models_shapes_and_roundtrip():
    torch.manual_seed(0)
    models = [zoo_cnn() for _ in range(3)]
    features, spec = features_from_models(models)
    assert spec == ZOO
    assert [tuple(w.shape) for w in features.weights] == [(3, 1, 16, 1, 3, 3), (3, 1, 16, 16, 3, 3),
                                                           (3, 1, 16, 16, 3, 3), (3, 1, 10, 16)]
    assert [tuple(b.shape) for b in features.biases] == [(3, 1, 16), (3, 1, 16), (3, 1, 16), (3, 1, 10)]
    x = torch.randn(2, 1, 16, 16)
    fresh = load_features_into(zoo_cnn(), features, 2)
    torch.testing.assert_close(fresh(x), models[2](x))
    from_sd, spec_sd = features_from_state_dicts([m.state_dict() for m in models])
    assert spec_sd == spec
    for a, b in zip(from_sd.weights + from_sd.biases, features.weights + features.biases):
        assert torch.equal(a, b)


def test_features_from_models_rejects_unsupported_models():
    with pytest.raises(EquirayError, match="BatchNorm"):
        features_from_models([nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())])
    with pytest.raises(EquirayError, match="architecture"):
        features_from_models([zoo_cnn(), zoo_cnn(width=8)])
    with pytest.raises(EquirayError, match="flatten"):
        features_from_models([nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 2))])


@pytest.mark.parametrize("group", ["positive", "sign"])
def test_symmetry_preserves_the_zoo_function(group, gen):
    """(S1, S2) on a ReLU zoo net with positive scalings up to 1e4, and on a tanh net with sign flips."""
    torch.manual_seed(0)
    models = [zoo_cnn(activation=ACT[group]).double() for _ in range(2)]
    features, spec = features_from_models(models)
    g = random_symmetry(spec, 2, group=group, generator=gen)
    moved = apply_symmetry(features, g)
    x = torch.randn(4, 1, 16, 16, generator=gen, dtype=torch.float64)
    for i, model in enumerate(models):
        twin = load_features_into(copy.deepcopy(model), moved, i)
        assert not torch.allclose(twin.features[0].weight, model.features[0].weight)  # the weights did move
        torch.testing.assert_close(twin(x), model(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("activation,group", [("tanh", "positive"), ("relu", "sign")])
def test_wrong_symmetry_changes_the_zoo_function(activation, group, gen):
    """Sensitivity: positive scalings are no symmetry of tanh nets, sign flips none of ReLU nets."""
    torch.manual_seed(0)
    model = zoo_cnn(activation=activation).double()
    features, spec = features_from_models([model])
    moved = apply_symmetry(features, random_symmetry(spec, 1, group=group, max_scale=10.0, generator=gen))
    x = torch.randn(4, 1, 16, 16, generator=gen, dtype=torch.float64)
    twin = load_features_into(copy.deepcopy(model), moved, 0)
    assert (twin(x) - model(x)).abs().max() > 1e-3


def test_symmetry_inverse_undoes_it(gen):
    x = random_features(SMALL_CNN, gen)
    g = random_symmetry(SMALL_CNN, 3, group="positive", generator=gen)
    assert_features_close(apply_symmetry(apply_symmetry(x, g), g.inverse()), x)
    assert max_rel_gap(apply_symmetry(x, g), x) > 1e-2


# ----------------------------------------------------------------------------------------- equivariant layers
ROLES = {"first": (FirstLayerMap, 0), "hidden": (HiddenLayerMap, 1), "last": (LastLayerMap, -1)}


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("role", sorted(ROLES))
@pytest.mark.parametrize("group", ["positive", "sign"])
def test_layer_maps_are_equivariant(group, role, spec_name, gen):
    spec = SPECS[spec_name]
    cls, index = ROLES[role]
    index %= spec.num_layers
    layer_map = randomize(cls(spec.layers[index], 2, 3), gen)
    x = random_features(spec, gen)
    g = random_symmetry(spec, 3, group=group, max_scale=1e4, generator=gen)
    back, direct = layer_map_gap(layer_map, index, x, g)
    for a, b in zip(back, direct):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_first_layer_map_sees_an_uncoupled_permutation(gen):
    """Sensitivity: W_1 and b_1 are coupled (E1, E2): permuting W_1's rows without b_1's is no symmetry."""
    layer_map = randomize(FirstLayerMap(MLP.layers[0], 2, 3), gen)
    x = random_features(MLP, gen)
    perm = torch.roll(torch.arange(MLP.layers[0].out_features), 1)
    moved = permute_rows_only(x, 0, perm)
    with torch.no_grad():
        w_moved, b_moved = layer_map(moved.weights[0], moved.biases[0])
        w, b = layer_map(x.weights[0], x.biases[0])
    assert (w_moved - w[:, :, perm]).abs().max() > 1e-3  # b_1 -> W'_1 (E1)
    assert (b_moved - b).abs().max() > 1e-3  # W_1 -> b'_1 (E2): b_1 itself did not move


def test_hidden_layer_map_mixes_channels(gen):
    """Sensitivity: a transform that treats feature channels differently (not in the group) does not commute."""
    layer_map = randomize(HiddenLayerMap(MLP.layers[1], 2, 3), gen)
    x = random_features(MLP, gen)
    w, b = x.weights[1], x.biases[1]
    s = torch.tensor([1.0, -3.0], dtype=torch.float64).view(1, 2, 1, 1)
    w_out, _ = layer_map(w * s, b)
    w_ref, _ = layer_map(w, b)
    assert not any(torch.allclose(w_out, w_ref * c) for c in (1.0, -3.0))
    assert (w_out - w_ref).abs().max() > 1e-3


def test_last_layer_map_sees_output_scaling(gen):
    """Sensitivity: the output axis is fixed (d_L = 1); rescaling the output units is no symmetry."""
    last = MLP.layers[-1]
    layer_map = randomize(LastLayerMap(last, 2, 3), gen)
    x = random_features(MLP, gen)
    d = torch.tensor([2.0, -0.5], dtype=torch.float64).view(1, 1, 2, 1)
    w_out, b_out = layer_map(x.weights[-1] * d, x.biases[-1] * d[..., 0])
    w, b = layer_map(x.weights[-1], x.biases[-1])
    assert (w_out - w * d).abs().max() > 1e-3 and (b_out - b * d[..., 0]).abs().max() > 1e-3


def equivariant_gap(stack, x, g):
    """g^-1 stack(g x) and stack(x); the stack's output has no kernel axes but the same hidden axes."""
    out_g = stack(apply_symmetry(x, g))
    return apply_symmetry(out_g, g.inverse()), stack(x)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("group", ["positive", "sign"])
def test_equivariant_stack_is_equivariant(group, spec_name, gen):
    """The full stack (MonomialLinear + ReLU|tanh, twice) under permutations with scalings up to 1e4 / sign flips."""
    spec = SPECS[spec_name]
    torch.manual_seed(0)
    net = randomize(MonomialNFN(spec, group=group, in_channels=2, hidden_channels=4), gen)
    x = random_features(spec, gen)
    g = random_symmetry(spec, 3, group=group, max_scale=1e4, generator=gen)
    back, direct = equivariant_gap(net.equivariant, x, g)
    assert_features_close(back, direct)
    single = randomize(MonomialLinear(spec, 2, 3, group=group), gen)
    assert_features_close(*equivariant_gap(single, x, g))


@pytest.mark.parametrize("group,wrong", [("positive", "sign"), ("sign", "positive")])
def test_equivariant_stack_is_not_equivariant_to_the_other_group(group, wrong, gen):
    """Sensitivity: ReLU does not commute with sign flips, tanh not with positive scalings."""
    torch.manual_seed(0)
    net = randomize(MonomialNFN(MLP, group=group, in_channels=2, hidden_channels=4), gen)
    x = random_features(MLP, gen)
    g = random_symmetry(MLP, 3, group=wrong, max_scale=10.0, generator=gen)
    assert max_rel_gap(*equivariant_gap(net.equivariant, x, g)) > 1e-3


def test_sign_layer_couples_the_last_two_layers(gen):
    """Sensitivity of (E6): permuting (with flips) layer L-1's units without W_L's input axis is no symmetry."""
    layer = randomize(MonomialLinear(MLP, 2, 3, group="sign"), gen)
    x = random_features(MLP, gen)
    g = random_symmetry(MLP, 3, group="sign", generator=gen)

    def uncoupled(f):  # g on every tensor except W_L
        gf = apply_symmetry(f, g)
        return WeightSpaceFeatures(gf.weights[:-1] + f.weights[-1:], gf.biases)

    assert max_rel_gap(layer(uncoupled(x)), uncoupled(layer(x))) > 1e-3
    positive = randomize(MonomialLinear(MLP, 2, 3, group="positive"), gen)  # layer-local: blind to it
    assert_features_close(positive(uncoupled(x)), uncoupled(positive(x)))


# ----------------------------------------------------------------------------------------- invariant metanetwork
@pytest.mark.parametrize("path_norms", [False, True])
@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("group", ["positive", "sign"])
def test_metanetwork_is_invariant(group, spec_name, path_norms, gen):
    spec = SPECS[spec_name]
    torch.manual_seed(0)
    net = randomize(MonomialNFN(spec, group=group, in_channels=2, hidden_channels=4, mlp_hidden=(8,),
                                path_norms=path_norms), gen)
    x = random_features(spec, gen)
    y = net(x).detach()
    assert y.shape == (3, 1)
    for _ in range(2):
        g = random_symmetry(spec, 3, group=group, max_scale=1e4, generator=gen)
        torch.testing.assert_close(net(apply_symmetry(x, g)), y, rtol=1e-8, atol=1e-8 * float(y.abs().max()))


def test_zoo_metanetwork_is_invariant_on_real_zoo_weights(gen):
    torch.manual_seed(0)
    features, spec = features_from_models([zoo_cnn().double() for _ in range(2)])
    net = MonomialNFN(spec).double()
    y = net(features)
    g = random_symmetry(spec, 2, group="positive", max_scale=1e4, generator=gen)
    torch.testing.assert_close(net(apply_symmetry(features, g)), y, rtol=1e-8, atol=1e-10)


def test_sign_metanetwork_is_not_scale_invariant(gen):
    torch.manual_seed(0)
    net = randomize(MonomialNFN(MLP, group="sign", in_channels=2, hidden_channels=4, mlp_hidden=(8,)), gen)
    x = random_features(MLP, gen)
    g = random_symmetry(MLP, 3, group="positive", max_scale=10.0, generator=gen)
    assert (net(apply_symmetry(x, g)) - net(x)).abs().max() > 1e-4


def test_metanetwork_sees_uncoupled_first_layer_permutation_and_weight_changes(gen):
    torch.manual_seed(0)
    net = randomize(MonomialNFN(MLP, in_channels=2, hidden_channels=4, mlp_hidden=(8,)), gen)
    x = random_features(MLP, gen)
    y = net(x)
    perm = torch.roll(torch.arange(MLP.layers[0].out_features), 1)
    assert (net(permute_rows_only(x, 0, perm)) - y).abs().max() > 1e-4
    for i in range(MLP.num_layers):  # a change in any single layer's weights reaches the output
        weights = list(x.weights)
        weights[i] = weights[i] + torch.randn(weights[i].shape, generator=gen, dtype=torch.float64)
        assert (net(WeightSpaceFeatures(tuple(weights), x.biases)) - y).abs().max() > 1e-6


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("group", ["positive", "sign"])
def test_path_norms_are_invariant_and_see_what_is_not_a_symmetry(group, spec_name, gen):
    spec = SPECS[spec_name]
    x = random_features(spec, gen)
    ref = path_norms(x)
    for _ in range(2):
        g = random_symmetry(spec, 3, group=group, max_scale=1e4, generator=gen)
        torch.testing.assert_close(path_norms(apply_symmetry(x, g)), ref, rtol=1e-9, atol=1e-9)
    # sensitivity: an uncoupled permutation of one layer's units, and one layer scaled up alone
    perm = torch.roll(torch.arange(spec.layers[0].out_features), 1)
    assert (path_norms(permute_rows_only(x, 0, perm)) - ref).abs().max() > 1e-3
    for i in range(spec.num_layers):
        weights = list(x.weights)
        weights[i] = 3.0 * weights[i]
        assert (path_norms(WeightSpaceFeatures(tuple(weights), x.biases)) - ref).abs().max() > 0.1


def test_monomial_nfn_is_small_on_the_zoo():
    counts = {g: sum(p.numel() for p in MonomialNFN(ZOO, group=g, hidden_channels=16).parameters())
              for g in ("positive", "sign")}
    print(f"MonomialNFN parameters on the zoo spec (hidden_channels=16): {counts}")
    assert counts["positive"] < 20_000 and counts["sign"] < 25_000


# ----------------------------------------------------------------------------------------- registry, baseline
@pytest.mark.parametrize("name", list_metanetworks())
def test_registered_metanetworks_build_and_run(name, gen):
    net = create_metanetwork(name, MLP, in_channels=2, out_dim=3).double()
    assert net(random_features(MLP, gen)).shape == (3, 3)
    with pytest.raises(EquirayError, match="channels"):
        net(random_features(MLP, gen, channels=1))


def test_registry_errors_are_actionable():
    with pytest.raises(EquirayError, match="monomial-nfn"):
        create_metanetwork("nope", MLP)
    with pytest.raises(EquirayError, match="does not take"):
        create_metanetwork("statnn", MLP, group="positive")
    with pytest.raises(EquirayError, match="'positive'"):
        MonomialNFN(MLP, group="rotation")
    with pytest.raises(EquirayError, match="reads 3 units"):
        NetworkSpec((LayerSpec(4, 2), LayerSpec(2, 3)))


def test_statnn_is_permutation_invariant_but_not_scale_invariant(gen):
    net = randomize(StatNN(MLP, in_channels=2), gen)
    x = random_features(MLP, gen)
    y = net(x)
    perm = random_symmetry(MLP, 3, group="permutation", generator=gen)
    torch.testing.assert_close(net(apply_symmetry(x, perm)), y)
    scale = random_symmetry(MLP, 3, group="positive", max_scale=10.0, generator=gen)
    assert (net(apply_symmetry(x, scale)) - y).abs().max() > 1e-4


def test_transform_must_fit_the_features(gen):
    g = random_symmetry(MLP, 3, generator=gen)
    with pytest.raises(EquirayError, match="hidden layers"):
        apply_symmetry(random_features(SMALL_CNN, gen), g)
    assert isinstance(g, WeightSymmetry)


# ----------------------------------------------------------------------------------------- fitting
def test_kendall_tau_ranks_and_refuses_bad_input():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    assert kendall_tau([1, 1, 1], [1, 2, 3]) == 0.0  # constant predictions rank nothing
    with pytest.raises(EquirayError, match="equally long"):
        kendall_tau([1, 2], [1, 2, 3])


def test_fit_metanetwork_learns_a_weight_statistic_and_keeps_the_best_epoch():
    gen = torch.Generator().manual_seed(0)
    nets = [zoo_cnn() for _ in range(48)]
    for i, m in enumerate(nets):  # a target the weights determine: the spread of the first layer
        with torch.no_grad():
            m.features[0].weight.mul_(0.2 + 0.05 * i)
    feats, spec = features_from_models(nets)
    target = torch.tensor([float(m.features[0].weight.detach().std()) for m in nets])
    perm = torch.randperm(48, generator=gen)
    torch.manual_seed(0)
    model = StatNN(spec, mlp_hidden=(16,))
    fit = fit_metanetwork(model, feats, target, train_idx=perm[:32], val_idx=perm[32:], epochs=40, lr=3e-3)
    taus = [h["val_tau"] for h in fit.history]
    assert fit.history[fit.best_epoch - 1]["val_tau"] == max(taus) and len(taus) == 40
    assert kendall_tau(predict(model, feats[perm[32:]]), target[perm[32:]]) == pytest.approx(max(taus))
    assert max(taus) > 0.8
    with pytest.raises(EquirayError, match=">= 2 training"):
        fit_metanetwork(model, feats, target, train_idx=perm[:1], val_idx=perm[1:5])


# ----------------------------------------------------------------------------------------- ensemble members
def _member_symmetry(state: dict, perms: list[torch.Tensor], signs: list[torch.Tensor]) -> dict:
    """The true weight symmetry of a small_cnn: permute hidden channels; flip the norm's affine and the next
    layer's input channels."""
    out = {k: v.clone() for k, v in state.items()}
    convs = [k for k in state if k.startswith("features") and state[k].dim() == 4]
    for i, conv in enumerate(convs):
        norm = conv.rsplit(".", 2)[0] + f".{int(conv.split('.')[1]) + 1}"
        p, s = perms[i], signs[i]  # noqa: E741
        out[conv] = out[conv][p]
        out[norm + ".weight"] = s * out[norm + ".weight"][p]
        out[norm + ".bias"] = s * out[norm + ".bias"][p]
        nxt = convs[i + 1] if i + 1 < len(convs) else "head.weight"
        shape = (1, -1) + (1,) * (out[nxt].dim() - 2)
        out[nxt] = out[nxt][:, p] * s.view(shape)
    return out


def test_member_features_carry_the_members_sign_flip_symmetry():
    from equiray.models import create_model

    torch.manual_seed(0)
    nets = [create_model("small_cnn", support="asymmetric") for _ in range(3)]
    for n in nets:  # trained-looking affines, some negative
        with torch.no_grad():
            for m in n.modules():
                if isinstance(m, nn.GroupNorm):
                    m.weight.normal_()
                    m.bias.normal_()
    states = [n.state_dict() for n in nets]
    feats, spec = features_from_normalized_cnns(states)
    assert [f.shape[1] for f in feats.weights] == [2] * 4 and spec.hidden_sizes == (16, 16, 16)
    gen = torch.Generator().manual_seed(1)
    perms = [torch.randperm(16, generator=gen) for _ in range(3)]
    signs = [torch.where(torch.rand(16, generator=gen) < 0.5, -1.0, 1.0) for _ in range(3)]
    moved = [_member_symmetry(s, perms, signs) for s in states]
    x = torch.randn(4, 1, 14, 14, generator=gen)
    with torch.no_grad():  # the transformation is a symmetry of the member itself ...
        ref = nets[0](x)
        nets[0].load_state_dict(moved[0])
        torch.testing.assert_close(nets[0](x), ref, atol=1e-5, rtol=1e-5)
    # ... and the features move by exactly the monomial sign-flip action
    transform = WeightSymmetry(tuple(torch.stack([p] * 3) for p in perms), tuple(torch.stack([s] * 3).double()
                                                                                 for s in signs))
    expected = apply_symmetry(feats, transform)
    for a, b in zip(features_from_normalized_cnns(moved)[0], expected):
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])
    meta = MonomialNFN(spec, group="sign", in_channels=2)
    torch.testing.assert_close(meta(features_from_normalized_cnns(moved)[0]), meta(feats), atol=1e-5, rtol=1e-5)
    # sensitivity: tripling the first norm's gain (not a symmetry of this net) changes the function and the reading
    bad = {k: (3 * v if k == "features.1.weight" else v) for k, v in states[0].items()}
    nets[0].load_state_dict(bad)
    with torch.no_grad():
        assert not torch.allclose(nets[0](x), ref, atol=1e-3)
    assert not torch.allclose(meta(features_from_normalized_cnns([bad])[0]), meta(feats)[:1], atol=1e-4)
    with pytest.raises(EquirayError, match="neither a bias-free conv"):
        features_from_normalized_cnns([zoo_cnn().state_dict()])
