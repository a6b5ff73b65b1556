"""Canonicalization variants on Ray Tune: a grid of adapters around the pretrained backbone, one trial each.

``equiray canon sweep --config configs/canon.yaml`` starts from ``equiray-backbone@pretrained`` and trains
every variant of the grid (canonicalizer kind x group x prior weight x backbone frozen / fine-tuned) plus the
baselines (plain fine-tuning, fine-tuning with group augmentation). Each variant is one Ray Tune trial with its
own CPU / (fractional) GPU resources, so the grid fans out over a cluster's workers; each is one MLflow run,
nested under the sweep's run. The driver then times every model on the same batch, one after the other (timings
from concurrent trials would measure their contention), writes the table and a plot, and registers the best
variant as ``equiray-canon@champion``.

* :mod:`~equiray_pipelines.canon.config`: :class:`CanonConfig` and its sections;
* :mod:`~equiray_pipelines.canon.trial`: one variant as a Tune trial (what runs on Ray; :mod:`equiray.canon` trains it);
* :mod:`~equiray_pipelines.canon.stage`: :func:`run_sweep`, the :class:`CanonSweep` stage and its :class:`CanonResult`;
* :mod:`~equiray_pipelines.canon.report`: the table, the verdict and the plot.

    python -m equiray_pipelines.canon sweep --config configs/canon.yaml
"""
from equiray_pipelines.canon.config import (ANY_ANGLE, BASELINES, CanonConfig, CanonicalizerOptions, CanonTrain,
                                            EquivariantOptions, GridConfig, OptimizedOptions)
from equiray_pipelines.canon.report import plot_variants, results_table, verdict
from equiray_pipelines.canon.stage import CanonResult, CanonSweep, run_sweep

__all__ = ["ANY_ANGLE", "BASELINES", "CanonConfig", "CanonicalizerOptions", "CanonTrain", "EquivariantOptions",
           "GridConfig", "OptimizedOptions", "CanonResult", "CanonSweep", "run_sweep", "results_table", "verdict",
           "plot_variants"]
