"""A transformer block's FFN (linear, GELU, linear) as one fused int8 op: :class:`FusedInt8FFN`.

Why: run as two int8 linears plus a GELU, the (tokens x intermediate) hidden activation is written and
read several times and each linear quantizes its input in a pass of its own; the fused C++ kernel
(``stackcomp/kernels/ds_cpu_ffn.h``) keeps a block of hidden rows in cache between the two GEMMs.
Numerics differ from :class:`~stackcomp.nn.quantized.Int8Linear` on the torch backend: activations are
quantized per row (8 bits) instead of per tensor (7 bits, reduce_range); see :mod:`stackcomp.kernels.ffn`.

The FFN is found by structure (:func:`find_ffns`, patterns in :data:`FFN_PATTERNS`): the second linear
becomes the :class:`FusedInt8FFN`, the first linear and the activation become :class:`FusedFFNInput`
(pass-through), so the block's own code (BERT's residual + LayerNorm in ``output``, DistilBERT's
dropout) runs unchanged around it. Both are registered layers: the manifest rebuilds them on load.
Inference only; the ``pack`` pass (``fuse_ffn: true``) makes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from stackcomp.factorize.budget import FP32_BYTES, linear_params, tensor_bytes
from stackcomp.kernels.ffn import ACTS, KernelRoute, ffn_forward_cpu, ffn_operands, fused_ffn_reference
from stackcomp.kernels.reference import KernelError
from stackcomp.nn.base import CompressedLayer, LayerStorage, register_layer
from stackcomp.nn.manifest import DeclaredLayer, Field, choice, count
from stackcomp.nn.quantized import Int8Linear, _exporting, _version, dequantize_rows, quantize_rows

__all__ = ["FFN_PATTERNS", "FFNSite", "FusedFFNInput", "FusedInt8FFN", "ffn_activation", "find_ffns", "fused_modules"]


#: (first linear, activation, second linear) relative to the module that holds them, per model family
FFN_PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),  # BERT, RoBERTa, MiniLM, ...
    ("ffn.lin1", "ffn.activation", "ffn.lin2"),                                  # DistilBERT
    ("ffn", "activation", "ffn_output"),                                         # ALBERT
)


def ffn_activation(act: nn.Module) -> str | None:
    """The kernel's name for a GELU module ("gelu" exact erf form, "gelu_tanh"), None for anything else."""
    name = type(act).__name__
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if name == "GELUActivation":  # transformers: F.gelu, or its erf formula in Python
        fn = getattr(act, "act", None)
        if fn is torch.nn.functional.gelu or getattr(fn, "__name__", "") == "_gelu_python":
            return "gelu"
        return None
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):  # the tanh formula
        return "gelu_tanh"
    return None


def _weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 weight, per-row scale, fp32 bias) of an Int8Linear (as stored) or an nn.Linear (quantized now)."""
    if isinstance(layer, Int8Linear):
        return layer.weight.detach().cpu(), layer.weight_scale.detach().float().cpu(), (
            None if layer.bias is None else layer.bias.detach().float().cpu())
    q, s = quantize_rows(layer.weight)
    return q.cpu(), s.cpu(), None if layer.bias is None else layer.bias.detach().float().cpu()


@register_layer
class FusedFFNInput(DeclaredLayer):
    """Stands where a fused FFN's first linear and activation were: passes its input on unchanged (the
    :class:`FusedInt8FFN` in the second linear's place computes the whole FFN). Holds nothing."""

    layout_version: ClassVar[int] = 1
    replaces: ClassVar[str] = "fused"  # not a linear of its own: the FusedInt8FFN counts both
    manifest_fields = ()
    in_features = out_features = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def dense_params(self) -> int:
        return 0

    def storage(self) -> LayerStorage:
        return LayerStorage(params=0, bytes=0.0, dense_params=0, dense_bytes=0.0)

    def dense_module(self) -> nn.Module:
        return nn.Identity()


def _bias(name: str) -> Field:
    """Whether the layer has the bias tensor ``name``."""
    return Field(name, lambda v: isinstance(v, bool), "true/false", True, dump=lambda m: getattr(m, name) is not None)


