"""The distillation objective and the student-vs-teacher measures (equiray.distill)."""
import pytest
import torch
import torch.nn.functional as F

from equiray.distill import Distillation, distill_loss, measure, ms_per_image
from equiray.groups import get_group
from equiray.models import create_model
from equiray.train import shuffled_batches, train_epoch


def test_distill_loss_is_hintons_soft_target_loss(gen):
    s, t = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    y = torch.randint(10, (8,), generator=gen)
    p_t, T = F.softmax(t / 3.0, -1), 3.0
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(distill_loss(s, t, y, temperature=T, hard_weight=0.0), kl)
    torch.testing.assert_close(distill_loss(s, t, y, temperature=T, hard_weight=0.5),
                               kl + 0.5 * F.cross_entropy(s, y))
    assert float(distill_loss(t, t, y, temperature=T, hard_weight=0.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_objective_trains_the_student_only(gen):
    torch.manual_seed(0)
    teacher = create_model("small_cnn", in_chans=1, num_classes=10, width=4).eval()
    student = create_model("small_cnn", in_chans=1, num_classes=10, width=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = torch.rand(24, 1, 8, 8, generator=gen), torch.randint(10, (24,), generator=gen)
    objective = Distillation(teacher, temperature=2.0)
    step = objective(student, x, y)
    torch.testing.assert_close(step.loss, distill_loss(step.logits, teacher(x), y, temperature=2.0, hard_weight=0.0))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    stats = train_epoch(student, shuffled_batches(x, y, 8, generator=gen), opt, objective=objective,
                        augment=get_group("C4"), generator=gen)
    assert stats.samples == 24 and stats.loss >= 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="temperature"):
        Distillation(teacher, temperature=0.0)


def test_measure_and_latency(gen):
    model = create_model("small_cnn", in_chans=1, num_classes=10, width=4)
    x, y = torch.rand(16, 1, 8, 8, generator=gen), torch.randint(10, (16,), generator=gen)
    m = measure(model, x, y, get_group("C4"))
    assert m["orbit_size"] == 4 and 1 <= m["osp"] <= 4 and m["kl"] >= 0 and 0 <= m["accuracy"] <= 1
    assert ms_per_image(model, x, repeats=2) > 0 and not model.training
