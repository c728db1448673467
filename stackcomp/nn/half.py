"""A linear layer stored in 16-bit floats: :class:`HalfLinear`.

Why: int8 with 8-bit activations costs a layer about 1% relative output error. For most linears
of an encoder that is noise, but a head that decides the answer from one vector (BERT's pooler,
read on the CLS token only) can flip predictions with it, while being a large share of a small
model's bytes (MiniLM's pooler: 0.59 of a 7.6 MB int8 model). fp16 storage halves its bytes at a
weight error of about 2^-12 relative (rounding to 11 significant bits), far below int8's. The
``int8`` pass makes these for its ``fp16_targets``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from stackcomp.nn.base import register_layer
from stackcomp.nn.lowrank import LayerInputError
from stackcomp.nn.manifest import DeclaredLayer, bias_field, count

__all__ = ["HalfLinear"]


@register_layer
class HalfLinear(DeclaredLayer):
    """``nn.Linear`` whose weight is stored in float16; it computes in the input's dtype.

    Buffers: ``weight`` float16 (out, in); ``bias`` float32 (out) or none (a few hundred bytes,
    kept exact). Inference only.
    """

    layout_version: ClassVar[int] = 1
    manifest_fields = (count("in_features"), count("out_features"), bias_field())
    param_tensors = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if min(in_features, out_features) < 1:
            raise LayerInputError(f"HalfLinear: in_features and out_features must be >= 1, got {in_features}, "
                                  f"{out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> HalfLinear:
        """``linear`` with its weight rounded to float16 (values beyond its range are refused)."""
        w = linear.weight.detach()
        if bool((w.abs() > torch.finfo(torch.float16).max).any()):
            raise LayerInputError("HalfLinear: the weight has values beyond float16's range (65504)")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(w.half())
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        return layer.to(w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def to_dense(self) -> torch.Tensor:
        return self.weight.float()
