"""Ray + MLflow pipelines that compose the ``equiray`` library, installed as ``equiray_pipelines``. Each is also
``python -m equiray_pipelines.X --config F``."""
