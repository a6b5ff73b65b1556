"""Temperature scaling and the expected calibration error: the fitted temperature recovers a known
overconfidence, lowers the NLL on held-out data and leaves every prediction as it was; ECE as torchmetrics
computes it."""
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from equiray.calibration import calibrate, expected_calibration_error, fit_temperature, negative_log_likelihood


def overconfident(n: int, k: int = 10, scale: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(true logits); the classifier reports ``scale`` times the true logits."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, k, generator=g) * 2
    labels = torch.multinomial(true.softmax(-1), 1, generator=g).squeeze(1)
    return true * scale, labels


def test_temperature_recovers_the_overconfidence_and_lowers_held_out_nll():
    logits, labels = overconfident(8000)
    fit, held = slice(0, 4000), slice(4000, None)
    t = fit_temperature(logits[fit], labels[fit])
    assert t == pytest.approx(3.0, rel=0.1)
    before = negative_log_likelihood(logits[held], labels[held])
    after = negative_log_likelihood(logits[held], labels[held], t)
    assert after < before - 0.1
    assert torch.equal((logits[held] / t).argmax(-1), logits[held].argmax(-1))  # no prediction changes
    report = calibrate(logits[held], labels[held], temperature=t)
    assert report.ece_after < report.ece_before and report.ece_after < 0.03


def test_an_already_calibrated_model_keeps_a_temperature_near_one():
    logits, labels = overconfident(8000, scale=1.0, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)


def test_underconfidence_gets_a_temperature_below_one():
    logits, labels = overconfident(8000, scale=0.4, seed=2)
    assert fit_temperature(logits, labels) == pytest.approx(0.4, rel=0.1)


@pytest.mark.parametrize("seed", range(4))
def test_ece_matches_torchmetrics(seed):
    logits, labels = overconfident(3000, scale=1.0 + seed, seed=seed)
    probs = logits.softmax(-1)
    reference = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(probs, labels)
    assert expected_calibration_error(probs, labels) == pytest.approx(float(reference), abs=1e-6)


def test_ece_by_hand_and_on_bin_edges():
    # confidences 0.9 (right), 0.9 (wrong), 1.0 (right): bins [0.8667, 0.9333) -> |0.5 - 0.9| * 2/3, {1.0} -> 0
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4 * 2 / 3)
    perfect = torch.eye(4)
    assert expected_calibration_error(perfect, torch.arange(4)) == 0.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        fit_temperature(torch.zeros(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="no held-out"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
