"""The one parser of model sources: every string that names a backbone goes through :func:`parse_source`.

| form | kind | what it names |
|---|---|---|
| ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` | ``registry`` | a registered version (MLflow registry) |
| ``hub:dinov2_vits14`` (and the other released names) | ``hub`` | the official weights through ``torch.hub`` |
| ``pixels:32`` | ``pixels`` | the classic pixel copy descriptor (curation; not a backbone) |
| ``random:vit_pico:4:28`` | ``random`` | a seeded, untrained backbone (tests and floors) |
| ``state_dict:vit_small:14:518:SRC`` | ``state_dict`` | weights at SRC (a file, a released name) as that ViT |
| anything else | ``path`` | a local folder (backbone, pyfunc model, checkpoint) or weights file |

Like timm's model-name parsing, the prefix decides and the rest is checked here, so a malformed
source fails when the params are loaded, not after the data is read. This module is pure text
(standard library only): it is the one part of ``components/registry/`` that every layer may import
(docs/architecture.md); resolving and loading a source are ``resolve.py`` and ``load.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SourceKind = Literal["registry", "hub", "pixels", "random", "state_dict", "path"]

REGISTRY_PREFIX = "models:/"
HUB_PREFIX = "hub:"
PIXELS_PREFIX = "pixels:"
RANDOM_PREFIX = "random:"
STATE_DICT_PREFIX = "state_dict:"

RELEASED = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
            "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg")
PIXEL_SIZES = (4, 256)  # inclusive bounds of a pixel descriptor's grid


@dataclass(frozen=True)
class ArchSpec:
    """The architecture a ``random:`` or ``state_dict:`` source states: ``<arch>:<patch>:<img_size>``."""

    arch: str
    patch_size: int
    img_size: int


@dataclass(frozen=True)
class ModelSource:
    """A parsed model source; which fields are set depends on ``kind`` (see the module table)."""

    text: str  # as given
    kind: SourceKind
    name: str | None = None  # registry: the registered model; hub: the released model
    alias: str | None = None  # registry: exactly one of alias / version
    version: str | None = None
    arch: ArchSpec | None = None  # random, state_dict
    target: str | None = None  # state_dict: the weights (a path or a released name); path: the path itself
    size: int | None = None  # pixels: the descriptor's grid side

    @property
    def is_backbone(self) -> bool:
        """Everything but ``pixels:`` names a ViT backbone."""
        return self.kind != "pixels"

    def require(self, *kinds: SourceKind) -> ModelSource:
        """This source if its kind is one of ``kinds``, else a clear error naming what is accepted."""
        if self.kind not in kinds:
            raise ValueError(f"{self.text!r} is a {self.kind} source; expected one of: {', '.join(kinds)}")
        return self


def parse_source(text: str) -> ModelSource:
    """``text`` -> :class:`ModelSource`; ValueError for an empty or malformed source."""
    if not text:
        raise ValueError("a model source must not be empty")
    if text.startswith(REGISTRY_PREFIX):
        return _registry(text)
    if text.startswith(HUB_PREFIX):
        name = text[len(HUB_PREFIX):]
        if name not in RELEASED:
            raise ValueError(f"unknown released model {name!r}; choose from {RELEASED}")
        return ModelSource(text, "hub", name=name)
    if text.startswith(PIXELS_PREFIX):
        size = text[len(PIXELS_PREFIX):]
        if not size.isdigit() or not PIXEL_SIZES[0] <= int(size) <= PIXEL_SIZES[1]:
            raise ValueError(f"backbone {text!r}: expected 'pixels:<size>' with {PIXEL_SIZES[0]} <= size <= "
                             f"{PIXEL_SIZES[1]}")
        return ModelSource(text, "pixels", size=int(size))
    if text.startswith(RANDOM_PREFIX):
        parts = text[len(RANDOM_PREFIX):].split(":")
        if len(parts) != 3:
            raise ValueError(f"backbone {text!r}: expected 'random:<arch>:<patch>:<img_size>'")
        return ModelSource(text, "random", arch=_arch(text, parts, "random:<arch>:<patch>:<img_size>"))
    if text.startswith(STATE_DICT_PREFIX):
        parts = text[len(STATE_DICT_PREFIX):].split(":", 3)
        usage = "state_dict:<arch>:<patch>:<img_size>:<source>"
        if len(parts) != 4 or not parts[3]:
            raise ValueError(f"backbone {text!r}: expected '{usage}'")
        return ModelSource(text, "state_dict", arch=_arch(text, parts[:3], usage), target=parts[3])
    return ModelSource(text, "path", target=text)


def registry_uri(text: str) -> str:
    """Accept ``NAME@ALIAS`` / ``NAME/VERSION`` as well as the full ``models:/`` form (the CLI's shorthand)."""
    return text if text.startswith(REGISTRY_PREFIX) else f"{REGISTRY_PREFIX}{text}"


def version_uri(name: str, version: str) -> str:
    return f"{REGISTRY_PREFIX}{name}/{version}"


def alias_uri(name: str, alias: str) -> str:
    return f"{REGISTRY_PREFIX}{name}@{alias}"


def _registry(text: str) -> ModelSource:
    rest = text[len(REGISTRY_PREFIX):]
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return ModelSource(text, "registry", name=name, alias=alias)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return ModelSource(text, "registry", name=name, version=version)
    raise ValueError(f"{text!r}: expected {REGISTRY_PREFIX}NAME@ALIAS or {REGISTRY_PREFIX}NAME/VERSION")


def _arch(text: str, parts: list[str], usage: str) -> ArchSpec:
    arch, patch, size = parts
    if not arch or not patch.isdigit() or not size.isdigit():
        raise ValueError(f"backbone {text!r}: expected '{usage}'")
    return ArchSpec(arch=arch, patch_size=int(patch), img_size=int(size))


__all__ = ["HUB_PREFIX", "RELEASED", "ArchSpec", "ModelSource", "SourceKind", "alias_uri", "parse_source",
           "registry_uri", "version_uri"]
