"""A block's closing residual add and LayerNorm as one pass: :class:`FusedResidualNorm`.

Why: BERT-style blocks end each half with ``LayerNorm(dropout(dense(h)) + input_tensor)``. As torch ops
the sum goes to memory and is read back by the norm; at batch 32 the rows do not stay in cache between
the two, and on a pruned int8 MiniLM the adds and norms took a quarter of the time. The C++ kernel
(``stackcomp/kernels/ds_cpu_norm.h``) sums, takes the statistics and normalizes each row while it sits
in cache. The numbers are the same up to float rounding (fp32 sums in another order).

The modules are found by structure (:func:`find_residual_norms`): a module with a linear ``dense``, an
affine ``nn.LayerNorm`` named ``LayerNorm`` over the dense's outputs, and ``forward(hidden_states,
input_tensor)`` -- BERT's, RoBERTa's, ELECTRA's, XLM-R's and DeBERTa-v2's ``SelfOutput`` and
``Output``. The whole module is replaced; its ``dense`` and ``LayerNorm`` children stay (a compressed
``dense`` too: int8, a fused FFN), so the state dict keeps its keys. ``pack`` (``fuse_norm: true``) makes
them and checks the model's outputs against the unfused ones. Inference only: dropout is not applied.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from stackcomp.factorize.budget import tensor_bytes
from stackcomp.nn.base import CompressedLayer, LayerStorage, register_layer
from stackcomp.nn.manifest import DeclaredLayer, Field, count, flag
from stackcomp.nn.quantized import _exporting

__all__ = ["FusedResidualNorm", "ResidualNorm", "ResidualNormSite", "find_residual_norms", "residual_norm_module"]


class ResidualNorm(nn.Module):
    """``LayerNorm(dense(hidden_states) + input_tensor)`` in torch ops: a :class:`FusedResidualNorm`'s dense
    form (what ``densify`` puts in its place; the state dict keys are those of the module it replaced)."""

    def __init__(self, dense: nn.Module, norm: nn.LayerNorm):
        super().__init__()
        self.dense, self.LayerNorm = dense, norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


def _eps_field() -> Field:
    return Field("eps", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                 "a number >= 0", load=float)


@register_layer
class FusedResidualNorm(DeclaredLayer):
    """``LayerNorm(dense(hidden_states) + input_tensor)``, the add and the norm in one C++ pass per row.

    Children: ``dense`` (built as an ``nn.Linear`` of the recorded sizes; a compressed layer's own manifest
    entry replaces it on load) and ``LayerNorm`` (``nn.LayerNorm(out_features, eps)``). Where the kernel
    cannot run (CUDA, ``STACKCOMP_KERNELS=torch``, an older build, while exporting, with gradients) the
    same is computed with torch ops.
    """

    layout_version: ClassVar[int] = 1
    replaces: ClassVar[str] = "norm"  # a block's output module: its dense child counts as the linear
    manifest_fields = (count("in_features"), count("out_features"), flag("dense_bias"), _eps_field())

    def __init__(self, in_features: int, out_features: int, dense_bias: bool = True, eps: float = 1e-12):
        super().__init__()
        self.in_features, self.out_features, self.eps = in_features, out_features, float(eps)
        self.dense_bias = dense_bias  # whether the dense has a bias (to rebuild the placeholder on load)
        self.dense: nn.Module = nn.Linear(in_features, out_features, bias=dense_bias)
        self.LayerNorm = nn.LayerNorm(out_features, eps=self.eps)

    @classmethod
    def from_module(cls, module: nn.Module) -> FusedResidualNorm:
        """From a found module (:func:`find_residual_norms`): its ``dense`` and ``LayerNorm`` are kept."""
        dense, norm = module.dense, module.LayerNorm
        layer = cls(dense.in_features, dense.out_features, getattr(dense, "bias", None) is not None, norm.eps)
        layer.dense, layer.LayerNorm = dense, norm
        return layer

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        y = self.dense(hidden_states)
        ext = None
        norm = self.LayerNorm
        if (y.device.type == "cpu" and y.dtype == torch.float32 and input_tensor.dtype == torch.float32
                and norm.weight is not None and norm.bias is not None and not _exporting()
                and not (torch.is_grad_enabled() and (y.requires_grad or input_tensor.requires_grad))):
            ext = _extension()
        if ext is None:
            return norm(y + input_tensor)
        return ext.add_layernorm(y, input_tensor, norm.weight.detach(), norm.bias.detach(), norm.eps)

    # ------------------------------------------------------------------ sizes and dense form

    def dense_params(self) -> int:
        return sum(p.numel() for p in self.LayerNorm.parameters())

    def storage(self) -> LayerStorage:
        """The norm's own tensors only: the ``dense`` child is counted as the linear layer it is."""
        n = self.dense_params()
        return LayerStorage(params=n, bytes=tensor_bytes(*self.LayerNorm.parameters()), dense_params=n,
                            dense_bytes=float(tensor_bytes(*self.LayerNorm.parameters())))

    def dense_module(self) -> nn.Module:
        from stackcomp.nn.dense import dense_module

        dense = dense_module(self.dense) if isinstance(self.dense, CompressedLayer) else self.dense
        return ResidualNorm(dense, self.LayerNorm)


def _extension():
    """The CPU extension where it has ``add_layernorm`` (else None, logged once)."""
    from stackcomp.kernels import ds_cpu

    return ds_cpu.extension_with("add_layernorm", "FusedResidualNorm")


# ----------------------------------------------------------------------------- finding them


@dataclass(frozen=True)
class ResidualNormSite:
    """A module found by :func:`find_residual_norms`; ``reason`` is why it cannot be fused (None: it can)."""

    name: str
    reason: str | None


def _linear_like(m: nn.Module | None) -> bool:
    return isinstance(m, (nn.Linear, CompressedLayer)) and hasattr(m, "in_features") and hasattr(m, "out_features")


def find_residual_norms(model: nn.Module) -> list[ResidualNormSite]:
    """Every module with a linear ``dense`` and a ``LayerNorm`` child whose ``forward`` takes
    ``(hidden_states, input_tensor)``, fusable or not (with why). That the module computes
    ``LayerNorm(dense(h) + input_tensor)`` is what ``pack`` then checks on real batches."""
    sites = []
    for name, m in model.named_modules():
        if isinstance(m, FusedResidualNorm):
            continue
        dense, norm = getattr(m, "dense", None), getattr(m, "LayerNorm", None)
        if not (_linear_like(dense) and isinstance(norm, nn.LayerNorm)):
            continue
        try:
            signature = list(inspect.signature(m.forward).parameters.values())
        except (TypeError, ValueError):
            continue
        params = [p.name for p in signature]
        if params[:2] != ["hidden_states", "input_tensor"]:
            continue
        reason = None
        if norm.normalized_shape != (dense.out_features,):
            reason = f"LayerNorm normalizes {tuple(norm.normalized_shape)}, the dense gives {dense.out_features}"
        elif norm.weight is None or norm.bias is None:
            reason = "LayerNorm without elementwise affine weight and bias"
        elif any(p.default is inspect.Parameter.empty for p in signature[2:]):
            reason = f"forward takes more inputs ({', '.join(params[2:])})"
        sites.append(ResidualNormSite(name, reason))
    return sites


def residual_norm_module(model: nn.Module, site: ResidualNormSite) -> FusedResidualNorm:
    """The :class:`FusedResidualNorm` to set at a fusable site (its children are the module's own)."""
    return FusedResidualNorm.from_module(model.get_submodule(site.name))
