"""Compressed layers back to dense ``nn.Linear`` / ``nn.Embedding``: a model anyone can load.

Each layer's own ``to_dense()`` gives the weight (the numbers its forward multiplies by, dequantized
where stored as integers); the bias is copied. The dense model computes what the compressed one
does up to the compressed forward's own arithmetic (an int8 backend quantizes activations too).
"""

from __future__ import annotations

import torch
from torch import nn

from stackcomp.nn.base import CompressedLayer

__all__ = ["densify"]


def dense_module(layer: CompressedLayer) -> nn.Module:
    """The ``nn.Linear`` (or ``nn.Embedding``, per ``layer.replaces``) equal to ``layer``, in fp32."""
    own = getattr(layer, "dense_module", None)
    if callable(own):  # a layer whose dense form is not its stored weight (a pruned table: the full vocabulary)
        return own()
    with torch.no_grad():
        weight = layer.to_dense().detach().float()
        if layer.replaces == "embedding":
            dense = nn.Embedding(*weight.shape, padding_idx=getattr(layer, "padding_idx", None))
        else:
            bias = getattr(layer, "bias", None)
            dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
            if bias is not None:
                dense.bias.copy_(bias.detach().float())
        if tuple(dense.weight.shape) != tuple(weight.shape):
            raise ValueError(f"{type(layer).__name__}.to_dense() gave {tuple(weight.shape)}, "
                             f"expected {tuple(dense.weight.shape)}")
        dense.weight.copy_(weight)
    return dense.to(weight.device)


def densify(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every compressed layer of ``model`` (in place) by its dense module; then cast the
    model to ``dtype`` if given. Returns ``model``."""
    from stackcomp.targets import set_module

    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, CompressedLayer) and not any(name.startswith(f"{r}.") for r in replaced):
            set_module(model, name, dense_module(module))
            replaced.append(name)
    if dtype is not None:
        model.to(dtype)
    return model
