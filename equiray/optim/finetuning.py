"""Fine-tuning a model with one robust method, epoch by epoch, through the library's one training loop.

:class:`RobustFineTuner` builds the method's optimizer for the model (:func:`~equiray.optim.make_optimizer`) and
runs each epoch as :func:`equiray.train.train_epoch` with the method's hooks: L2-SP's penalty as the
``regularizer`` (the reported loss stays the task's cross-entropy), and TPGM's projection as ``after_step``:
every ``projection_interval`` training steps the radii are fitted on a batch drawn at random from held-out data
(:meth:`~equiray.optim.TPGM.project`). All randomness (the epoch's order, the held-out batches) comes from the
``generator`` given to :meth:`RobustFineTuner.epoch`, in that order, so a run resumed with the generator's
saved state continues exactly.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.optim.base import RobustOptimizer
from equiray.optim.factory import OPTIMIZERS, make_optimizer
from equiray.optim.tpgm import TPGM
from equiray.train import EpochStats, shuffled_batches, train_epoch

Batch = tuple[torch.Tensor, torch.Tensor]


def fits_on_holdout(method: str) -> bool:
    """Whether ``method`` fits its radii on held-out data it does not train on (TPGM): give such a method a
    ``holdout`` and train it on the rest."""
    return issubclass(OPTIMIZERS.get(method), TPGM)


class RobustFineTuner:
    """``model`` fine-tuned with ``method`` (``"finetune"``, ``"l2sp"``, ``"ftp"``, ``"tpgm"``).

    ``lr``, ``weight_decay``, ``exclude`` and ``knobs`` go to :func:`~equiray.optim.make_optimizer` (the head is
    found and left unconstrained when ``exclude`` is None). ``holdout`` is TPGM's held-out ``(images, labels)``;
    without it, or for the other methods, nothing is projected outside ``step()``. The optimizer is
    :attr:`optimizer` (save and load its ``state_dict()`` to resume).
    """

    def __init__(self, model: nn.Module, method: str, *, lr: float, weight_decay: float, batch_size: int,
                 holdout: Batch | None = None, projection_interval: int = 10,
                 exclude: Sequence[str] | None = None, **knobs: Any):
        self.model = model
        self.optimizer: RobustOptimizer = make_optimizer(method, model, lr=lr, weight_decay=weight_decay,
                                                         exclude=exclude, **knobs)
        self.batch_size = batch_size
        self.holdout = holdout
        self.projection_interval = projection_interval

    def epoch(self, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator,
              device: torch.device | str = "cpu") -> EpochStats:
        """One pass over ``(x, y)`` in an order drawn from ``generator``; ``loss`` is the task loss alone."""
        batches = shuffled_batches(x, y, self.batch_size, generator=generator)
        return train_epoch(self.model, batches, self.optimizer, device=device,
                           regularizer=self.optimizer.regularizer,
                           after_step=self._projection(generator, device))

    def _projection(self, generator: torch.Generator, device: torch.device | str
                    ) -> Callable[[int], None] | None:
        """TPGM's ``after_step``: after every ``projection_interval``-th step of the epoch, fit the radii on
        ``min(batch_size, len(holdout))`` held-out samples drawn with replacement from ``generator``."""
        if not isinstance(self.optimizer, TPGM) or self.holdout is None:
            return None
        opt, hx, hy = self.optimizer, *self.holdout

        def project(step: int) -> None:
            if (step + 1) % self.projection_interval == 0:
                pick = torch.randint(len(hy), (min(self.batch_size, len(hy)),), generator=generator)
                opt.project(self.model, (hx[pick].to(device), hy[pick].to(device)), F.cross_entropy)

        return project
