"""The compressed model as an MLflow ``pyfunc`` (MLflow "models from code": this file is the model).

MLflow runs this file when it loads the model, so nothing is unpickled: the weights are the
``weights`` artifact, a ``penni.save`` safetensors file read by ``penni.load``. Input: float32
images ``(batch, channels, height, width)``; output: the logits ``(batch, classes)``.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class PenniModel(PythonModel):
    """Loads the safetensors file with ``penni.load`` and returns logits for a batch of images."""

    def load_context(self, context) -> None:
        import penni

        self.model = penni.load(context.artifacts["weights"]).eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(x).numpy()


mlflow.models.set_model(PenniModel())
