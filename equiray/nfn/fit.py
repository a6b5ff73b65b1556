"""Fitting a metanetwork to a per-network target (test accuracy) and scoring it by rank correlation."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn as nn

from equiray.errors import EquirayError
from equiray.nfn.spec import WeightSpaceFeatures


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kendall_tau(pred: torch.Tensor | Sequence[float], target: torch.Tensor | Sequence[float]) -> float:
    """Kendall's tau-b between predicted and true values (the zoo literature's score for accuracy prediction)."""
    from scipy.stats import kendalltau

    pred, target = torch.as_tensor(pred).double().flatten(), torch.as_tensor(target).double().flatten()
    if pred.numel() != target.numel() or pred.numel() < 2:
        raise EquirayError(f"kendall_tau needs two equally long series of >= 2 values, got {pred.numel()} and "
                           f"{target.numel()}")
    tau = kendalltau(pred.numpy(), target.numpy()).statistic
    return float(tau) if math.isfinite(tau) else 0.0  # constant predictions rank nothing


@torch.no_grad()
def predict(model: nn.Module, features: WeightSpaceFeatures, *, batch_size: int = 256) -> torch.Tensor:
    """``model`` on every network of ``features`` in eval mode, in batches: (B,) for a one-output metanetwork."""
    model.eval()
    out = [model(features[i:i + batch_size]) for i in range(0, features.batch_size, batch_size)]
    return torch.cat(out).squeeze(-1)


@dataclasses.dataclass
class MetaFit:
    """What :func:`fit_metanetwork` returns: the per-epoch history, the chosen epoch, and the target scaling
    (predictions in target units are ``model(features) * std + mean``)."""

    history: list[dict]
    best_epoch: int
    mean: float
    std: float
    seconds: float


def fit_metanetwork(model: nn.Module, features: WeightSpaceFeatures, targets: torch.Tensor, *,
                    train_idx: torch.Tensor, val_idx: torch.Tensor, epochs: int = 100, batch_size: int = 16,
                    lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                    on_epoch: Callable[[dict], None] | None = None) -> MetaFit:
    """Regress ``targets`` (e.g. test accuracy, one per network) from weights with MSE on standardised targets,
    Adam, ``epochs`` passes over ``train_idx``; the weights of the epoch with the best validation Kendall tau are
    kept (the model is left holding them). ``on_epoch`` sees each epoch's record."""
    import copy
    import time

    if len(train_idx) < 2 or len(val_idx) < 2:
        raise EquirayError(f"need >= 2 training and >= 2 validation networks, got {len(train_idx)} and {len(val_idx)}")
    targets = torch.as_tensor(targets, dtype=features.dtype, device=features.device).flatten()
    mean, std = float(targets[train_idx].mean()), float(targets[train_idx].std().clamp_min(1e-8))
    z = (targets - mean) / std
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history, best, best_state, best_epoch = [], -float("inf"), None, 0
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        total = 0.0
        for idx in train_idx[torch.randperm(len(train_idx), generator=gen)].split(batch_size):
            loss = nn.functional.mse_loss(model(features[idx.to(features.device)]).squeeze(-1), z[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val_tau = kendall_tau(predict(model, features[val_idx]), targets[val_idx])
        record = {"epoch": epoch, "train_loss": total / len(train_idx), "val_tau": val_tau}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if val_tau > best:
            best, best_epoch, best_state = val_tau, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return MetaFit(history, best_epoch, mean, std, time.perf_counter() - t0)
