"""What every compressed layer offers, so artifacts can save and rebuild it.

A compressed layer replaces an ``nn.Linear`` in a Hugging Face model. To make the model
round-trip through a plain folder (safetensors + config + manifest) each layer class:

- registers itself with :func:`register_layer` under its class name;
- returns ``manifest()``: a JSON-able dict of the constructor arguments (shapes, block
  sizes, dtypes), enough to build an *empty* layer of the right shapes;
- builds that empty layer with ``from_manifest(entry)``; the weights then come from the
  state dict;
- reports its exact storage with ``storage()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

LAYER_TYPES: dict[str, type[nn.Module]] = {}


def register_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make a compressed layer known to the artifact loader."""
    LAYER_TYPES[cls.__name__] = cls
    return cls


def layer_class(type_name: str) -> type[nn.Module]:
    # Importing the package registers the built-in layers.
    import stackcomp.nn  # noqa: F401

    try:
        return LAYER_TYPES[type_name]
    except KeyError:
        from stackcomp.errors import ArtifactError

        known = ", ".join(sorted(LAYER_TYPES)) or "none"
        raise ArtifactError(
            f"layer manifest names layer type {type_name!r}, which is not registered (known: {known}); "
            "install or import the package that defines it"
        ) from None


@dataclass(frozen=True)
class LayerStorage:
    """Exact storage of one layer: what it holds now and what the dense layer held.

    ``bytes`` counts every stored tensor at its real width (uint8 indices count 1 byte, int4
    packed values half a byte); ``dense_bytes`` is the replaced ``nn.Linear`` in fp32.
    """

    params: int
    bytes: float
    dense_params: int
    dense_bytes: float

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.bytes if self.bytes else float("inf")


class CompressedLayer(nn.Module):
    """Base for layers that stand in for an ``nn.Linear`` (or, per ``replaces``, an ``nn.Embedding``)."""

    in_features: int
    out_features: int
    #: bumped when the stored layout changes, so old artifacts are rebuilt rather than misread
    layout_version: ClassVar[int] = 1
    #: the module it stands in for; size reports count only "linear" layers as linears
    replaces: ClassVar[str] = "linear"

    def manifest(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def storage(self) -> LayerStorage:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight (out x in), for tests and error reports."""
        raise NotImplementedError


def dense_storage(linear: nn.Linear) -> LayerStorage:
    n = linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)
    nbytes = sum(t.numel() * t.element_size() for t in (linear.weight, linear.bias) if t is not None)
    dense = linear.in_features * linear.out_features + (linear.out_features if linear.bias is not None else 0)
    return LayerStorage(params=n, bytes=float(nbytes), dense_params=dense, dense_bytes=float(dense * 4))
