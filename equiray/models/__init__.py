"""Models by name: ``create_model("small_cnn")``, ``create_model("resnet18", pretrained=True)`` (any timm name)."""
from equiray.models._registry import create_model, is_model, list_models, register_model
from equiray.models import small as _small  # noqa: F401  (registers equiray's own models)
from equiray.models import orbit as _orbit  # noqa: F401
from equiray.models import mixture as _mixture  # noqa: F401
from equiray.models.mixture import Mixture
from equiray.models.norm import AffineNorm2d, freeze_batchnorm
from equiray.models.orbit import OrbitAveraged, averaged
from equiray.models.small import SmallCNN, PaperCNN, MaskedConv2d, SUPPORTS, effective_parameters

__all__ = ["create_model", "is_model", "list_models", "register_model", "SmallCNN", "PaperCNN", "MaskedConv2d",
           "SUPPORTS", "OrbitAveraged", "averaged", "Mixture", "effective_parameters", "AffineNorm2d",
           "freeze_batchnorm"]
