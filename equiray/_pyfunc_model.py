"""The model file MLflow runs to get a logged equiray pyfunc (MLflow's "models from code": nothing is pickled)."""
from mlflow.models import set_model

from equiray.pyfunc import ImageClassifier

set_model(ImageClassifier())
