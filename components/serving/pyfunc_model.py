"""The MLflow pyfunc model, logged "from code": MLflow stores this file, not a pickle.

``components.registry.publish.log_backbone_pyfunc`` passes this file's path as ``python_model``;
MLflow copies it into the model and executes it when loading, so the ``set_model`` call at the
bottom is how MLflow finds the model (the one import-time side effect in dinoflow, and the mechanism
requires it). Weights travel as the
``backbone`` artifact: the safetensors + config.json folder, never unpickled. Loading needs the
dinoflow package (for the ViT code) in the serving environment.

``model_config`` (set at logging time) holds the :class:`EmbedOptions`: ``image_size``, ``avgpool``,
``batch_size``, ``device``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

from components.models.export import find_backbone_dir, load_backbone
from components.serving.embed import EmbedOptions, embed_images
from components.serving.images import decode_images


class BackboneEmbedder(PythonModel):
    """Images in (see components/serving/images.py), embeddings out: (B, D), or (B, 2D) with avgpool."""

    def load_context(self, context: PythonModelContext) -> None:
        self.options = EmbedOptions.from_mapping(context.model_config)
        folder = find_backbone_dir(Path(context.artifacts["backbone"]))
        self.bundle = load_backbone(folder, device=self.options.device)

    def predict(self, context: PythonModelContext, model_input, params=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        # model_input / params stay unannotated: MLflow would otherwise derive (and enforce) an input
        # schema from the hints, and the accepted inputs are several shapes (images.py).
        return embed_images(self.bundle, decode_images(model_input), self.options)


def _loaded_model() -> Any:
    return BackboneEmbedder()


mlflow.models.set_model(_loaded_model())
