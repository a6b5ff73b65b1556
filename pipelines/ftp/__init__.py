"""Robust fine-tuning on Ray Tune: FTP, TPGM, L2-SP, plain fine-tuning (and SPD, when ``space.methods`` names it)
searched over their constraints.

The transfer task: the pretrained backbone (``equiray-backbone@pretrained``, trained on clean upright images) is
fine-tuned on a small labelled *target* set drawn from a shifted domain (``task.target_view``, by default
low-contrast images, on which the backbone is poor), with a new classifier head. In-distribution (ID) is the
target domain; out-of-distribution (OOD) are the domains the backbone was good at and fine-tuning can forget
(``task.ood_views``: clean, noisy, blurred, pixelated, occluded test images).

``equiray ftp tune --config FILE`` runs one Ray Tune experiment: the method and its knobs (lr, weight decay;
FTP's k, radius learning rate and initial radius; L2-SP's alpha/beta; TPGM's radius learning rate; SPD's
strength) come from a searcher (Optuna's TPE when installed, random search otherwise; every method's defaults are
tried first), an ASHA scheduler stops weak trials early, and trials are *selected on ID validation accuracy
only*: ID test and OOD accuracies are measured every epoch and reported, never selected on. Every trial is an MLflow run (nested
under the search's run) with its config and curves; every epoch is a Tune checkpoint, so ``--resume`` continues
an interrupted search without re-running finished trials. The best trial's model is registered as
``equiray-ftp@champion``.

Modules: :mod:`~equiray_pipelines.ftp.config` (the config), :mod:`~equiray_pipelines.ftp.task` (data, model, accuracy),
:mod:`~equiray_pipelines.ftp.trial` (one Tune trial; the training itself is :class:`equiray.optim.RobustFineTuner`),
:mod:`~equiray_pipelines.ftp.stage` (the search as a registering stage: :func:`run_tune`),
:mod:`~equiray_pipelines.ftp.result` and :mod:`~equiray_pipelines.ftp.report` (what it returns and shows).

    python -m equiray_pipelines.ftp --config configs/ftp.yaml [--resume]
"""
from equiray_pipelines.ftp.config import (METHOD_ORDER, FTPConfig, FTPTrain, SearchConfig, SpaceConfig, TaskConfig,
                                          method_params)
from equiray_pipelines.ftp.report import plot_trials, results_table, verdict
from equiray_pipelines.ftp.result import FTPResult, TrialRow
from equiray_pipelines.ftp.stage import FTPTune, run_tune
from equiray_pipelines.ftp.task import Task, build_model, evaluate, load_task

__all__ = ["FTPConfig", "FTPTrain", "SearchConfig", "SpaceConfig", "TaskConfig", "METHOD_ORDER", "method_params",
           "FTPResult", "TrialRow", "FTPTune", "run_tune", "Task", "load_task", "build_model", "evaluate",
           "results_table", "verdict", "plot_trials"]
