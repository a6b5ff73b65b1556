"""Invariance measures of Nordenfors & Flinth (2024), for single models and for ensembles of any size.

- **OSP** (orbit same predictions): for each input, how many of the ``|G|`` transformed copies ``g.x`` get the
  same predicted class as ``x`` itself (identity included, so the maximum is ``|G|``), averaged over inputs.
- **Symmetric KL** between the softmax outputs for ``x`` and ``g.x``: ``KL(p||q) + KL(q||p)``, averaged over
  the non-identity elements ``g`` and the inputs (``kl``). The paper's code averages over all ``|G|`` elements,
  the identity's zero included (``kl_all``: ``(|G| - 1) / |G|`` times ``kl``, 3/4 for C4); tables say which.

Ensembles are measured from *orbit logits*: every member's logits on every transformed copy, computed once,
``(N, |G|, B, K)``; an ensemble of a subset of members is the mean of their logits.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from equiray.groups import Group

__all__ = ["orbit_logits", "osp", "symmetric_kl", "invariance", "bootstrap_curve", "size_grid"]


@torch.no_grad()
def orbit_logits(model_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, group: Group, *,
                 batch_size: int = 512, padding: str = "zeros") -> torch.Tensor:
    """``model_fn`` on every transformed copy of ``x``: ``(..., |G|, B, K)`` where ``model_fn`` maps
    ``(b, C, H, W)`` to ``(..., b, K)`` (a single model gives ``(|G|, B, K)``, member logits ``(N, |G|, B, K)``)."""
    per_g = []
    for g in group.elements():
        chunks = [model_fn(group.act(x[i:i + batch_size], g, padding=padding)).float()
                  for i in range(0, len(x), batch_size)]
        per_g.append(torch.cat(chunks, dim=-2))  # (..., B, K)
    return torch.stack(per_g, dim=-3)  # (..., |G|, B, K)


def osp(logits: torch.Tensor) -> torch.Tensor:
    """OSP from orbit logits ``(..., |G|, B, K)`` (element 0 the identity) -> ``(...)``, in [1, |G|]."""
    pred = logits.argmax(-1)  # (..., |G|, B)
    return (pred == pred[..., :1, :]).float().sum(-2).mean(-1)


def symmetric_kl(logits: torch.Tensor, *, over: str = "others") -> torch.Tensor:
    """Mean symmetric KL between outputs on ``x`` and ``g.x`` over the inputs and, ``over="others"``, the
    non-identity ``g`` (equiray's ``kl``) or, ``over="all"``, every ``g`` including the identity (the paper's
    code) -> ``(...)``."""
    if over not in ("others", "all"):
        raise ValueError(f"over: 'others' or 'all', not {over!r}")
    size = logits.shape[-3]
    if size < 2:
        return torch.zeros(logits.shape[:-3])
    logp = F.log_softmax(logits, dim=-1)  # (..., |G|, B, K)
    ref, rest = logp[..., :1, :, :], logp[..., 1:, :, :]
    kl = ((ref.exp() - rest.exp()) * (ref - rest)).sum(-1)  # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q)
    mean = kl.mean(dim=(-2, -1))
    return mean * (size - 1) / size if over == "all" else mean


def invariance(logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """OSP, symmetric KL and (with labels) upright and orbit-averaged accuracy of one model's orbit logits
    ``(|G|, B, K)``."""
    out = {"osp": float(osp(logits)), "kl": float(symmetric_kl(logits)),
           "kl_all": float(symmetric_kl(logits, over="all")), "orbit_size": logits.shape[-3]}
    if labels is not None:
        correct = (logits.argmax(-1) == labels).float()  # (|G|, B)
        out["accuracy"] = float(correct[0].mean())
        out["orbit_accuracy"] = float(correct.mean())
    return out


def bootstrap_curve(member_orbit_logits: torch.Tensor, sizes: Sequence[int], *, labels: torch.Tensor | None = None,
                    repeats: int = 20, generator: torch.Generator | None = None) -> list[dict]:
    """Invariance of the ensemble mean as a function of ensemble size: for each size, ``repeats`` subsets drawn
    with replacement (bootstrap) from the ``N`` members; mean and standard deviation over the subsets.

    ``member_orbit_logits``: ``(N, |G|, B, K)``.
    """
    n = member_orbit_logits.shape[0]
    rows = []
    for size in sizes:
        if size > n:
            continue
        stats = []
        for _ in range(repeats):
            idx = torch.randint(n, (size,), generator=generator)
            stats.append(invariance(member_orbit_logits[idx].mean(0), labels))
        row = {"size": size}
        for key in stats[0]:
            vals = torch.tensor([s[key] for s in stats], dtype=torch.float64)
            row[key] = float(vals.mean())
            row[f"{key}_std"] = float(vals.std()) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def size_grid(n: int) -> list[int]:
    """Ensemble sizes 1, 2, 5, 10, 20, 50, ... up to and including ``n``."""
    sizes, base = [], 1
    while base <= n:
        for m in (1, 2, 5):
            if m * base <= n:
                sizes.append(m * base)
        base *= 10
    if sizes[-1] != n:
        sizes.append(n)
    return sorted(set(sizes))
