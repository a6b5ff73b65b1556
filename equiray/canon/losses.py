"""The canonicalizer's training terms: the straight-through choice, the canonicalization prior (Mondal et al.
2023), the optimized canonicalizer's contrastive term (Panigrahi & Mondal 2024), and the identity rate."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from equiray.groups import Group

__all__ = ["straight_through", "prior_loss", "contrastive_loss", "identity_rate"]


def straight_through(scores: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Hard one-hot of the argmax in the forward pass, ``softmax(beta * scores)``'s gradient in the backward."""
    soft = torch.softmax(beta * scores, dim=-1)
    hard = F.one_hot(scores.argmax(-1), scores.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


def prior_loss(scores: torch.Tensor, group: Group, *, beta: float = 1.0) -> torch.Tensor:
    """The canonicalization prior: cross-entropy of ``beta * scores`` against the identity (use on upright data)."""
    target = torch.full((scores.shape[0],), group.identity, dtype=torch.long, device=scores.device)
    return F.cross_entropy(beta * scores, target)


def contrastive_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean absolute off-diagonal of ``V V^T`` per input (V: unit embeddings of the |G| copies): pushes the copies
    apart so the argmax is unique (Panigrahi & Mondal)."""
    sim = embeddings @ embeddings.transpose(-1, -2)  # (B, |G|, |G|)
    n = sim.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return sim[:, off].abs().mean()


def identity_rate(element: torch.Tensor, group: Group) -> float:
    """Share of inputs mapped to the identity (on upright data: how often the canonicalizer leaves them alone)."""
    return float((element == group.identity).float().mean()) if element.numel() else float("nan")
