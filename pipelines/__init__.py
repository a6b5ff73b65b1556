"""Ray + MLflow pipelines that compose the ``equiray`` library. Each is also ``python -m pipelines.X --config F``."""
