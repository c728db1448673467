"""What every compressed layer offers, so artifacts can save and rebuild it.

A compressed layer replaces an ``nn.Linear`` in a Hugging Face model. To make the model
round-trip through a plain folder (safetensors + config + manifest) each layer class:

- registers itself with :func:`register_layer` under its class name;
- returns ``manifest()``: a JSON-able dict of the constructor arguments (shapes, block
  sizes, dtypes), enough to build an *empty* layer of the right shapes;
- builds that empty layer with ``from_manifest(entry)``; the weights then come from the
  state dict;
- reports its exact storage with ``storage()`` (the default counts every tensor in its state
  dict at its stored width; override it where params or the dense reference differ).

How ``int8`` and ``pack`` convert a layer, and how size reports find its bytes, is keyed by layer
type in :mod:`stackcomp.nn.conversions`. Byte formulas come from :mod:`stackcomp.factorize.budget`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from stackcomp.factorize.budget import FP32_BYTES, linear_params, tensor_bytes

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

    @classmethod
    def measure(cls, tensors: Any, params: int, dense_params: int) -> LayerStorage:
        """The storage of a layer holding ``tensors`` (each at its width) that replaces a dense
        module of ``dense_params`` fp32 numbers; ``params`` counts its stored numbers."""
        return cls(params=params, bytes=tensor_bytes(*tensors), dense_params=dense_params,
                   dense_bytes=float(dense_params * FP32_BYTES))


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
        """Every tensor of the state dict at its stored width; params are the ``nn.Parameter``
        numbers; the dense reference is an ``nn.Linear`` (in x out, with this layer's bias)."""
        bias = getattr(self, "bias", None) is not None
        return LayerStorage.measure(self.state_dict(keep_vars=True).values(),
                                    params=sum(p.numel() for p in self.parameters()),
                                    dense_params=linear_params(self.out_features, self.in_features, bias))

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight (out x in), for tests and error reports."""
        raise NotImplementedError


#: model-wide link hooks (:func:`register_model_link`), run by :func:`link_layers` after the layers' own
MODEL_LINKS: list[Callable[[nn.Module], None]] = []


def register_model_link(hook: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Register ``hook(model)`` to run on every model :func:`link_layers` links: for what a saved model
    needs set up again that is not a layer (an unpadded model's hooks, :mod:`stackcomp.nn.unpadded`)."""
    if hook not in MODEL_LINKS:
        MODEL_LINKS.append(hook)
    return hook


def link_layers(model: nn.Module) -> None:
    """Run each compressed layer type's ``link_model(model)`` hook, once per type present: layers that
    read from another module (the key and value parts of a fused QKV projection) find it once the
    model is built from a manifest. Then the model-wide hooks (:data:`MODEL_LINKS`). ``stackcomp.load``
    and transformers' loading path call this."""
    for cls in {type(m) for m in model.modules() if isinstance(m, CompressedLayer)}:
        hook = getattr(cls, "link_model", None)
        if callable(hook):
            hook(model)
    for hook in MODEL_LINKS:
        hook(model)


def dense_storage(linear: nn.Linear) -> LayerStorage:
    """An ``nn.Linear`` as stored (its weight's dtype) against itself in fp32."""
    n = linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)
    return LayerStorage.measure((linear.weight, linear.bias), params=n,
                                dense_params=linear_params(linear.out_features, linear.in_features,
                                                           linear.bias is not None))
