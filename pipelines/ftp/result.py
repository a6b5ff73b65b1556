"""What the search returns: one :class:`TrialRow` per trial and the :class:`FTPResult`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from equiray.optim import method_knobs
from equiray_pipelines.stage import StageResult


@dataclass(frozen=True)
class TrialRow:
    """One trial at its end (its last reported epoch; ASHA may have stopped it before ``train.epochs``)."""

    method: str
    lr: float
    weight_decay: float
    knobs: Mapping[str, float]  # the method's own knobs (equiray.optim.method_knobs), e.g. {"k": .., "mu": ..}
    run_id: str  # the trial's MLflow run
    epochs: int
    val_accuracy: float  # ID validation: what trials are selected on
    id_test_accuracy: float
    ood_mean_accuracy: float
    ood: Mapping[str, float]  # OOD view -> accuracy
    epoch_seconds: float  # mean training seconds per epoch

    @property
    def params(self) -> dict[str, Any]:
        """The values the trial's method used (its MLflow params)."""
        return {"method": self.method, "lr": self.lr, "weight_decay": self.weight_decay, **self.knobs}

    def to_dict(self) -> dict[str, Any]:
        """The row as the search's ``trials.json`` artifact holds it (knobs flattened beside ``lr``)."""
        return {**self.params, "run_id": self.run_id, "epochs": self.epochs, "val_accuracy": self.val_accuracy,
                "id_test_accuracy": self.id_test_accuracy, "ood_mean_accuracy": self.ood_mean_accuracy,
                "ood": dict(self.ood), "epoch_seconds": self.epoch_seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialRow:
        return cls(method=d["method"], lr=d["lr"], weight_decay=d["weight_decay"],
                   knobs={k: d[k] for k in method_knobs(d["method"])}, run_id=d["run_id"], epochs=d["epochs"],
                   val_accuracy=d["val_accuracy"], id_test_accuracy=d["id_test_accuracy"],
                   ood_mean_accuracy=d["ood_mean_accuracy"], ood=dict(d["ood"]), epoch_seconds=d["epoch_seconds"])


@dataclass(frozen=True, kw_only=True)
class FTPResult(StageResult):
    """The search: every trial (best first within each method, methods in table order), the pretrained
    backbone's accuracies (``id_test`` and each OOD view, no fine-tuning), the champion (the best trial by ID
    validation accuracy, registered) and the trials' plot (also in ``plots``)."""

    rows: tuple[TrialRow, ...]
    pretrained: Mapping[str, float]
    champion: TrialRow
    plot: str
    experiment_dir: str = ""  # the Tune experiment (what --resume continues); empty for a reused result
    searcher: str = ""  # "optuna TPE", "random" or "restored"; empty for a reused result
