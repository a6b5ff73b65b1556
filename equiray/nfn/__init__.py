"""Monomial-NFN: metanetworks on the weights of small networks that respect permutation *and* scaling symmetries.

Tran, Vo, Tran-Huu, Nguyen & Nguyen, "Monomial Matrix Group Equivariant Neural Functional Networks", NeurIPS
2024 (arXiv:2409.11697). A zoo network with L layers has weights ``W_i`` (n_i, n_{i-1}[, kh, kw]) and biases
``b_i`` (n_i,). Its hidden units (layers 1..L-1) can be permuted and rescaled without changing its function::

    (gW)_i[j, k] = d_i[j] / d_{i-1}[k] * W_i[pi_i(j), pi_{i-1}(k)]        (S1)
    (gb)_i[j]    = d_i[j] * b_i[pi_i(j)]                                  (S2)

with ``pi_0 = pi_L = id`` and ``d_0 = d_L = 1``; ``d > 0`` for ReLU nets (group ``"positive"``), ``d = +-1`` for
tanh nets (group ``"sign"``). Metanetwork features carry a channel axis: (B, C, n_i, n_{i-1}[, kh, kw]).

**Equivariant linear layer.** A linear map commuting with the diagonal part of (S1, S2) may only connect entries
whose scale factors are the same monomial in the ``d``; the permutations then tie the coefficients along the
permuted axes. What survives (``A``, ``B``, ``E``, ... are C_out x C_in channel matrices; kernel positions are
fixed axes, folded into the input channels, so spatial mixing is free and the output has no spatial axes)::

    first  W'_1[j,k] = A W_1[j,k] + B sum_k' M[k,k'] W_1[j,k'] + G g[k] b_1[j]       (E1)
           b'_1[j]   = E b_1[j] + H sum_k h[k] W_1[j,k]                              (E2)
    hidden W'_i[j,k] = A W_i[j,k],   b'_i[j] = E b_i[j]            (1 < i < L)        (E3)
    last   W'_L[j,k] = A W_L[j,k] + B sum_j' M[j,j'] W_L[j',k]                        (E4)
           b'_L[j]   = E b_L[j] + F sum_j' N[j,j'] b_L[j'] + t[j]                     (E5)

``M``, ``N`` (n x n along a fixed axis) and ``g``, ``h`` (vectors along it) are learned. The fully general map
allows a separate n x n matrix per channel pair; (E1, E4, E5) use a factorised subspace of it (channel matrix
times one axis matrix) so the parameter count does not grow with ``C^2 n^2``. Nothing connects two different
layers for positive scalings, and no bias may be added anywhere except ``t`` (``b_L`` is the only invariant).
For sign flips ``1/d = d``, so ``W_L[:, k]`` and ``b_{L-1}[k]`` carry the same character and one more coupling is
allowed (and used)::

    W'_L[j,k] += Q q[j] b_{L-1}[k],   b'_{L-1}[k] += R sum_j r[j] W_L[j,k]          (E6, sign group only)

Nonlinearities between layers: ReLU (commutes with d > 0) for ``"positive"``, tanh (odd, commutes with d = +-1)
for ``"sign"``.

**Invariant layer.** Each entry's channel vector ``v`` is made scale-free: ``gamma * v / ||v|| + beta``
(positive; ``||d v|| = d ||v||``) or ``|P v| + beta`` (sign; even in ``v``, keeps the magnitude because tanh nets
have no scale symmetry). Then the mean over the permuted axes, keeping the fixed ones (input axis of W_1, output
axis of W_L and b_L), and an MLP head.

Limitation inherited from the paper's layer: for positive scalings the layers never connect two layers, so a
Monomial-NFN cannot tell a symmetry from an *uncoupled* permutation of two consecutive layers (only ``W_1 <-> b_1``,
and for sign flips ``b_{L-1} <-> W_L``, are tied).

The package, one concept per module: :mod:`~equiray.nfn.spec` (layer shapes and the feature container),
:mod:`~equiray.nfn.features` (networks -> features), :mod:`~equiray.nfn.symmetry` (the group acting on them),
:mod:`~equiray.nfn.layers` (equivariant layers and the invariant pool), :mod:`~equiray.nfn.models` (metanetworks
and their registry), :mod:`~equiray.nfn.fit` (fitting and scoring one), :mod:`~equiray.nfn.zoo` (the zoo's
architecture and its vectorized trainer).
"""
from equiray.nfn.features import (features_from_models, features_from_normalized_cnns, features_from_state_dicts,
                                  load_features_into)
from equiray.nfn.fit import MetaFit, count_parameters, fit_metanetwork, kendall_tau, predict
from equiray.nfn.layers import (FeatureActivation, FirstLayerMap, HiddenLayerMap, LastLayerMap, MonomialInvariantPool,
                                MonomialLinear, SignCoupling)
from equiray.nfn.models import (METANETWORKS, PATH_NORM_POWERS, MonomialNFN, StatNN, create_metanetwork,
                                list_metanetworks, path_norm_dim, path_norms, register_metanetwork)
from equiray.nfn.spec import (SCALING_GROUPS, SYMMETRIES, LayerSpec, NetworkSpec, ScalingGroup, Symmetry,
                              WeightSpaceFeatures)
from equiray.nfn.symmetry import WeightSymmetry, apply_symmetry, random_symmetry
from equiray.nfn.zoo import (ZOO_ACTIVATIONS, ZOO_OPTIMIZERS, StackedZooNets, TrainedZooNet, ZooCNN,
                             ZooHyperparameters, init_zoo_net, train_zoo_nets, zoo_batches, zoo_cnn)

__all__ = ["LayerSpec", "NetworkSpec", "WeightSpaceFeatures", "ScalingGroup", "Symmetry", "SCALING_GROUPS",
           "SYMMETRIES", "features_from_models", "features_from_state_dicts", "features_from_normalized_cnns",
           "load_features_into", "WeightSymmetry", "random_symmetry", "apply_symmetry", "FirstLayerMap",
           "HiddenLayerMap", "LastLayerMap", "SignCoupling", "MonomialLinear", "FeatureActivation",
           "MonomialInvariantPool", "PATH_NORM_POWERS", "path_norms", "path_norm_dim", "MonomialNFN", "StatNN",
           "METANETWORKS", "register_metanetwork", "create_metanetwork", "list_metanetworks", "count_parameters",
           "kendall_tau", "predict", "MetaFit", "fit_metanetwork", "ZooCNN", "zoo_cnn", "ZOO_ACTIVATIONS",
           "ZOO_OPTIMIZERS", "ZooHyperparameters", "init_zoo_net", "zoo_batches", "StackedZooNets", "TrainedZooNet",
           "train_zoo_nets"]
