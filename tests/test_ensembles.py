import pytest
import torch

from equiray.ensembles import (MemberSpec, StackedEnsemble, build_members, load_group, save_group,
                               symmetric_core, train_members_epoch)
from equiray.groups import cyclic, dihedral
from equiray.models import SUPPORTS, create_model

SPEC = MemberSpec("small_cnn", {"width": 6})


def test_grouped_fast_path_equals_vmap(gen):
    ens = build_members(MemberSpec("small_cnn", {"width": 5, "support": "asymmetric"}), range(4)).double()
    x = torch.rand(3, 1, 10, 10, generator=gen, dtype=torch.float64)
    xm = torch.rand(4, 3, 1, 10, 10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ens.member_logits(x), ens.member_logits(x, vectorize="vmap"))
    torch.testing.assert_close(ens.member_logits(xm), ens.member_logits(xm, vectorize="vmap"))
    assert ens(x).shape == (3, 10)


def test_members_are_the_models_they_were_built_from(gen):
    members = [create_model("small_cnn", width=4) for _ in range(3)]
    ens = StackedEnsemble(MemberSpec("small_cnn", {"width": 4}), 3, members=members)
    x = torch.rand(2, 1, 8, 8, generator=gen)
    torch.testing.assert_close(ens.member_logits(x), torch.stack([m(x) for m in members]))


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("spec", [SPEC, MemberSpec("nf_cnn", {"width": 4, "input_size": 8})],
                         ids=["small_cnn", "nf_cnn"])
