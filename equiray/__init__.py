"""equiray: make pretrained image models robust to rotations, reflections and distribution shift.

The library is plain PyTorch (groups, data, models, training steps, metrics); Ray and MLflow orchestration
lives in the sibling package ``equiray_pipelines`` (the repository's ``pipelines/`` folder).
"""
import logging

from equiray.errors import ConfigError, DataError, EquirayError
from equiray.groups import Group, OutputKind, cyclic, dihedral, get_group, trivial
from equiray.models import create_model, list_models
from equiray import ensembles as _ensembles  # noqa: F401  (registers the `ensemble` model)
from equiray import canon as _canon  # noqa: F401  (registers the `canonicalized` model)

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "EquirayError", "Group", "OutputKind", "create_model", "cyclic",
           "dihedral", "get_group", "list_models", "trivial", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
