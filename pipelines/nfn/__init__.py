"""Metanetworks over a model zoo: train the zoo on Ray tasks, then learn to read accuracy off the weights.

``equiray nfn zoo --config configs/nfn_zoo.yaml`` trains ``nets`` copies of the Small CNN Zoo network
(:func:`equiray.nfn.zoo_cnn`, 4,970 parameters) on Fashion-MNIST, each with its own optimizer, learning rate, L2,
dropout, initialization scale and training fraction drawn from ``space`` (the Small CNN Zoo's recipe), in chunks of
``nets_per_task`` per Ray task (one CPU or a GPU fraction each), trained together as one grouped computation
(:class:`equiray.nfn.StackedZooNets`; nets of similar training fraction share a task). Every net's weights (one
float32 blob in the state dict's order), its hyperparameters and its test accuracy are written to Parquet shards
under ``out``, atomically (a temporary directory renamed into place): the input of ``equiray.nfn`` metanetworks.

``equiray nfn train --config configs/nfn_train.yaml`` fits metanetworks (Monomial-NFN, STATNN, ...) that predict
each net's test accuracy from its weights, on the plain zoo and on the same zoo with every net's hidden units
randomly rescaled (a function-preserving change that permutation-only metanetworks do not see through), one Ray
task per (metanetwork, zoo). Kendall tau on held-out nets, per-epoch curves and a predicted-vs-true plot go to
MLflow; the champion is registered as ``equiray-nfn@champion``.

    python -m equiray_pipelines.nfn zoo --config configs/nfn_zoo.yaml
    python -m equiray_pipelines.nfn train --config configs/nfn_train.yaml

Modules: ``config`` (both configs), ``zoo`` (the zoo's Ray tasks, Parquet in and out, a zoo as features),
``metanet`` (one metanetwork fitted on one zoo, a Ray task), ``stage`` (the ``nfn train`` stage and its result),
``report`` (table, verdict, scatter plot).
"""
from __future__ import annotations

from equiray_pipelines.nfn.config import (ACTIVATIONS, OPTIMIZERS, ZOOS, Metanetworks, MonomialNFNOptions,
                                          NFNTrainConfig, StatNNOptions, ZooConfig, ZooSpace)
from equiray_pipelines.nfn.metanet import MetanetworkFit
from equiray_pipelines.nfn.stage import NFNTrain, NFNTrainResult, run_train
from equiray_pipelines.nfn.zoo import (ZooResult, member_rows, read_zoo, run_zoo, scaled_zoo, split_nets, write_zoo,
                                       zoo_features)

__all__ = ["ZooConfig", "ZooSpace", "NFNTrainConfig", "Metanetworks", "MonomialNFNOptions", "StatNNOptions",
           "ZOOS", "OPTIMIZERS", "ACTIVATIONS", "ZooResult", "run_zoo", "read_zoo", "write_zoo", "member_rows",
           "zoo_features", "scaled_zoo", "split_nets", "MetanetworkFit", "NFNTrain", "NFNTrainResult", "run_train"]
