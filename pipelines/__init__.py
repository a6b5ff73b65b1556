"""Ray + MLflow pipelines that compose the ``equiray`` library. Each is also ``python -m equiray_pipelines.X --config F``."""
