"""Canonicalization adapters: a small network picks a pose, the input is turned back, a pretrained model reads it.

``Phi(x) = c(x) . phi(c(x)^-1 . x)`` (Mondal et al. 2023): ``phi`` is any model (a timm model by name, frozen or
fine-tuned), ``c`` a canonicalizer that gives every input one score per group element. Two kinds, one interface:

* :class:`EquivariantCanonicalizer`: a group-equivariant conv net (rotation/reflection-shared filters built
  here from :mod:`equiray.groups`), so rotating the input by ``g`` permutes its scores: ``a(g.x)[h] = a(x)[g^-1 h]``.
* :class:`OptimizedCanonicalizer` (Panigrahi & Mondal 2024): any non-equivariant network embeds every transformed
  copy ``h^-1.x``; the score of ``h`` is the cosine similarity of that embedding with a reference vector. Because
  the scores run over the whole orbit the same permutation rule holds by construction.

Either way the chosen element ``c(x) = argmax_h a(x)[h]`` satisfies ``c(g.x) = g c(x)`` and the canonical input
``c(x)^-1 . x`` is the same for every ``g.x``: the wrapped model is invariant (or equivariant for dense outputs,
through :meth:`equiray.groups.Group.act_output`). Exact for C4/D4 (pixel-grid actions), approximate for other n
(interpolated rotations). The **canonicalization prior** (:func:`prior_loss`) is the cross-entropy of the scores
against the identity on upright data.

The package, one concept a module:

* :mod:`~equiray.canon.layers`: the lifting and group convolutions;
* :mod:`~equiray.canon.canonicalizers`: the canonicalizers and their registry (:data:`CANONICALIZERS`);
* :mod:`~equiray.canon.model`: :class:`CanonicalizedModel` and the registered ``canonicalized`` model;
* :mod:`~equiray.canon.losses`: the straight-through choice, the prior, the contrastive term, the identity rate;
* :mod:`~equiray.canon.train` and :mod:`~equiray.canon.evaluate`: training and judging one sweep variant.
"""
from equiray.canon.canonicalizers import (AUTO_INPUT_PX, CANONICALIZERS, Canonicalizer, EquivariantCanonicalizer,
                                          OptimizedCanonicalizer, canonicalizer_input_size, create_canonicalizer,
                                          list_canonicalizers, register_canonicalizer)
from equiray.canon.evaluate import Latencies, evaluate_variant, paired_latencies
from equiray.canon.layers import GroupConv, GroupLiftConv
from equiray.canon.losses import contrastive_loss, identity_rate, prior_loss, straight_through
from equiray.canon.model import Canonicalization, CanonicalizedModel, canonicalized, canonicalized_in
from equiray.canon.pose import Pose, continuous_pose, undo_pose
from equiray.canon.train import (BACKBONE_MODES, LR_SCHEDULES, POSES, TRAIN_ROTATIONS, CanonObjective,
                                 RandomRotations, RotatedCrossEntropy, Variant, build_variant, train_variant,
                                 lr_scheduler, variant_optimizer)

__all__ = ["AUTO_INPUT_PX", "canonicalizer_input_size", "Canonicalization", "Canonicalizer", "EquivariantCanonicalizer", "OptimizedCanonicalizer",
           "Pose", "continuous_pose", "undo_pose", "POSES", "TRAIN_ROTATIONS", "RandomRotations",
           "RotatedCrossEntropy", "CanonicalizedModel", "GroupLiftConv", "GroupConv", "straight_through", "prior_loss",
           "contrastive_loss", "identity_rate", "create_canonicalizer", "list_canonicalizers",
           "register_canonicalizer", "CANONICALIZERS", "canonicalized", "canonicalized_in", "BACKBONE_MODES", "Variant",
           "CanonObjective", "build_variant", "variant_optimizer", "LR_SCHEDULES", "lr_scheduler", "train_variant",
           "evaluate_variant",
           "Latencies", "paired_latencies"]
