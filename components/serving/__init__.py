"""Serving backbones: an MLflow pyfunc model (logged from code, weights as safetensors) that maps
images to embeddings, and the helper that logs and registers it. See docs/registry-and-serving.md.

``pyfunc_model.py`` is not imported here: MLflow executes it when loading a model.
"""

from components.serving.embed import EmbedOptions, embed_images
from components.serving.images import decode_images
from components.serving.log import log_backbone_pyfunc, serving_requirements

__all__ = ["EmbedOptions", "decode_images", "embed_images", "log_backbone_pyfunc", "serving_requirements"]