def test_vectorized_training_is_independent_training(spec, float64):
    """One optimizer over stacked members == each member trained alone on its own batches (small_cnn by its
    grouped-conv path, nf_cnn by vmap). In float64: in float32 the two summation orders drift apart by ~4e-5 over
    four steps (nf_cnn's LayerNorm), more than a tolerance that would still catch a wrong gradient."""
    x, y = torch.rand(64, 1, 8, 8), torch.randint(10, (64,))
    ens = build_members(spec, [11, 12, 13])
    singles = [ens.subset([i]) for i in range(3)]
    opt = torch.optim.SGD(ens.parameters(), lr=0.1)
    train_members_epoch(ens, x, y, opt, batch_size=16, group=cyclic(4),
                        generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for i, single in enumerate(singles):
        opt1 = torch.optim.SGD(single.parameters(), lr=0.1)
        train_members_epoch(single, x, y, opt1, batch_size=16, group=cyclic(4),
                            generators=[torch.Generator().manual_seed(i + 1)])
        torch.testing.assert_close(ens.subset([i]).state_dict(), single.state_dict())
    # sensitivity: members really differ from each other after training
    assert not torch.allclose(ens.subset([0]).member_logits(x), ens.subset([1]).member_logits(x))


def test_symmetric_core():
    assert torch.equal(symmetric_core(SUPPORTS["symmetric"], cyclic(4)), SUPPORTS["symmetric"])
    assert torch.equal(symmetric_core(SUPPORTS["full"], dihedral(4)), SUPPORTS["full"])
    core = symmetric_core(SUPPORTS["asymmetric"], cyclic(4))
    assert core.sum() == 1 and core[1, 1] == 1


def _energy_invariance_error(support, init, n, x):
    """Relative change, under rot90, of the members' mean feature energy E_w ||pool(features_w(x))||^2.
    (An even statistic: the mean *logits* of a zero-mean init are 0 for any support, so they prove nothing.)"""
    ens = build_members(MemberSpec("small_cnn", {"width": 4, "support": support}), range(n), init=init, group="C4")
    members = [ens.subset([i]) for i in range(n)]
    stats = []
    for k in range(4):
        xr = torch.rot90(x, k, dims=(-2, -1))
        with torch.no_grad():
            energy = 0
            for m in members:
                single = m.spec.build()
                single.load_state_dict({name.replace("__", "."): v[0] for name, v in m.state_dict().items()
                                        if not name.endswith("mask")}, strict=False)
                energy = energy + single.features(xr).mean((-2, -1)).pow(2).sum(-1) / n
        stats.append(energy)
    return max(float((stats[k] - stats[0]).abs().mean() / stats[0].mean()) for k in (1, 2, 3))


def test_invariant_initial_distribution_is_invariant():
    """Condition (c) at t = 0: over many members, the feature statistics of a symmetric support (or of an
    asymmetric support with invariant init) are invariant; an asymmetric support's default init is not."""
    torch.manual_seed(0)
    x = torch.rand(16, 1, 10, 10)
    n = 400
    sym = _energy_invariance_error("symmetric", "default", n, x)
    inv = _energy_invariance_error("asymmetric", "invariant", n, x)
    asym = _energy_invariance_error("asymmetric", "default", n, x)
    few = _energy_invariance_error("symmetric", "default", 4, x)
    assert sym < asym / 3 and inv < asym / 3
    assert sym < few / 3  # finite ensembles approach invariance as they grow


def test_save_and_load_a_member_group(tmp_path, gen):
    ens = build_members(SPEC, [1, 2])
    path = save_group(ens, tmp_path / "g.safetensors", meta={"gid": 7})
    back, meta = load_group(path)
    x = torch.rand(2, 1, 8, 8, generator=gen)
    torch.testing.assert_close(back.member_logits(x), ens.member_logits(x))
    assert meta["gid"] == 7 and meta["num_members"] == 2
    # the registry model `ensemble` has the same state dict layout
    model = create_model("ensemble", member="small_cnn", member_kwargs={"width": 6}, num_members=2)
    model.load_state_dict(ens.state_dict())
    torch.testing.assert_close(model(x), ens(x))
    joined = StackedEnsemble.concat([ens, back])
    assert joined.num_members == 4 and torch.allclose(joined.member_logits(x)[2:], ens.member_logits(x))


def test_batchnorm_members_are_refused():
    from equiray.errors import EquirayError

    with pytest.raises(EquirayError, match="BatchNorm"):
        StackedEnsemble(MemberSpec("resnet8"), 2)


def test_chunked_grouped_path_equals_one_call(gen):
    from equiray.ensembles.stacked import _small_cnn_grouped

    ens = build_members(MemberSpec("small_cnn", {"width": 5}), range(5)).double()
    params, buffers = ens.stacked_state()
    x = torch.rand(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    xm = torch.rand(5, 3, 1, 8, 8, generator=gen, dtype=torch.float64)
    per_member = 3 * 5 * 8 * 8
    for inp in (x, xm):
        whole = _small_cnn_grouped(params, buffers, inp, 5, chunk_elements=10**9)
        chunked = _small_cnn_grouped(params, buffers, inp, 5, chunk_elements=2 * per_member)  # chunks of 2, 2, 1
        torch.testing.assert_close(chunked, whole)


def test_member_seeds_depend_on_the_member_alone():
    from equiray.ensembles import member_seed

    assert member_seed(0, 5) == member_seed(0, 5) != member_seed(0, 6) != member_seed(1, 6)
    assert len({member_seed(3, m) for m in range(1000)}) == 1000


def test_member_group_is_build_members_plus_its_optimizer_and_generators():
    """``MemberGroup.new`` + ``train_epoch`` is the hand-made loop: members from their seeds, generator i seeded
    seeds[i] + 1, the named optimizer; bit for bit."""
    from equiray.ensembles import MemberGroup

    x, y = torch.rand(48, 1, 8, 8), torch.randint(10, (48,))
    spec = MemberSpec("small_cnn", {"width": 4, "support": "asymmetric"})
    grp = MemberGroup.new(spec, [5, 9], init="invariant", group="C4", optimizer="adam", lr=0.02)
    ens = build_members(spec, [5, 9], init="invariant", group="C4")
    opt = torch.optim.Adam(ens.parameters(), lr=0.02)
    gens = [torch.Generator().manual_seed(s + 1) for s in (5, 9)]
    for epoch in range(2):
        stats = grp.train_epoch(x, y, batch_size=16, group=cyclic(4), node=f"n{epoch}")
        ref = train_members_epoch(ens, x, y, opt, batch_size=16, group=cyclic(4), generators=gens)
        assert stats.loss == ref["loss"] and stats.samples == ref["member_samples"] == 96
    assert grp.epochs_done == 2 and grp.nodes == ["n0", "n1"]
    for k, v in ens.state_dict().items():
        assert torch.equal(grp.ensemble.state_dict()[k], v), k


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_saved_member_group_continues_bit_for_bit(tmp_path, optimizer):
    from equiray.ensembles import MemberGroup

    x, y = torch.rand(48, 1, 8, 8), torch.randint(10, (48,))
    spec = MemberSpec("small_cnn", {"width": 4})
    straight = MemberGroup.new(spec, [1, 2, 3], optimizer=optimizer, lr=0.05)
    resumed = MemberGroup.new(spec, [1, 2, 3], optimizer=optimizer, lr=0.05)
    for grp in (straight, resumed):
        grp.train_epoch(x, y, batch_size=16, group=cyclic(4), node="a")
    resumed.save(tmp_path / "g.pt")
    assert MemberGroup.saved_epochs(tmp_path / "g.pt") == 1
    resumed = MemberGroup.load(tmp_path / "g.pt")
    assert resumed.epochs_done == 1 and resumed.nodes == ["a"] and resumed.seeds == (1, 2, 3)
    for grp in (straight, resumed):
        grp.train_epoch(x, y, batch_size=16, group=cyclic(4), node="b")
    for k, v in straight.ensemble.state_dict().items():
        assert torch.equal(resumed.ensemble.state_dict()[k], v), k
    # sensitivity: a group that lost its generator states does not continue the same way
    lost = MemberGroup.load(tmp_path / "g.pt")
    lost.generators = [torch.Generator().manual_seed(0) for _ in range(3)]
    lost.train_epoch(x, y, batch_size=16, group=cyclic(4))
    assert not torch.equal(lost.ensemble.features__0__weight, straight.ensemble.features__0__weight)


def test_unknown_member_optimizer_is_a_clear_error():
    from equiray.ensembles import MemberGroup
    from equiray.errors import EquirayError

    with pytest.raises(EquirayError, match="member optimizer"):
        MemberGroup.new(SPEC, [0], optimizer="lion")


def test_the_papers_network_stacks_and_its_asymmetric_support_starts_on_the_cross(gen):
    """nf_cnn members train vectorized like equiray's own (no running statistics: vmap == each member alone);
    the paper's invariant init on its asymmetric support keeps the 4-tap cross and zeroes the corner."""
    core = symmetric_core(SUPPORTS["cross_corner"], cyclic(4))
    assert torch.equal(core, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    spec = MemberSpec("nf_cnn", {"width": 4, "support": "cross_corner", "input_size": 12})
    ens = build_members(spec, range(3), init="invariant", group="C4").double()
    drawn = build_members(spec, range(3)).double()
    for name, w in ens.stacked_state()[0].items():
        if name.startswith("convs"):
            assert torch.all(w[..., 0, 0] == 0) and torch.all(w[..., 0, 1] != 0)
            assert torch.all(dict(drawn.stacked_state()[0])[name][..., 0, 0] != 0)  # sensitivity: default init
    x = torch.rand(2, 1, 12, 12, generator=gen, dtype=torch.float64)
    params = ens.stacked_state()[0]
    alone = []
    for i in range(3):
        member = spec.build().double()
        member.load_state_dict({n: t[i] for n, t in params.items()})
        alone.append(member(x))
    torch.testing.assert_close(ens.member_logits(x), torch.stack(alone))


# ------------------------------------------------------------------ strong members: a pretrained backbone, N ways
TINY_RESNET = {"channels": [4, 4, 4, 4], "stem_width": 4}


def pretrained_resnet(gen) -> torch.nn.Module:
    """A small resnet8 whose BatchNorm has running statistics of its own (a few batches in train mode)."""
    torch.manual_seed(0)
    model = create_model("resnet8", **TINY_RESNET)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 1, 16, 16, generator=gen) * 3 + 1)
    return model.eval()


def test_folded_batchnorm_computes_what_batchnorm_computed_in_eval_mode(gen):
    import copy

    from equiray.models import AffineNorm2d, freeze_batchnorm

    model = pretrained_resnet(gen)
    x = torch.rand(5, 1, 16, 16, generator=gen)
    folded = freeze_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, AffineNorm2d) for m in folded.modules()) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 13  # stem, 2 per block, 4 shortcuts
    torch.testing.assert_close(folded.train()(x), model(x), rtol=1e-5, atol=1e-5)  # the batch no longer matters
    # sensitivity: the statistics are what is folded in (a fresh net's BatchNorm computes something else)
    assert not torch.allclose(freeze_batchnorm(create_model("resnet8", **TINY_RESNET)).eval()(x), model(x),
                              atol=1e-3)


