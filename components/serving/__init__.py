"""The pyfunc runtime that serves backbones: an MLflow pyfunc model (logged from code, weights as
safetensors) mapping images to embeddings. Logging and registering it is the registry's
(components/registry/publish.py). See docs/registry-and-serving.md.

``pyfunc_model.py`` is not imported here: MLflow executes it when loading a model.
"""

from components.serving.embed import EmbedOptions, embed_images
from components.serving.images import decode_images

__all__ = ["EmbedOptions", "decode_images", "embed_images"]
