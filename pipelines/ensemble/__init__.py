"""Augmentation ensembles on Ray Train: member groups fanned out over workers, checkpointed, evaluated.

``equiray ensemble train``: every *setting* (filter support x augmentation x initialization) gets ``members``
members; members are cut into *member groups* of ``members_per_group`` that one worker trains at once,
vectorized (:class:`equiray.ensembles.MemberGroup`). Group ``i`` goes to worker ``i % num_workers``, so a
10,000-member run is the same config with more workers. Every worker reads the whole training set through
Ray Data (not split: each member sees all of it) into memory.

Work proceeds in rounds (one epoch of one group per worker per round); after each round every worker saves
the state of all its groups (weights, optimizer, random generators, epochs done) and reports it as one Ray
Train checkpoint. When a worker dies, Ray Train restarts the worker group from the latest checkpoint and
training continues where it stopped; the driver checks at the end that every member is present exactly once.

``equiray ensemble eval``: OSP and symmetric KL (and accuracy) of the ensemble mean as functions of
ensemble size (bootstrap), in distribution and off the data manifold, one line per setting; plot + table.

    python -m equiray_pipelines.ensemble train --config configs/ensemble.yaml

- :mod:`~equiray_pipelines.ensemble.config`: the config dataclasses and the cut into member groups;
- :mod:`~equiray_pipelines.ensemble.worker`: what runs on a Ray Train worker;
- :mod:`~equiray_pipelines.ensemble.stage`: ``run_train``, the registering stage;
- :mod:`~equiray_pipelines.ensemble.members`: a train run's members read back from MLflow;
- :mod:`~equiray_pipelines.ensemble.evaluate`, :mod:`~equiray_pipelines.ensemble.select`: ``run_eval``, ``run_select``;
- :mod:`~equiray_pipelines.ensemble.report`: tables, verdicts, the plot.
"""
from equiray_pipelines.ensemble.config import (DEFAULT_SETTINGS, EnsembleConfig, EnsembleEvalSection, EnsembleTracking,
                                               EnsembleTrainSection, GroupPlan, MemberConfig, SettingConfig)
from equiray_pipelines.ensemble.evaluate import EnsembleEvalResult, evaluate, off_manifold_images, run_eval
from equiray_pipelines.ensemble.members import find_train_run, load_members
from equiray_pipelines.ensemble.select import EnsembleSelectResult, member_state_dicts, run_select, select_by_nfn
from equiray_pipelines.ensemble.stage import EnsembleTrain, EnsembleTrainResult, run_train

__all__ = ["DEFAULT_SETTINGS", "EnsembleConfig", "EnsembleEvalResult", "EnsembleEvalSection", "EnsembleSelectResult",
           "EnsembleTracking", "EnsembleTrain", "EnsembleTrainResult", "EnsembleTrainSection", "GroupPlan",
           "MemberConfig", "SettingConfig", "evaluate", "find_train_run", "load_members", "member_state_dicts",
           "off_manifold_images", "run_eval", "run_select", "run_train", "select_by_nfn"]
