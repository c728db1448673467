"""Inference forms made by ``pack``: a packed DS layer and a 2:4 semi-structured linear.

* :class:`PackedDSLinear` holds a :class:`~stackcomp.kernels.packed.PackedDS` (fp32 or int8) as
  buffers and runs it with :func:`~stackcomp.kernels.dispatch.ds_forward_packed` (compiled CPU
  kernel, Triton on CUDA, torch elsewhere). While ``torch.onnx``/``torch.export`` traces it, it
  computes with standard ops only (by default the weight rebuilt from its factors, then one GEMM;
  see :meth:`PackedDSLinear.forward_standard_ops`) so the graph runs anywhere.
* :class:`Sparse24Linear` stores a 2:4-pruned weight compactly (the 2 kept values of every
  group of 4 input columns and their positions) and runs it through
  ``torch.sparse.to_sparse_semi_structured`` on GPUs that have it, densely elsewhere.

Both load and run without the engine or any pass; neither trains (inference forms). Each is the
``"pack"`` conversion (:mod:`stackcomp.nn.conversions`) of its layer, registered at the end of this
module: ``DSLinear`` and ``Int8DSLinear`` -> ``PackedDSLinear``; an ``nn.Linear`` whose weight is
2:4 sparse -> ``Sparse24Linear`` where 2:4 kernels run (kept, with the reason, elsewhere).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from stackcomp.errors import ArtifactError
from stackcomp.factorize.budget import linear_params
from stackcomp.kernels.dispatch import KERNELS, ds_forward_packed
from stackcomp.kernels.packed import FORMAT, VERSION, PackedDS, pack_ds
from stackcomp.kernels.reference import KernelError, ds_rebuild_weight
from stackcomp.nn.base import CompressedLayer, LayerStorage, register_layer
from stackcomp.nn.conversions import Keep, PackConfig, register_conversion
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.nn.quantized import Int8DSLinear, _exporting, _version

__all__ = ["PackedDSLinear", "Sparse24Linear"]

log = logging.getLogger("stackcomp.pack")


class _NoDeepcopyCache(CompressedLayer):
    """Derived run-time objects (kernel operands, sparse tensors) are not state: drop on copy."""

    _cache_attr: ClassVar[str] = "_cache"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state[self._cache_attr] = None
        return state

    def _apply(self, fn, recurse=True):
        setattr(self, self._cache_attr, None)
        return super()._apply(fn, recurse)

    def _key(self, *extra: Any) -> tuple:
        return (*extra, tuple((t.data_ptr(), _version(t)) for t in self.buffers()))


@register_layer
class PackedDSLinear(_NoDeepcopyCache):
    """A DS layer in a kernel's layout (``pack_ds``), fp32 or int8 values; inference only.

    Buffers are the PackedDS tensors under their own names (``dictionary``, ``values``,
    ``indices``, ``bias``; int8 adds ``dictionary_scale`` and ``values_scale``); the layout meta
    is stored in the layer manifest. ``kernel``: ``"auto"`` (pick per call, see
    ``ds_forward_packed``) or one of ``KERNELS``. ``cpu_variant``: the ISA variant of the compiled
    CPU kernel where it was packed (``pack`` sets it; kept in the manifest, and loading it where a
    lesser variant runs warns).
    """

    layout_version: ClassVar[int] = 1
    #: the standard-ops forms of :meth:`forward_standard_ops`; ``export_form`` is the one exported
    EXPORT_FORMS: ClassVar[tuple[str, ...]] = ("weight", "codes", "gather")
    export_form: str = "weight"

    def __init__(self, meta: dict[str, Any], bias: bool = True, kernel: str = "auto", cpu_variant: str | None = None):
        super().__init__()
        if kernel != "auto" and kernel not in KERNELS:
            raise KernelError(f"PackedDSLinear: kernel must be 'auto' or one of {KERNELS}, got {kernel!r}")
        if cpu_variant is not None and not isinstance(cpu_variant, str):
            raise KernelError(f"PackedDSLinear: cpu_variant must be a string, got {cpu_variant!r}")
        meta = dict(meta)
        shell = _empty_packed(meta, bias)  # validates the meta
        self.meta, self.kernel, self.cpu_variant = meta, kernel, cpu_variant
        self.in_features, self.out_features = shell.in_features, shell.out_features
        for name, t in shell.tensors.items():
            self.register_buffer(name, t)
        if not bias:
            self.register_buffer("bias", None)
        self._cache: tuple[tuple, PackedDS] | None = None

    @classmethod
    def from_packed(cls, packed: PackedDS, kernel: str = "auto") -> PackedDSLinear:
        packed.validate()
        layer = cls(packed.meta, bias=packed.bias is not None, kernel=kernel)
        for name, t in packed.tensors.items():
            getattr(layer, name).copy_(t)
        return layer.to(packed.device)

    @classmethod
    def from_ds(cls, layer: nn.Module, target: str = "cpu", dtype: str | None = None,
                kernel: str = "auto") -> PackedDSLinear:
        """Pack a ``DSLinear`` (fp32 by default) or an ``Int8DSLinear`` (int8 by default; its int8
        numbers are kept exactly, since re-quantizing the dequantized values is the identity)."""
        if isinstance(layer, Int8DSLinear):
            d, v, i, b = layer.dequantized()
            dtype = dtype or "int8"
        else:
            if getattr(layer, "stf", False):
                raise KernelError("PackedDSLinear.from_ds: the DS layer is still in STF training; call freeze() first")
            d, v, i, b = layer.dictionary, layer.values, layer.indices, layer.bias
            dtype = dtype or "fp32"
        return cls.from_packed(pack_ds(d, v, i, b, target=target, dtype=dtype, name=type(layer).__name__), kernel)

    def packed(self) -> PackedDS:
        """The PackedDS over this layer's buffers (made again only when a buffer changes)."""
        key = self._key(self.dictionary.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, PackedDS(meta=dict(self.meta), tensors=dict(self.named_buffers(recurse=False))))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            return self.forward_standard_ops(x)
        return ds_forward_packed(x, self.packed(), kernel=None if self.kernel == "auto" else self.kernel)

    def _canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dictionary (nb,K,B), values (nb,out,s), indices (nb,out,s)) float32/int64, dequantized, as
        traceable torch ops on the buffers."""
        m = self.meta
        nb, s, G, out = int(m["n_blocks"]), int(m["nnz"]), int(m["group"]), int(m["out_features"])
        d = self.dictionary.float()
        v = self.values.float()
        if m["dtype"] == "int8":
            d = d * self.dictionary_scale.unsqueeze(-1)
            v = v * self.values_scale.view(1, -1, 1, G)
        v = v.permute(0, 1, 3, 2).reshape(nb, -1, s)[:, :out]
        i = self.indices.long().permute(0, 1, 3, 2).reshape(nb, -1, s)[:, :out]
        return d, v, i

    def forward_standard_ops(self, x: torch.Tensor, form: str | None = None) -> torch.Tensor:
        """The DS forward as standard ops (what ONNX export records), in one of ``EXPORT_FORMS``
        (default: this layer's ``export_form``):

        * ``"weight"``: the dense weight rebuilt from the factors (gather of dictionary rows, times
          the values, summed over the s slots), then one GEMM. The rebuild reads initializers only,
          so ONNX Runtime folds it into a constant when the session loads: the dense GEMM, factored file.
        * ``"codes"``: ``z_b = x_b D_b^T`` as one batched MatMul, then the codes scattered into a
          dense (nb*K, out) matrix (folded the same way) and one MatMul.
        * ``"gather"``: z, then a gather of z by the indices, a multiply and a sum; tokens x out x
          (n_blocks * nnz) gathered numbers at once (ONNX Runtime spends most of its time there).
        """
        form = form or self.export_form
        if form not in self.EXPORT_FORMS:
            raise KernelError(f"PackedDSLinear: export form must be one of {self.EXPORT_FORMS}, got {form!r}")
        m = self.meta
        nb, K, B, s, out = (int(m[k]) for k in ("n_blocks", "atoms", "block", "nnz", "out_features"))
        d, v, i = self._canonical()
        lead = x.shape[:-1]
        bias = None if self.bias is None else self.bias.float()
        if form == "weight":
            rows = torch.index_select(d.reshape(nb * K, B), 0,
                                      (i + (torch.arange(nb, device=i.device) * K).view(nb, 1, 1)).reshape(-1))
            w = (rows.reshape(nb, out, s, B) * v.unsqueeze(-1)).sum(2).permute(1, 0, 2).reshape(out, nb * B)
            return F.linear(x.float(), w, bias).to(x.dtype)
        xb = x.reshape(-1, nb, B).float().transpose(0, 1)                  # (nb, T, B)
        z = torch.matmul(xb, d.transpose(1, 2)).transpose(0, 1)            # (T, nb, K)
        z = z.reshape(z.shape[0], nb * K)
        if form == "codes":
            codes = torch.zeros(nb, out, K, dtype=v.dtype, device=v.device).scatter_add(2, i, v)
            y = torch.matmul(z, codes.permute(0, 2, 1).reshape(nb * K, out))
        else:
            flat = (i + (torch.arange(nb, device=i.device) * K).view(nb, 1, 1)).permute(1, 0, 2).reshape(-1)
            g = torch.index_select(z, 1, flat).reshape(z.shape[0], out, nb * s)
            y = (g * v.permute(1, 0, 2).reshape(out, nb * s)).sum(-1)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, out).to(x.dtype)

    def to_dense(self) -> torch.Tensor:
        d, v, i = self._canonical()
        return ds_rebuild_weight(d, v, i)

    def manifest(self) -> dict[str, Any]:
        entry = {"layout_version": self.layout_version, "kernel": self.kernel, "bias": self.bias is not None,
                 "meta": dict(self.meta)}
        if self.cpu_variant is not None:
            entry["cpu_variant"] = self.cpu_variant
        return entry

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> PackedDSLinear:
        who = "layer manifest for PackedDSLinear"
        v = entry.get("layout_version", cls.layout_version)
        if v != cls.layout_version:
            raise ArtifactError(f"{who} has layout_version {v}, this stackcomp reads {cls.layout_version}; "
                                "re-run the pack stage")
        if not isinstance(entry.get("meta"), dict):
            raise ArtifactError(f"{who} lacks its 'meta' mapping (has {sorted(entry)})")
        try:
            bias = entry.get("bias", True)
            if not isinstance(bias, bool):
                raise KernelError(f"field 'bias' must be true/false, got {bias!r}")
            layer = cls(entry["meta"], bias=bias, kernel=entry.get("kernel", "auto"),
                        cpu_variant=entry.get("cpu_variant"))
        except KernelError as e:
            raise ArtifactError(f"{who}: {e}") from None
        if layer.cpu_variant is not None and layer.meta.get("target") == "cpu":
            from stackcomp.kernels import ds_cpu

            ds_cpu.check_packed_variant(layer.cpu_variant, "a packed model")
        return layer

    def storage(self) -> LayerStorage:
        """Every saved tensor at its width (int8 values 1 byte, uint8 indices 1 byte, padding rows
        included); ``params`` counts dictionary, values and bias numbers."""
        n_bias = self.bias.numel() if self.bias is not None else 0
        return LayerStorage.measure(self.buffers(), params=self.dictionary.numel() + self.values.numel() + n_bias,
                                    dense_params=linear_params(self.out_features, self.in_features,
                                                               self.bias is not None))

    def extra_repr(self) -> str:
        m = self.meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={m['block']}, "
                f"atoms={m['atoms']}, nnz={m['nnz']}, dtype={m['dtype']}, target={m['target']}, kernel={self.kernel}")


def _empty_packed(meta: dict[str, Any], bias: bool) -> PackedDS:
    """Zero tensors of the shapes the meta describes (for loading), validated."""
    if meta.get("format") != FORMAT or int(meta.get("version", -1)) != VERSION:
        raise KernelError(f"packed DS meta must have format {FORMAT!r} version {VERSION}, got "
                          f"{meta.get('format')!r} {meta.get('version')!r}")
    try:
        nb, K, B, s, G, out_pad, out = (int(meta[k]) for k in ("n_blocks", "atoms", "block", "nnz", "group", "out_pad",
                                                                "out_features"))
    except (KeyError, TypeError, ValueError) as e:
        raise KernelError(f"packed DS meta: field {e} is missing or not an integer") from None
    if min(nb, K, B, s, G, out) < 1 or out_pad % G or out_pad < out:
        raise KernelError(f"packed DS meta: inconsistent sizes {meta}")
    q = meta.get("dtype") == "int8"
    tensors = {"dictionary": torch.zeros(nb, K, B, dtype=torch.int8 if q else torch.float32),
               "values": torch.zeros(nb, out_pad // G, s, G, dtype=torch.int8 if q else torch.float32),
               "indices": torch.zeros(nb, out_pad // G, s, G, dtype=torch.uint8 if K <= 256 else torch.int16)}
    if q:
        tensors["dictionary_scale"] = torch.ones(nb, K)
        tensors["values_scale"] = torch.ones(out_pad)
    if bias:
        tensors["bias"] = torch.zeros(out)
    p = PackedDS(meta=meta, tensors=tensors)
    p.validate()
    return p


# ----------------------------------------------------------------------------- 2:4


#: the 6 ways to keep 2 of 4 positions, as (first, second); the stored code is the row number
_PAIRS = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], dtype=torch.long)


@register_layer
class Sparse24Linear(_NoDeepcopyCache):
    """A linear whose weight has at most 2 nonzeros in every 4 consecutive input columns.

    Stored: ``values`` (out, in/2) float32, the kept numbers of each group in column order, and
    ``pattern`` (out, in/4) uint8, which 2 of the 4 positions they sit at (one of 6 codes): 0.5625
    of the dense bytes. Forward: on a CUDA device with 2:4 support the rebuilt weight becomes a
    ``SparseSemiStructuredTensor`` (cached); elsewhere, or if the conversion is refused (shape
    or dtype limits), a dense GEMM with the rebuilt weight (logged once).
    """

    layout_version: ClassVar[int] = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if in_features < 4 or in_features % 4 or out_features < 1:
            raise KernelError(f"Sparse24Linear: in_features must be a positive multiple of 4, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2))
        self.register_buffer("pattern", torch.zeros(out_features, in_features // 4, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._cache: tuple[tuple, Any] | None = None
        self.last_path = ""  # "semi_structured" or "dense": what the last forward ran

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Sparse24Linear:
        from stackcomp.kernels.ds_triton import is_24_sparse

        w = linear.weight.detach().float()
        if not is_24_sparse(w):
            raise KernelError(f"Sparse24Linear.from_linear: weight {tuple(w.shape)} is not 2:4 sparse along its input")
        out, n = w.shape
        groups = w.reshape(out, n // 4, 4)
        nz = groups != 0
        # choose 2 positions per group: the nonzeros first (stable), then zeros to fill
        order = torch.argsort((~nz).to(torch.int8), dim=-1, stable=True)[..., :2].sort(-1).values
        code = (order[..., 0] * 4 + order[..., 1])
        lut = torch.full((16,), -1, dtype=torch.long)
        lut[_PAIRS[:, 0] * 4 + _PAIRS[:, 1]] = torch.arange(6)
        layer = cls(n, out, linear.bias is not None)
        layer.values.copy_(groups.gather(-1, order).reshape(out, n // 2))
        layer.pattern.copy_(lut[code].to(torch.uint8))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    def to_dense(self) -> torch.Tensor:
        out, n = self.out_features, self.in_features
        pos = _PAIRS.to(self.pattern.device)[self.pattern.long()]            # (out, n/4, 2)
        w = torch.zeros(out, n // 4, 4, dtype=self.values.dtype, device=self.values.device)
        return w.scatter(-1, pos, self.values.view(out, n // 4, 2)).reshape(out, n)

    def _weight_for(self, x: torch.Tensor) -> tuple[str, torch.Tensor]:
        key = self._key(x.device, x.dtype)
        if self._cache is None or self._cache[0] != key:
            w = self.to_dense().to(x.dtype)
            path, weight = "dense", w
            if x.is_cuda:
                from stackcomp.kernels.ds_triton import semi_structured_24

                try:
                    weight, path = semi_structured_24(w.contiguous()), "semi_structured"
                except KernelError as e:
                    log.warning("Sparse24Linear %dx%d: %s; running dense", self.out_features, self.in_features, e)
            self._cache = (key, (path, weight))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            return F.linear(x, self.to_dense().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        path, w = self._weight_for(x)
        self.last_path = path
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if path == "semi_structured":
            lead = x.shape[:-1]
            y = F.linear(x.reshape(-1, self.in_features), w, bias)
            return y.reshape(*lead, self.out_features)
        return F.linear(x, w, bias)

    def manifest(self) -> dict[str, Any]:
        return {"layout_version": self.layout_version, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> Sparse24Linear:
        who = "layer manifest for Sparse24Linear"
        if entry.get("layout_version", cls.layout_version) != cls.layout_version:
            raise ArtifactError(f"{who}: layout_version {entry.get('layout_version')} is not {cls.layout_version}")
        try:
            return cls(int(entry["in_features"]), int(entry["out_features"]), bool(entry.get("bias", True)))
        except (KeyError, TypeError, ValueError, KernelError) as e:
            raise ArtifactError(f"{who}: {e}") from None

    def storage(self) -> LayerStorage:
        n_bias = self.bias.numel() if self.bias is not None else 0
        return LayerStorage.measure(self.buffers(), params=self.values.numel() + n_bias,
                                    dense_params=linear_params(self.out_features, self.in_features,
                                                               self.bias is not None))


# ----------------------------------------------------------------------------- pack conversions


@register_conversion("pack", DSLinear)
def _ds_to_packed(layer: DSLinear, config: PackConfig) -> PackedDSLinear:
    return PackedDSLinear.from_ds(layer, target=config.layout, dtype="fp32" if config.dtype == "auto" else config.dtype)


@register_conversion("pack", Int8DSLinear)
def _int8_ds_to_packed(layer: Int8DSLinear, config: PackConfig) -> PackedDSLinear:
    return PackedDSLinear.from_ds(layer, target=config.layout, dtype="int8" if config.dtype == "auto" else config.dtype)


def is_24_linear(linear: nn.Linear) -> bool:
    """A weight with zeros in the 2:4 pattern along its input (N:M-pruned), not merely 2:4-shaped."""
    from stackcomp.kernels.ds_triton import is_24_sparse

    w = linear.weight.detach()
    return w.shape[1] % 4 == 0 and bool((w == 0).any()) and is_24_sparse(w)


@register_conversion("pack", nn.Linear)
def _linear_to_sparse24(linear: nn.Linear, config: PackConfig) -> Sparse24Linear | Keep | None:
    """2:4-sparse plain linears become 2:4 kernels where they run; other linears stay as they are."""
    if type(linear) is not nn.Linear or not is_24_linear(linear):
        return None
    if not config.sparse24:
        return Keep("sparse24: false", key="kept_dense")
    from stackcomp.kernels.ds_triton import semi_structured_24_supported

    ok, why = semi_structured_24_supported("cuda" if config.layout == "cuda" else "cpu")
    return Sparse24Linear.from_linear(linear) if ok else Keep(why, key="kept_dense")


@register_conversion("pack", PackedDSLinear)
@register_conversion("pack", Sparse24Linear)
def _already_packed(layer: nn.Module, config: PackConfig) -> None:
    return None