@register_layer
class FusedInt8FFN(DeclaredLayer):
    """``y = W2 act(W1 x + b1) + b2`` with int8 weights (per-output-channel scales, Int8Linear's layout) and
    per-row 8-bit activations, run by the fused C++ kernel on CPU; inference only.

    Buffers: ``weight1`` int8 (hidden, in), ``weight1_scale`` (hidden,), ``bias1`` (hidden,), ``weight2``
    int8 (out, hidden), ``weight2_scale`` (out,), ``bias2`` (out,). Where the kernel cannot run (CUDA,
    ``STACKCOMP_KERNELS=torch``, an extension built before it existed) the same arithmetic runs as torch ops
    (:func:`~stackcomp.kernels.ffn.fused_ffn_reference`, logged once); while exporting, and when x needs a
    gradient, too (standard ops; the rounding passes no gradient).
    """

    layout_version: ClassVar[int] = 1
    manifest_fields = (count("in_features"), count("hidden_features"), count("out_features"),
                       choice("activation", ACTS), _bias("bias1"), _bias("bias2"))
    param_tensors = ("weight1", "bias1", "weight2", "bias2")

    def __init__(self, in_features: int, hidden_features: int, out_features: int, activation: str = "gelu",
                 bias1: bool = True, bias2: bool = True):
        super().__init__()
        if activation not in ACTS:
            raise KernelError(f"FusedInt8FFN: activation must be one of {sorted(ACTS)}, got {activation!r}")
        if min(in_features, hidden_features, out_features) < 1:
            raise KernelError(f"FusedInt8FFN: sizes must be >= 1, got {in_features}, {hidden_features}, {out_features}")
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.activation = activation
        self.register_buffer("weight1", torch.zeros(hidden_features, in_features, dtype=torch.int8))
        self.register_buffer("weight1_scale", torch.ones(hidden_features))
        self.register_buffer("bias1", torch.zeros(hidden_features) if bias1 else None)
        self.register_buffer("weight2", torch.zeros(out_features, hidden_features, dtype=torch.int8))
        self.register_buffer("weight2_scale", torch.ones(out_features))
        self.register_buffer("bias2", torch.zeros(out_features) if bias2 else None)
        self._cache: tuple[tuple, tuple] | None = None

    @classmethod
    def from_layers(cls, first: nn.Module, activation: str, second: nn.Module) -> FusedInt8FFN:
        """From two ``nn.Linear`` (quantized now, per row) or ``Int8Linear`` (their int8 numbers kept)."""
        q1, s1, b1 = _weights(first)
        q2, s2, b2 = _weights(second)
        if q2.shape[1] != q1.shape[0]:
            raise KernelError(f"FusedInt8FFN: the first linear has {q1.shape[0]} outputs, the second takes "
                              f"{q2.shape[1]} inputs")
        layer = cls(q1.shape[1], q1.shape[0], q2.shape[0], activation, b1 is not None, b2 is not None)
        for name, t in (("weight1", q1), ("weight1_scale", s1), ("bias1", b1), ("weight2", q2),
                        ("weight2_scale", s2), ("bias2", b2)):
            if t is not None:
                getattr(layer, name).copy_(t)
        return layer

    # ------------------------------------------------------------------ running

    def _stored(self) -> tuple:
        return (self.weight1, self.weight1_scale, self.bias1, self.weight2, self.weight2_scale, self.bias2)

    def _kernel(self) -> KernelRoute | None:
        """The C++ kernel and its operands where it runs, else None; made once per weights/kernel-build
        (the operand packing is a permute of the int8 weights)."""
        from stackcomp.kernels import ds_cpu

        key = (ds_cpu._state["gen"], tuple((t.data_ptr(), _version(t)) for t in self._stored() if t is not None))
        if self._cache is None or self._cache[0] != key:
            ext = ds_cpu.extension_with("ffn_forward", "FusedInt8FFN")
            run = None
            if ext is not None:
                stored = self._stored()
                run = KernelRoute.for_extension(ext, ffn_operands(*stored),
                                                lambda multiple: ffn_operands(*stored, multiple=multiple))
            self._cache = (key, run)
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise KernelError(f"FusedInt8FFN: input has {x.shape[-1]} features, expected {self.in_features}")
        grad = x.requires_grad and torch.is_grad_enabled()  # the kernel has no backward: torch ops then
        run = None if (grad or _exporting() or x.device.type != "cpu") else self._kernel()
        if run is None:
            return self.forward_reference(x, exact=False).to(x.dtype)
        ops, path = run.pick(x.numel() // x.shape[-1])
        return ffn_forward_cpu(x, ops, self.activation, run.ext, path=path)

    def forward_reference(self, x: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """The kernel's arithmetic as torch ops (the oracle; ``exact=False``: fp32 sums, standard ops)."""
        return fused_ffn_reference(x, self.weight1, self.weight1_scale, self.bias1, self.weight2, self.weight2_scale,
                                   self.bias2, self.activation, exact=exact)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None  # kernel operands are rebuilt on first use (deepcopy, pickle)
        return state

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ sizes and dense form

    def dense_params(self) -> int:
        return (linear_params(self.hidden_features, self.in_features, self.bias1 is not None)
                + linear_params(self.out_features, self.hidden_features, self.bias2 is not None))

    def storage(self) -> LayerStorage:
        params = sum(t.numel() for t in (getattr(self, n) for n in self.param_tensors) if t is not None)
        dense = self.dense_params()
        return LayerStorage(params=params, bytes=tensor_bytes(*self.state_dict(keep_vars=True).values()),
                            dense_params=dense, dense_bytes=float(dense * FP32_BYTES))

    def dense_module(self) -> nn.Module:
        """linear, GELU, linear in fp32 with the dequantized weights (what ``densify`` puts in its place)."""
        first = nn.Linear(self.in_features, self.hidden_features, bias=self.bias1 is not None)
        second = nn.Linear(self.hidden_features, self.out_features, bias=self.bias2 is not None)
        with torch.no_grad():
            first.weight.copy_(dequantize_rows(self.weight1, self.weight1_scale))
            second.weight.copy_(dequantize_rows(self.weight2, self.weight2_scale))
            if self.bias1 is not None:
                first.bias.copy_(self.bias1)
            if self.bias2 is not None:
                second.bias.copy_(self.bias2)
        act = nn.GELU(approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return nn.Sequential(first, act, second).to(self.weight1_scale.device)


# ----------------------------------------------------------------------------- finding FFNs


@dataclass(frozen=True)
class FFNSite:
    """One FFN found by structure: the full names of its two linears and its activation; ``reason`` is
    why it cannot be fused (None: it can), ``activation`` the kernel's name for its GELU."""

    first: str
    act: str
    second: str
    activation: str | None
    reason: str | None


_FUSABLE = (nn.Linear, Int8Linear)


def _linear_like(m: nn.Module | None) -> bool:
    return isinstance(m, (nn.Linear, CompressedLayer)) and not isinstance(m, (FusedFFNInput, FusedInt8FFN))


def _get(m: nn.Module, path: str) -> nn.Module | None:
    try:
        return m.get_submodule(path)
    except AttributeError:
        return None


def find_ffns(model: nn.Module) -> list[FFNSite]:
    """Every FFN of a known structure (:data:`FFN_PATTERNS`) in ``model``, fusable or not (with why).

    Fusable: both linears are ``nn.Linear`` or ``Int8Linear``, the activation is a GELU (erf or tanh
    form), and the first linear's outputs are the second's inputs. DS, packed DS, low-rank and other
    compressed linears stay as they are (their own kernels run them).
    """
    sites: list[FFNSite] = []
    for name, m in model.named_modules():
        for p1, pa, p2 in FFN_PATTERNS:
            first, act, second = _get(m, p1), _get(m, pa), _get(m, p2)
            if not (_linear_like(first) and _linear_like(second)) or act is None:
                continue
            full = [f"{name}.{p}" if name else p for p in (p1, pa, p2)]
            activation = ffn_activation(act)
            reason = None
            if activation is None:
                reason = f"activation {type(act).__name__} is not GELU (erf or tanh form)"
            elif not (type(first) in _FUSABLE and type(second) in _FUSABLE):
                kinds = sorted({type(first).__name__, type(second).__name__} - {"Linear", "Int8Linear"})
                reason = (f"{', '.join(kinds)} linears stay unfused (only nn.Linear / Int8Linear pairs fuse; "
                          "DS layers run the packed DS kernel)")
            elif first.out_features != second.in_features:
                reason = f"{full[0]} has {first.out_features} outputs, {full[2]} takes {second.in_features} inputs"
            sites.append(FFNSite(*full, activation=activation, reason=reason))
    return sites


def fused_modules(model: nn.Module, site: FFNSite) -> dict[str, nn.Module]:
    """The modules to set for a fusable site: pass-throughs at the first linear and the activation,
    the :class:`FusedInt8FFN` at the second linear."""
    first, second = model.get_submodule(site.first), model.get_submodule(site.second)
    device = next(iter(list(second.buffers()) + list(second.parameters()))).device
    fused = FusedInt8FFN.from_layers(first, site.activation, second).to(device)
    return {site.first: FusedFFNInput(), site.act: FusedFFNInput(), site.second: fused}
