"""The library's GPU paths: each piece on a CUDA device gives what it gives on the CPU, and keeps its symmetry
there. Skipped where no GPU is (CI here); run on a GPU node with ``python -m pytest tests/test_cuda.py``.
``EQUIRAY_TEST_DEVICE=cpu`` runs the same code against the CPU (a check of the tests themselves)."""
import os

import pytest
import torch
import torch.nn.functional as F

from equiray.groups import get_group

CUDA = torch.device(os.environ.get("EQUIRAY_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 would make CPU and GPU differ by ~1e-3 for reasons that are not ours."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("gname", ["C4", "C8", "D4", "D8"])
def test_group_action_on_gpu_matches_cpu(gname):
    """Exact and interpolated elements (the cached bilinear plans are per device)."""
    g = get_group(gname)
    x = torch.rand(2 * g.order, 3, 17, 17)
    el = torch.arange(g.order).repeat(2)
    for padding in ("zeros", "border"):
        assert torch.allclose(g.act(x.to(CUDA), el.to(CUDA), padding=padding).cpu(), g.act(x, el, padding=padding),
                              atol=1e-5)


def test_member_group_on_gpu_matches_cpu_and_trains():
    """One launch per layer for the whole group on the GPU vs cache-sized chunks on the CPU: the same logits;
    a training epoch on the GPU lowers the loss."""
    from equiray.ensembles import MemberSpec, build_members, train_members_epoch

    ens = build_members(MemberSpec("small_cnn", {"width": 16}), range(12))
    x = torch.rand(32, 1, 28, 28)
    ref = ens.member_logits(x)
    gpu = ens.to(CUDA)
    assert torch.allclose(gpu.member_logits(x.to(CUDA)).cpu(), ref, atol=1e-4)
    assert torch.allclose(gpu.member_logits(x.to(CUDA), vectorize="vmap").cpu(), ref, atol=1e-4)
    xs, ys = torch.rand(256, 1, 14, 14, device=CUDA), torch.randint(0, 10, (256,), device=CUDA)
    opt = torch.optim.Adam(gpu.parameters(), lr=0.01)
    gens = [torch.Generator().manual_seed(i) for i in range(12)]
    first = train_members_epoch(gpu, xs, ys, opt, batch_size=32, group=get_group("C4"), generators=gens, device=CUDA)
    for _ in range(3):
        last = train_members_epoch(gpu, xs, ys, opt, batch_size=32, group=None, generators=gens, device=CUDA)
    assert last["loss"] < first["loss"]


@pytest.mark.parametrize("kind", ["equivariant", "optimized"])
def test_canonicalized_model_on_gpu(kind):
    """The same outputs and chosen elements as on the CPU, and exact invariance to 90-degree rotations on the
    GPU; a horizontal flip (no element of C8) changes the output."""
    from equiray.canon import CanonicalizedModel, create_canonicalizer
    from equiray.models import create_model

    torch.manual_seed(0)
    g = get_group("C8")
    model = CanonicalizedModel(create_model("small_cnn"), create_canonicalizer(kind, g, in_chans=1)).eval()
    x = F.avg_pool2d(torch.rand(4, 1, 32, 32), 5, 1, padding=2)
    with torch.no_grad():
        ref, ref_info = model.forward_with_info(x)
        model = model.to(CUDA)
        out, info = model.forward_with_info(x.to(CUDA))
        assert torch.equal(info.element.cpu(), ref_info.element)
        assert torch.allclose(out.cpu(), ref, atol=1e-4)
        rotated = model(torch.rot90(x.to(CUDA), 1, (-2, -1)))
        assert torch.allclose(rotated, out, atol=1e-4)
        assert not torch.allclose(model(x.to(CUDA).flip(-1)), out, atol=1e-3)


def test_ftp_step_on_gpu_matches_cpu():
    from equiray.models import create_model
    from equiray.optim import FTP

    torch.manual_seed(0)
    cpu_model = create_model("small_cnn")
    gpu_model = create_model("small_cnn").to(CUDA)
    gpu_model.load_state_dict(cpu_model.state_dict())
    x, y = torch.rand(16, 1, 14, 14), torch.randint(0, 10, (16,))
    for model, dev in ((cpu_model, "cpu"), (gpu_model, CUDA)):
        opt = FTP(model.named_parameters(), lr=1e-2, exclude=("head.*",))
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
            opt.step()
    for (name, p), q in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        assert torch.allclose(q.cpu(), p, atol=1e-4), name


def test_monomial_nfn_on_gpu_is_invariant_and_matches_cpu():
    """Permuting a hidden layer's units (with the next layer's inputs) is a symmetry; permuting only the rows
    is not."""
    from equiray.nfn import LayerSpec, MonomialNFN, NetworkSpec, WeightSpaceFeatures

    torch.manual_seed(0)
    spec = NetworkSpec((LayerSpec(5, 2, (3, 3)), LayerSpec(4, 5, (3, 3)), LayerSpec(3, 4)))
    ws = tuple(torch.randn(3, 1, *s.weight_shape) for s in spec.layers)
    bs = tuple(torch.randn(3, 1, *s.bias_shape) for s in spec.layers)
    net = MonomialNFN(spec, path_norms=True).eval()
    ref = net(WeightSpaceFeatures(ws, bs))
    net = net.to(CUDA)
    on_gpu = tuple(w.to(CUDA) for w in ws), tuple(b.to(CUDA) for b in bs)
    out = net(WeightSpaceFeatures(*on_gpu))
    assert torch.allclose(out.cpu(), ref, atol=1e-4)
    perm = torch.randperm(5, device=CUDA)
    w0, w1 = on_gpu[0][0][:, :, perm], on_gpu[0][1][:, :, :, perm]
    b0 = on_gpu[1][0][:, :, perm]
    moved = net(WeightSpaceFeatures((w0, w1, on_gpu[0][2]), (b0, *on_gpu[1][1:])))
    assert torch.allclose(moved, out, atol=1e-4)
    rows_only = net(WeightSpaceFeatures((w0, *on_gpu[0][1:]), (b0, *on_gpu[1][1:])))
    assert not torch.allclose(rows_only, out, atol=1e-3)
