"""What the demo returns: every stage's typed result, as the report reads them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from equiray_pipelines import canon, distill, ensemble, ftp, nfn, pretrain, robust
from equiray_pipelines.demo.serving import ServeStageResult


@dataclass(frozen=True, kw_only=True)
class NFNStageResult:
    """The demo's Monomial-NFN stage: metanetworks on the zoo, and (after an ensemble stage) on its members."""

    train: nfn.NFNTrainResult
    zoo_nets: int
    members: nfn.NFNTrainResult | None = None
    selection: ensemble.EnsembleSelectResult | None = None


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    tracking_uri: str = ""
    demo_run_id: str = ""  # the demo's own MLflow run (experiment equiray-demo)
    pretrain: pretrain.PretrainResult | None = None
    ensemble: ensemble.EnsembleTrainResult | None = None
    ensemble_eval: ensemble.EnsembleEvalResult | None = None
    distill: distill.DistillResult | None = None
    canon: canon.CanonResult | None = None
    any_angle: canon.CanonResult | None = None
    ftp: ftp.FTPResult | None = None
    nfn: NFNStageResult | None = None
    robust: robust.RobustResult | None = None
    serve: ServeStageResult | None = None
    report: str = ""
    seconds: float = 0.0
    stage_seconds: tuple[tuple[str, float], ...] = ()  # (stage, wall seconds) in the order they ran

    def stage_runs(self) -> list[tuple[str, str]]:
        """``(stage, MLflow run id)`` of every stage that ran, the NFN stage's parts each under its own name."""
        out = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            parts = ([("nfn", value.train), ("nfn_members", value.members), ("nfn_selection", value.selection)]
                     if isinstance(value, NFNStageResult) else [(field.name, value)])
            out += [(name, part.run_id) for name, part in parts if getattr(part, "run_id", "")]
        return out

    def registered(self) -> list[tuple[str, str]]:
        """``(models:/name@alias, version)`` of every model the demo's stages registered, in stage order."""
        return [(uri, version) for _, uri, version in self.registered_by_stage()]

    def registered_by_stage(self) -> list[tuple[str, str, str]]:
        """``(stage, models:/name@alias, version)`` of every registered model, in stage order (the names
        :meth:`stage_runs` gives their runs)."""
        return [(name, r.registered, r.version) for name, r in self.registering_stages()]

    def registering_stages(self) -> list[tuple[str, object]]:
        """``(stage, result)`` of every stage that registered a model, in stage order."""
        parts = [(name, getattr(self, name)) for name in ("pretrain", "ensemble", "distill", "canon", "any_angle",
                                                            "ftp")]
        if self.nfn is not None:
            parts += [("nfn", self.nfn.train), ("nfn_members", self.nfn.members)]
        parts.append(("robust", self.robust))
        return [(name, r) for name, r in parts if r is not None]
