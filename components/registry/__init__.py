"""Everything about a model's life after training, and the one owner of the MLflow model registry.

- ``uri.py``: the one parser of model sources (pure text; every layer may import it);
- ``resolve.py``: a source -> local files (registry versions downloaded once), one ``ResolvedModel``;
- ``loader.py``: a source -> a loaded backbone (``components.registry.load(uri)``);
- ``publish.py``: the only code that writes the registry: register, tag, log the pyfunc model;
- ``promotion.py``: champion / challenger numbers from the registry and the alias moves;
- ``commands.py`` / ``lineage.py``: the ``dinoflow models`` commands and a version's lineage.

Importing this package imports only ``uri.py``; the rest loads on first use (MLflow and torch are heavy).
See docs/registry-and-serving.md and docs/architecture.md.
"""

from typing import Any

from components.registry.uri import ModelSource, parse_source, registry_uri

__all__ = ["ModelSource", "load", "parse_source", "registry_uri"]


def __getattr__(name: str) -> Any:
    if name == "load":  # components.registry.load(uri): lazily, so the parser stays light for every layer
        from components.registry.loader import load

        return load
    raise AttributeError(f"module 'components.registry' has no attribute {name!r}")
