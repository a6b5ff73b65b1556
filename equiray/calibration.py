"""Calibrated probabilities: temperature scaling (Guo et al. 2017) and the expected calibration error.

A classifier's softmax is often over- or under-confident. One temperature ``T``, fitted on held-out data by
minimising the negative log-likelihood of ``softmax(logits / T)``, corrects most of that without changing any
prediction (dividing by ``T > 0`` keeps the argmax). For an ensemble the temperature applies to the averaged
logits, after the members are combined (Rahaman & Thiery 2021).

The expected calibration error (ECE) bins the predictions by confidence (the top probability) into 15
equal-width bins and averages ``|accuracy - confidence|`` over the bins, weighted by their share of the
predictions: the L1 ECE of torchmetrics' ``MulticlassCalibrationError``, bin edges included (a confidence on an
edge goes to the bin above it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Calibration", "calibrate", "expected_calibration_error", "fit_temperature", "negative_log_likelihood"]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 200) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on (``logits`` (N, K), ``labels`` (N,));
    fitted as ``log T`` (so ``T`` stays positive) with L-BFGS in float64."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits (N, K) and labels (N,) expected, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no held-out predictions to fit a temperature on")
    z, y = logits.detach().double(), labels.detach().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature fit diverged (T = {t}): are the logits finite?")
    return t


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.detach().double() / temperature, labels.long()))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 15) -> float:
    """The L1 ECE of ``probs`` (N, K) against ``labels`` (N,) over ``n_bins`` equal-width confidence bins."""
    conf, pred = probs.detach().double().max(-1)
    correct = pred.eq(labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(conf, edges, right=True) - 1  # a confidence of exactly 1 gets a bin of its own
    count = torch.zeros(n_bins + 1, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins + 1, dtype=torch.float64).scatter_add_(0, index, conf)
    acc_sum = torch.zeros(n_bins + 1, dtype=torch.float64).scatter_add_(0, index, correct)
    used = count > 0
    gap = (acc_sum[used] / count[used] - conf_sum[used] / count[used]).abs()
    return float((gap * count[used] / len(conf)).sum())


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it did on the data it is reported on (ECE in [0, 1], NLL in nats)."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}temperature": self.temperature, f"{prefix}ece_before": self.ece_before,
                f"{prefix}ece_after": self.ece_after, f"{prefix}nll_before": self.nll_before,
                f"{prefix}nll_after": self.nll_after}


def calibrate(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float | None = None,
              n_bins: int = 15) -> Calibration:
    """Fit a temperature on (``logits``, ``labels``), or report a given ``temperature`` on them (held-out data)."""
    t = fit_temperature(logits, labels) if temperature is None else float(temperature)
    z = logits.detach().double()
    return Calibration(t, expected_calibration_error(z.softmax(-1), labels, n_bins=n_bins),
                       expected_calibration_error((z / t).softmax(-1), labels, n_bins=n_bins),
                       negative_log_likelihood(z, labels), negative_log_likelihood(z, labels, t))
