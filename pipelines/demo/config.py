"""The demo's config: every stage's own config at demo scale, the stages to run and whether to reuse.

These dataclasses are the one source of the demo's defaults; ``configs/demo.yaml`` and ``--set`` only
override them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from equiray.errors import ConfigError
from equiray_pipelines._common import DataConfig, ResourcesConfig, TrackingConfig
from equiray_pipelines.canon import ANY_ANGLE, CanonConfig, GridConfig
from equiray_pipelines.distill import DistillConfig
from equiray_pipelines.ensemble import EnsembleConfig
from equiray_pipelines.ftp import FTPConfig, FTPTrain, SearchConfig as FTPSearch
from equiray_pipelines.nfn import Metanetworks, MonomialNFNOptions, NFNTrainConfig, ZooConfig
from equiray_pipelines.pretrain import PretrainConfig, TrainConfig
from equiray_pipelines.robust import RobustConfig
from equiray_pipelines.robust.config import CANON_SWEEP, TTA
from equiray_pipelines.serve import ServeConfig

STAGES = ("pretrain", "ensemble", "distill", "canon", "any_angle", "ftp", "nfn", "robust", "serve")


@dataclass(frozen=True)
class NFNDemo:
    """The demo's Monomial-NFN stage: a small Small-CNN-Zoo-style zoo and its metanetworks, then a zoo of the
    ensemble's members, a metanetwork over them, and ``--select-by nfn`` on the ensemble."""

    zoo: ZooConfig = ZooConfig(data=DataConfig(max_train=3000, max_eval=1000), nets=96, nets_per_task=8, epochs=1,
                               out="data/zoo-demo")
    train: NFNTrainConfig = NFNTrainConfig(zoo="data/zoo-demo", epochs=100)
    member_zoo: str = "data/member-zoo-demo"
    members: NFNTrainConfig = NFNTrainConfig(zoo="data/member-zoo-demo", epochs=60, zoos=("plain",),
                                             metanetworks=Metanetworks(monomial_nfn=MonomialNFNOptions(hidden_channels=16)),
                                             tracking=TrackingConfig(experiment="equiray-nfn",
                                                                     registered_model="equiray-nfn-members",
                                                                     alias="champion"))
    drop_fraction: float = 0.25


@dataclass(frozen=True)
class DemoConfig:
    pretrain: PretrainConfig = PretrainConfig(train=TrainConfig(epochs=3), data=DataConfig())
    # the demo's 15 minutes on 2 CPUs make room for the any-angle recipe, its baseline and their mixture: 8 members
    # per ensemble setting (24 in configs/ensemble.yaml), the canonicalizers with the prior only (configs/canon.yaml:
    # with and without), 4 FTP trials
    ensemble: EnsembleConfig = EnsembleConfig(members=8)  # one group of 8 per setting: 12 rounds, not 24
    distill: DistillConfig = DistillConfig()
    # the robust stage draws every candidate's curve
    canon: CanonConfig = CanonConfig(grid=GridConfig(prior_weight=(100.0,)), curve_step=0)
    # the any-angle recipe (configs/canon_any_angle_fast.yaml), a robust candidate; its sweep's own table on 1,000
    # test images (the robust stage judges every row on all 10,000); its two trials (the recipe, the baseline) side
    # by side on one CPU each rather than one after the other on two: a torch op on 2 threads is not twice as fast
    any_angle: CanonConfig = dataclasses.replace(ANY_ANGLE, data=dataclasses.replace(ANY_ANGLE.data, max_eval=1000),
                                                 resources=ResourcesConfig(cpus_per_trial=1))
    ftp: FTPConfig = FTPConfig(search=FTPSearch(num_samples=4, grace_period=2), train=FTPTrain(epochs=6))
    nfn: NFNDemo = NFNDemo()
    # the demo's 15 minutes: without tta:C8 (the backbone averaged over eight turns costs 8x to judge), the C8 sweep's
    # champion alone instead of its every variant (`equiray robust` judges them all), the curve on 500 images,
    # latencies on batches of 128
    robust: RobustConfig = RobustConfig(
        candidates=tuple("models:/equiray-canon@champion" if c == CANON_SWEEP else c
                         for c in RobustConfig.candidates if not c.startswith(TTA)),
        curve_images=500, latency_batch=128)
    serve: ServeConfig = ServeConfig(port=0)  # any free port: the demo's endpoint lives only for its requests
    serve_images: int = 4  # test images sent upright and rotated by 90, 180, 270 degrees
    stages: tuple[str, ...] = STAGES
    reuse: bool = True  # take a stage's registered result when the same config produced it (--fresh: redo all)

    def __post_init__(self):
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ConfigError(f"stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")

