"""Robust fine-tuning optimizers: FTP, TPGM, SPD, L2-SP and plain fine-tuning behind one interface (plain
PyTorch).

All of them but plain fine-tuning keep a pretrained model close to where it started while it learns a new task:

* :class:`FTP` (:mod:`equiray.optim.ftp`) -- Fast Trainable Projection (Tian, Liu, Smith & Kira, NeurIPS 2023):
  a projection of each weight row into an L1 ball of learned radius around the pretrained weights, the radius
  updated from the gradient the step already has. No extra forward or backward pass.
* :class:`TPGM` (:mod:`equiray.optim.tpgm`) -- Trainable Projected Gradient Method (Tian et al., CVPR 2023),
  FTP's bi-level predecessor: the same projection, the radii fitted on a held-out batch.
* :class:`SPD` (:mod:`equiray.optim.spd`) -- Selective Projection Decay (Tian, Huang & Kira, NeurIPS 2024),
  FTP's successor: a tensor's deviation from the pretrained weights is decayed only in the steps where its
  gradient points back towards them, by the share of the deviation that step added.
* :class:`L2SP` (:mod:`equiray.optim.l2sp`) -- L2-SP (Li, Grandvalet & Davoine, ICML 2018): a penalty pulling
  the pretrained weights to their start, added to the loss through :meth:`L2SP.regularizer`.
* :class:`FineTune` (:mod:`equiray.optim.finetune`) -- the base optimizer alone (AdamW or SGD), the reference.

Their shared machinery is :class:`RobustOptimizer` (:mod:`equiray.optim.base`: parameters, anchors, the
AdamW/SGD base update) on the kernels of :mod:`equiray.optim.kernels` (row norms, projection, the radii's Adam,
fused AdamW/SGD). :mod:`equiray.optim.factory` names them: the registry :data:`OPTIMIZERS`,
:func:`make_optimizer` and :func:`method_knobs`. :mod:`equiray.optim.finetuning` trains with them
(:class:`RobustFineTuner`: the optimizer plus :func:`equiray.train.train_epoch` with each method's hooks).

A training loop can treat all methods alike::

    opt = make_optimizer("ftp", model, lr=1e-4, weight_decay=0.05)          # head auto-excluded
    loss = F.cross_entropy(model(x), y) + opt.regularizer(model)            # 0 except for L2-SP
    opt.zero_grad(); loss.backward(); opt.step()
    if isinstance(opt, TPGM) and step % 50 == 0:                            # TPGM only
        opt.project(model, next(val_batches), F.cross_entropy)
"""
from equiray.optim.base import RobustOptimizer
from equiray.optim.factory import (DEFAULT_HEAD_PATTERNS, METHODS, OPTIMIZERS, make_optimizer, method_knobs,
                                   register_optimizer)
from equiray.optim.finetune import FineTune
from equiray.optim.ftp import FTP, FTP_STATE_KEYS
from equiray.optim.l2sp import L2SP, L2SP_STATE_KEYS
from equiray.optim.spd import SPD, SPD_STATE_KEYS
from equiray.optim.tpgm import TPGM, TPGM_STATE_KEYS
from equiray.optim.kernels import row_l1_norms
from equiray.optim.kernels import _adam_scalar, _clip_radius, _project_rows  # noqa: F401  (the tests' reference FTP)
from equiray.optim.finetuning import RobustFineTuner, fits_on_holdout

__all__ = ["FTP", "TPGM", "SPD", "L2SP", "FineTune", "RobustOptimizer", "make_optimizer", "method_knobs",
           "OPTIMIZERS", "METHODS", "register_optimizer", "FTP_STATE_KEYS", "TPGM_STATE_KEYS", "L2SP_STATE_KEYS",
           "SPD_STATE_KEYS", "DEFAULT_HEAD_PATTERNS", "row_l1_norms", "RobustFineTuner", "fits_on_holdout"]
