"""An attention block's query, key and value projections as one int8 GEMM: :class:`FusedInt8QKV`.

Why: run as three int8 linears, the block's input is quantized three times (once per call) and the
GEMM runs three times on a third of the outputs; on a single sentence those per-call costs are most
of the projection's time. One int8 linear over the stacked weights quantizes the input once and
multiplies once. The arithmetic is the same: every backend quantizes the input per tensor (torch)
or per row (intmm), and the three projections share that input, so the fused outputs equal the
separate ones up to float summation order.

The projections are found by structure (:func:`find_qkvs`, patterns in :data:`QKV_PATTERNS`): the
query linear becomes the :class:`FusedInt8QKV`, which returns the queries and keeps the keys and
values for its input; the key and value linears become :class:`FusedQKVPart`, which return them.
The block's own code runs unchanged around them. A part called on another input than the one the
fused layer last saw (a model that projects keys from other states) computes its slice directly:
the answer is right either way. The parts find their fused layer through :func:`link_fused_qkv`,
which ``stackcomp.load``, transformers' loading
path and ``pack`` run (:func:`~stackcomp.nn.base.link_layers`). Inference only; ``pack`` (``fuse_qkv:
true``) makes them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from stackcomp.kernels.reference import KernelError
from stackcomp.nn.base import LayerStorage, register_layer
from stackcomp.nn.fused import _get  # a submodule by relative name, or None
from stackcomp.nn.manifest import DeclaredLayer, choice, count
from stackcomp.nn.quantized import Int8Linear, dequantize_rows

__all__ = ["QKV_PATTERNS", "FusedInt8QKV", "FusedQKVPart", "QKVSite", "find_qkvs", "fused_qkv_modules",
           "link_fused_qkv"]

#: (query, key, value) linears relative to the module that holds them, per model family
QKV_PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("query", "key", "value"),     # BERT, RoBERTa, MiniLM, ALBERT, ELECTRA, ...
    ("q_lin", "k_lin", "v_lin"),   # DistilBERT
)
PARTS = ("key", "value")


@register_layer
class FusedInt8QKV(Int8Linear):
    """The query, key and value linears stacked into one :class:`Int8Linear` (rows: queries, then keys,
    then values); ``forward`` returns the queries and keeps the keys and values for the parts.

    Buffers as ``Int8Linear`` over ``out_features = query + key + value features``.
    """

    layout_version: ClassVar[int] = 1
    manifest_fields = (*Int8Linear.manifest_fields, count("query_features"), count("key_features"))

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str = "torch",
                 query_features: int = 1, key_features: int = 1):
        super().__init__(in_features, out_features, bias, backend)
        if out_features - query_features - key_features < 1:
            raise KernelError(f"FusedInt8QKV: {out_features} outputs leave no value features after "
                              f"{query_features} query and {key_features} key features")
        self.query_features, self.key_features = query_features, key_features
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # per thread: (x, k, v)

    @property
    def value_features(self) -> int:
        return self.out_features - self.query_features - self.key_features

    @classmethod
    def from_linears(cls, query: Int8Linear, key: Int8Linear, value: Int8Linear) -> FusedInt8QKV:
        """Stack three ``Int8Linear`` of one input size and backend, all with or all without bias."""
        layers = (query, key, value)
        if len({m.in_features for m in layers}) > 1 or len({m.backend for m in layers}) > 1:
            raise KernelError("FusedInt8QKV: query, key and value must share in_features and backend")
        if len({m.bias is None for m in layers}) > 1:
            raise KernelError("FusedInt8QKV: query, key and value must all have a bias or none")
        out = sum(m.out_features for m in layers)
        fused = cls(query.in_features, out, query.bias is not None, query.backend, query.out_features,
                    key.out_features)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in layers]))
            fused.weight_scale.copy_(torch.cat([m.weight_scale for m in layers]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([m.bias for m in layers]))
        return fused.to(query.weight.device)

    def _split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split([self.query_features, self.key_features, self.value_features], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(super().forward(x))
        self._saved[threading.get_ident()] = (x, k, v)
        return q

    def part(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The keys or values for ``x``: those kept by the last forward on this very tensor (used
        once), else computed now."""
        index = PARTS.index(name) + 1
        saved = self._saved.get(threading.get_ident())
        if saved is not None and saved[0] is x:
            if name == PARTS[-1]:
                del self._saved[threading.get_ident()]
            return saved[index]
        return self._split(super().forward(x))[index]

    def rows(self, name: str) -> slice:
        """The rows of the stacked weight that belong to ``name`` (query, key or value)."""
        start = {"query": 0, "key": self.query_features, "value": self.query_features + self.key_features}[name]
        size = {"query": self.query_features, "key": self.key_features, "value": self.value_features}[name]
        return slice(start, start + size)

    def dense_linear(self, name: str) -> nn.Linear:
        """One projection as an fp32 ``nn.Linear`` with the dequantized weight (``densify``)."""
        rows = self.rows(name)
        linear = nn.Linear(self.in_features, rows.stop - rows.start, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(dequantize_rows(self.weight[rows], self.weight_scale[rows]))
            if self.bias is not None:
                linear.bias.copy_(self.bias[rows])
        return linear.to(self.weight_scale.device)

    def dense_module(self) -> nn.Module:
        return self.dense_linear("query")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_saved"] = {}  # activations are not part of the layer (deepcopy, pickle)
        return state


@register_layer
class FusedQKVPart(DeclaredLayer):
    """Stands where the key or value linear was: returns the slice the :class:`FusedInt8QKV` beside it
    computed. Holds nothing; :func:`link_fused_qkv` tells it where the fused layer is."""

    layout_version: ClassVar[int] = 1
    replaces: ClassVar[str] = "fused"  # not a linear of its own: the FusedInt8QKV counts all three
    manifest_fields = (choice("part", PARTS), count("out_features"))

    def __init__(self, part: str, out_features: int):
        super().__init__()
        if part not in PARTS:
            raise KernelError(f"FusedQKVPart: part must be one of {PARTS}, got {part!r}")
        self.part, self.out_features, self.in_features = part, out_features, 0
        self._fused: FusedInt8QKV | None = None  # set by link_fused_qkv; not a submodule

    def link(self, fused: FusedInt8QKV) -> None:
        rows = fused.rows(self.part)
        if rows.stop - rows.start != self.out_features:
            raise KernelError(f"FusedQKVPart({self.part}) has {self.out_features} outputs, its fused layer holds "
                              f"{rows.stop - rows.start}")
        object.__setattr__(self, "_fused", fused)  # plain attribute: the fused layer stays its parent's child

    @staticmethod
    def link_model(model: nn.Module) -> None:
        """The :func:`~stackcomp.nn.base.link_layers` hook."""
        link_fused_qkv(model)

    def _owner(self) -> FusedInt8QKV:
        if self._fused is None:
            raise KernelError(f"FusedQKVPart({self.part}) is not linked to its FusedInt8QKV: build the model with "
                              "stackcomp.load or call stackcomp.nn.fused_qkv.link_fused_qkv(model)")
        return self._fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner().part(x, self.part)

    def dense_params(self) -> int:
        return 0

    def storage(self) -> LayerStorage:
        return LayerStorage(params=0, bytes=0.0, dense_params=0, dense_bytes=0.0)

    def dense_module(self) -> nn.Module:
        return self._owner().dense_linear(self.part)


# ----------------------------------------------------------------------------- finding and linking


@dataclass(frozen=True)
class QKVSite:
    """One attention block's projections found by structure: full names; ``reason`` is why they
    cannot be fused (None: they can)."""

    query: str
    key: str
    value: str
    reason: str | None


def find_qkvs(model: nn.Module) -> list[QKVSite]:
    """Every (query, key, value) triple of a known structure (:data:`QKV_PATTERNS`), fusable or not.

    Fusable: all three are ``Int8Linear`` (the int8 pass's output) of one input size and backend,
    all with a bias or none. fp32, DS and other compressed projections stay as they are.
    """
    sites: list[QKVSite] = []
    for name, m in model.named_modules():
        for pattern in QKV_PATTERNS:
            layers = [_get(m, p) for p in pattern]
            if any(x is None for x in layers) or isinstance(layers[1], FusedQKVPart):
                continue
            full = [f"{name}.{p}" if name else p for p in pattern]
            reason = None
            kinds = sorted({type(x).__name__ for x in layers} - {"Int8Linear"})
            if kinds:
                reason = f"{', '.join(kinds)} projections stay unfused (only three Int8Linear fuse)"
            elif len({(x.in_features, x.backend) for x in layers}) > 1:
                reason = "the projections differ in input size or int8 backend"
            elif len({x.bias is None for x in layers}) > 1:
                reason = "some projections have a bias and some do not"
            sites.append(QKVSite(*full, reason=reason))
    return sites


def fused_qkv_modules(model: nn.Module, site: QKVSite) -> dict[str, nn.Module]:
    """The modules to set for a fusable site (linked): the fused layer at the query, parts at key and value."""
    fused = FusedInt8QKV.from_linears(*(model.get_submodule(n) for n in (site.query, site.key, site.value)))
    parts = {}
    for part, name in zip(PARTS, (site.key, site.value), strict=True):
        parts[name] = FusedQKVPart(part, model.get_submodule(name).out_features)
        parts[name].link(fused)
    return {site.query: fused, **parts}


def link_fused_qkv(model: nn.Module) -> int:
    """Point every :class:`FusedQKVPart` at the :class:`FusedInt8QKV` beside it (same parent, the
    pattern's query name); returns how many were linked. A part with no fused layer beside it is an error."""
    linked = 0
    for name, m in model.named_modules():
        for pattern in QKV_PATTERNS:
            fused = _get(m, pattern[0])
            for part, attr in zip(PARTS, pattern[1:], strict=True):
                holder = _get(m, attr)
                if not isinstance(holder, FusedQKVPart):
                    continue
                if not isinstance(fused, FusedInt8QKV):
                    raise KernelError(f"{name}.{attr} is a FusedQKVPart but {name}.{pattern[0]} is "
                                      f"{type(fused).__name__}, not the FusedInt8QKV it reads from")
                if holder.part != part:
                    raise KernelError(f"{name}.{attr} is the {holder.part!r} part, expected {part!r}")
                holder.link(fused)
                linked += 1
    return linked