def test_strong_members_start_as_the_pretrained_model_and_stack(gen):
    from equiray.errors import EquirayError

    model = pretrained_resnet(gen)
    spec = MemberSpec("resnet8", TINY_RESNET, frozen_bn=True)
    ens = build_members(spec, [1, 2, 3], init="pretrained", pretrained=model)
    x = torch.rand(4, 1, 16, 16, generator=gen)
    torch.testing.assert_close(ens.member_logits(x), model(x).expand(3, 4, 10), rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the model itself is left as it was
    with pytest.raises(EquirayError, match="needs the pretrained model"):
        build_members(spec, [1], init="pretrained")
    with pytest.raises(EquirayError, match="not a resnet8 of this spec"):
        build_members(MemberSpec("resnet8", {"channels": [8, 8, 8, 8], "stem_width": 8}, frozen_bn=True), [1],
                      init="pretrained", pretrained=model)


@pytest.mark.parametrize("rotations", ["so2", "o2"])
def test_strong_members_get_their_own_rotations_and_exactly_their_own_gradients(rotations, gen, float64):
    """Copies of one pretrained resnet8 fine-tuned under random continuous rotations (vmap path): each member's
    result is what training it alone with its own generator gives, and the members, identical at the start,
    end apart (their angles differ)."""
    model = pretrained_resnet(gen).double()
    spec = MemberSpec("resnet8", TINY_RESNET, frozen_bn=True)
    x, y = torch.rand(48, 1, 16, 16, generator=gen), torch.randint(10, (48,), generator=gen)
    ens = build_members(spec, [1, 2, 3], init="pretrained", pretrained=model)
    singles = [ens.subset([i]) for i in range(3)]
    opt = torch.optim.Adam(ens.parameters(), lr=0.01)
    train_members_epoch(ens, x, y, opt, batch_size=16, group=None, rotations=rotations,
                        generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    for i, single in enumerate(singles):
        opt1 = torch.optim.Adam(single.parameters(), lr=0.01)
        train_members_epoch(single, x, y, opt1, batch_size=16, group=None, rotations=rotations,
                            generators=[torch.Generator().manual_seed(i + 1)])
        torch.testing.assert_close(ens.subset([i]).state_dict(), single.state_dict())
    assert not torch.allclose(ens.subset([0]).member_logits(x), ens.subset([1]).member_logits(x))


def test_members_see_different_angles_and_the_same_seed_sees_the_same(gen):
    """The rotations a member trains on come from its own generator: two members with the same data order get
    different images; the same seed twice, the same images (a resumed or re-run member is the same member)."""
    from equiray.ensembles import training

    seen = []
    ens = build_members(MemberSpec("small_cnn", {"width": 3}), [1, 2])
    original = ens.member_logits
    ens.member_logits = lambda xb, **kw: (seen.append(xb.detach().clone()), original(xb, **kw))[1]  # records batches
    x, y = torch.rand(16, 1, 12, 12, generator=gen), torch.randint(10, (16,), generator=gen)
    opt = torch.optim.SGD(ens.parameters(), lr=0.0)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    orders = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    training.train_members_epoch(ens, x, y, opt, batch_size=16, group=None, generators=gens, rotations="so2")
    first = seen.pop()
    # each member's images are its own batch, turned: not the upright images, and not the other member's turns
    idx = torch.stack([torch.randperm(16, generator=g) for g in orders])
    assert not torch.allclose(first[0], x[idx[0]]) and not torch.allclose(first[1], x[idx[1]])
    training.train_members_epoch(ens, x, y, opt, batch_size=16, group=None, rotations="so2",
                                 generators=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)])
    same = seen.pop()
    torch.testing.assert_close(same[0], same[1])  # one seed, one stream of angles
    torch.testing.assert_close(same[0], first[0])
    with pytest.raises(Exception, match="not both"):
        training.train_members_epoch(ens, x, y, opt, batch_size=16, group=cyclic(4), generators=gens,
                                     rotations="so2")
