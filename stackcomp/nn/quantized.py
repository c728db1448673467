"""int8 layers: int8 weights with symmetric per-row scales, run by a backend adapter.

One storage layout for every backend: ``q = round(w / scale)`` in [-127, 127] with
``scale = max|w_row| / 127`` per output row (an all-zero row gets scale 1), bias in fp32. This
is exactly bitsandbytes' ``int8_vectorwise_quant`` layout (its ``SCB`` is ``127 * scale``) and a
per-channel ``qint8`` tensor for PyTorch, so a saved layer runs on either backend.

Backends (:func:`get_backend`), each behind one adapter class:

* ``torch`` -- :class:`TorchDynamicInt8`: PyTorch's dynamic int8 linear (fbgemm/x86, activations
  quantized per tensor at run time, ``reduce_range`` as ``quantize_dynamic`` does on x86; large
  calls on oneDNN's kernel where the CPU has AMX, the same arithmetic: :data:`ONEDNN_MIN_WORK`). Its API
  (``torch.ops.quantized``) is deprecated in favour of torchao; nothing outside the adapter
  touches it. CPU only.
* ``bitsandbytes`` -- :class:`BitsAndBytesInt8`: bitsandbytes' int8 matmul (activations quantized
  per row, ``int8_linear_matmul``), the arithmetic of ``Linear8bitLt(has_fp16_weights=False)``
  without outlier decomposition; the int32 result is rescaled in fp32 (bitsandbytes' own
  ``int8_mm_dequant`` returns fp16). CPU and CUDA.
* ``intmm`` -- :class:`IntMMInt8`: the same per-row arithmetic as bitsandbytes on PyTorch's own
  int8 GEMM (``torch._int_mm``, oneDNN). CPU only.
* ``kernel`` -- :class:`KernelInt8`: the same per-row arithmetic on stackcomp's compiled CPU kernel
  (the fused FFN's GEMM: AVX-512 VNNI, AMX tiles for calls of 16+ tokens where the CPU has AMX), the
  rounding, the GEMM and the rescale in one call. CPU only.

Where a backend cannot run (torch on CUDA, bitsandbytes not installed when a saved layer is
loaded) the layer computes with its dequantized weights and logs it once: same stored numbers,
no int8 arithmetic.

Layers (all registered for the artifact manifest, all with exact :meth:`storage`):

* :class:`Int8Linear` -- a quantized ``nn.Linear``;
* :class:`Int8LowRankLinear` -- ``LowRankLinear`` with both factors int8;
* :class:`Int8DSLinear` -- a DS layer with an int8 dictionary (scale per atom) and int8 code
  values (scale per output row across all blocks): the int8 layout of ``kernels/packed.py``, so
  ``pack`` re-lays it out without new rounding. Its ``z = x_b D_b^T`` GEMMs run on the backend;
* :class:`Int8Embedding` -- a quantized ``nn.Embedding`` (per-row scales, rows dequantized on
  lookup; no backend: a gather needs no int8 arithmetic). Size reports count it with the
  embeddings, not with the linears.
* :class:`Int4Embedding` -- the same with 4-bit codes, two per byte, and an fp16 scale and
  offset per group of ``group_size`` entries of a row (about 4.5 bits per entry at 64).

Each is the ``"int8"`` conversion (:mod:`stackcomp.nn.conversions`) of its float layer, registered
at the end of this module: ``nn.Linear``, ``LowRankLinear``, ``DSLinear``, ``nn.Embedding`` (int8
or int4 per ``Int8Config.embedding_format``).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from stackcomp.errors import StackcompError
from stackcomp.factorize.budget import index_dtype
from stackcomp.kernels.packed import _quantize_symmetric
from stackcomp.kernels.reference import flat_bag_indices
from stackcomp.nn.base import LayerStorage, register_layer
from stackcomp.nn.conversions import Int8Config, register_conversion
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.nn.lowrank import LowRankLinear
from stackcomp.nn.manifest import DeclaredLayer, Field, bias_field, choice, count, dtype_name

__all__ = [
    "BACKENDS",
    "BitsAndBytesInt8",
    "GROUP_FITS",
    "Int8Backend",
    "Int8DSLinear",
    "Int4Embedding",
    "Int8Embedding",
    "Int8Linear",
    "Int8LowRankLinear",
    "QuantizationError",
    "TorchDynamicInt8",
    "dequantize_groups_4bit",
    "dequantize_rows",
    "get_backend",
    "pack_nibbles",
    "quantize_groups_4bit",
    "quantize_rows",
    "unpack_nibbles",
]

log = logging.getLogger("stackcomp.int8")


class QuantizationError(StackcompError):
    """An int8 backend is unknown or cannot run, or a layer cannot be quantized."""


# ----------------------------------------------------------------------------- numbers


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q int8 (rows, cols), scale float32 (rows,))``, w ~= q * scale."""
    q, scale = _quantize_symmetric(w.detach().float(), dim=-1)
    return q, scale.squeeze(-1)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(-1)


_F16_MAX = float(torch.finfo(torch.float16).max)


def _f16_toward(x: torch.Tensor, down: bool) -> torch.Tensor:
    """``x`` (float32) in float16, rounded toward -inf (``down``) or +inf: the stored bound still holds."""
    h = x.half()
    wrong = h.float() > x if down else h.float() < x
    limit = torch.full_like(h, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(h, limit), h)


#: the ways :func:`quantize_groups_4bit` fits a group's scale and offset
GROUP_FITS = ("minmax", "mse")


def quantize_groups_4bit(w: torch.Tensor, group_size: int,
                         fit: str = "minmax") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group of ``group_size`` columns: ``w ~= code * scale + offset``.

    Returns ``(codes uint8 (rows, cols) in [0, 15], scale float16 (rows, groups), offset float16
    (rows, groups))``.

    ``fit="minmax"`` (default): ``offset`` is the group's minimum rounded down to fp16 and ``scale`` its
    range over 15 rounded up, so every entry lies in ``[offset, offset + 15 scale]`` as stored and
    rounds to a code within half a step of it. A constant group is exact (code 0; scale 1 if the
    fp16 offset hits it exactly), so zero rows (padding) stay zero.

    ``fit="mse"``: the scale and offset that minimize the group's squared error
    (:func:`_fit_groups_mse`: clipped ranges searched on a grid, then least-squares refits), so an
    outlier no longer stretches the step of its whole group. Each group keeps whichever of the
    two fits has the lower error as stored, so it is never worse than min-max, and exact groups
    (constant ones, padding rows) stay exact.
    """
    if fit not in GROUP_FITS:
        raise QuantizationError(f"4-bit fit must be one of {', '.join(GROUP_FITS)}, got {fit!r}")
    w = w.detach().float()
    rows, cols = w.shape
    if group_size < 1 or cols % group_size:
        raise QuantizationError(f"4-bit groups of {group_size} do not tile rows of {cols} entries; "
                                "group_size must divide the row length")
    if not torch.isfinite(w).all() or float(w.abs().max()) > _F16_MAX / 2:
        raise QuantizationError(f"4-bit quantization keeps scales and offsets in fp16: entries must be finite "
                                f"and within +-{_F16_MAX / 2:.0f}, got max |w| = {float(w.abs().max())}")
    g = w.reshape(rows, cols // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    offset = _f16_toward(lo, down=True)
    scale = _f16_toward((hi - offset.float()) / 15, down=False)
    for _ in range(4):  # float32 rounding of offset + 15 * scale may still fall short of the max
        short = offset.float() + 15 * scale.float() < hi
        if not short.any():
            break
        scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = _codes_4bit(g, scale, offset)
    if fit == "mse":
        codes, scale, offset = _fit_groups_mse(g, codes, scale, offset)
    return codes.to(torch.uint8).reshape(rows, cols), scale, offset


def _codes_4bit(g: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The nearest codes in [0, 15] (float32, shaped like ``g``) for a ``scale`` and ``offset`` per group."""
    return torch.round((g - offset.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp_(0, 15)


def _group_sq_error(g: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return (codes * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1) - g).square_().sum(-1)


def _fit_groups_mse(g: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    grid: int = 8, max_clip: float = 0.25, refits: int = 4,
                    chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower-error codes, scale and offset for groups ``g`` (rows, groups, size), starting from min-max ones.

    Per group: (1) a ``grid`` x ``grid`` search clips up to ``max_clip`` of the range off each end
    and keeps the clipped range with the least squared error (an outlier is rounded to the end
    code instead of widening every step); (2) ``refits`` rounds alternate the least-squares scale
    and offset for fixed codes with the nearest codes for that scale and offset (each round can
    only lower the error, as in HQQ-style and "mse observer" quantizers). The result is stored in
    fp16 (nearest), re-coded for the stored values, and kept only where its error beats the given
    min-max fit. Rows go in chunks to bound the temporaries.
    """
    out_codes, out_scale, out_offset = codes.clone(), scale.clone(), offset.clone()
    for r0 in range(0, g.shape[0], chunk_rows):
        rows = slice(r0, r0 + chunk_rows)
        x = g[rows]
        lo, hi = x.amin(-1), x.amax(-1)
        span = hi - lo
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(grid):  # (1) clipped ranges
            for j in range(grid):
                c_lo, c_hi = lo + span * (max_clip * i / grid), hi - span * (max_clip * j / grid)
                step = ((c_hi - c_lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
                err = _group_sq_error(x, _codes_4bit(x, step, c_lo), step, c_lo)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
        step = ((best_hi - best_lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        base = best_lo
        q = _codes_4bit(x, step, base)
        for _ in range(refits):  # (2) least squares for fixed codes, then the nearest codes
            qm, xm = q.mean(-1, keepdim=True), x.mean(-1, keepdim=True)
            var = (q - qm).square().sum(-1)
            ls_step = ((q - qm) * (x - xm)).sum(-1) / var.clamp_min(torch.finfo(torch.float32).tiny)
            ok = (var > 0) & (ls_step > 0)
            step = torch.where(ok, ls_step, step)
            base = torch.where(ok, xm.squeeze(-1) - ls_step * qm.squeeze(-1), base)
            q = _codes_4bit(x, step, base)
        s16, o16 = step.half(), base.half()  # stored: nearest fp16, then the codes for what is stored
        usable = (s16 > 0) & torch.isfinite(s16) & torch.isfinite(o16)
        s16 = torch.where(usable, s16, scale[rows])
        o16 = torch.where(usable, o16, offset[rows])
        q = _codes_4bit(x, s16, o16)
        keep = _group_sq_error(x, q, s16, o16) < _group_sq_error(x, codes[rows], scale[rows], offset[rows])
        out_codes[rows] = torch.where(keep.unsqueeze(-1), q, codes[rows])
        out_scale[rows] = torch.where(keep, s16, scale[rows])
        out_offset[rows] = torch.where(keep, o16, offset[rows])
    return out_codes, out_scale, out_offset


def dequantize_groups_4bit(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 ``codes * scale + offset`` with one (scale, offset) per group of the last dimension."""
    groups = scale.shape[-1]
    c = codes.reshape(*codes.shape[:-1], groups, codes.shape[-1] // groups).float()
    out = c * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
    return out.reshape(codes.shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] (..., n) -> (..., ceil(n / 2)) bytes: even entries low nibble, odd high."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (..., ceil(n / 2)) bytes -> (..., n) uint8 codes."""
    both = torch.stack((packed & 15, packed >> 4), dim=-1)
    return both.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :n]


def _unpack_nibbles_float(packed: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`unpack_nibbles` as float32 arithmetic (high = floor(byte / 16), low = byte - 16 high).

    The form ONNX export records: torch.onnx writes a uint8 ``>>`` as int8 ops that ONNX
    Runtime refuses to load (a Concat of uint8 and int8). Same codes, exactly (integers < 256).
    """
    b = packed.float()
    hi = torch.floor(b * 0.0625)
    both = torch.stack((b - 16 * hi, hi), dim=-1)
    return both.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :n]


# ----------------------------------------------------------------------------- backends


class Int8Backend:
    """Runs ``y = x (q * scale)^T + bias`` for int8 ``q`` with per-row ``scale``.

    ``prepare`` turns the stored tensors into whatever the library wants (done once per layer
    and cached by the layer); ``run`` takes fp32 ``x`` (tokens, in) and returns fp32 (tokens, out).
    """

    name: ClassVar[str] = ""

    def available(self, device: torch.device) -> tuple[bool, str]:
        raise NotImplementedError

    def prepare(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def run(self, x: torch.Tensor, handle: Any) -> torch.Tensor:
        raise NotImplementedError


class DequantizedInt8(Int8Backend):
    """Fallback: fp32 GEMM with the dequantized weight (the stored numbers, no int8 arithmetic)."""

    name = "dequantized"

    def available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def prepare(self, q, scale, bias):
        return dequantize_rows(q, scale), None if bias is None else bias.float()

    def run(self, x, handle):
        w, b = handle
        return F.linear(x, w, b)


class TorchDynamicInt8(Int8Backend):
    """PyTorch's dynamic int8 linear (``torch.ops.quantized``; deprecated upstream: keep it here)."""

    name = "torch"

    def available(self, device: torch.device) -> tuple[bool, str]:
        if torch.device(device).type != "cpu":
            return False, "PyTorch's dynamic int8 linear runs on CPU only"
        engines = set(torch.backends.quantized.supported_engines) - {"none"}
        if not engines or not hasattr(torch.ops.quantized, "linear_dynamic"):
            return False, "this PyTorch build has no quantized engine (fbgemm/x86/qnnpack)"
        return True, ""

    def prepare(self, q, scale, bias):
        """The weight packed for the default engine; the oneDNN copy is packed on the first large call
        (:class:`TorchInt8Handle`), so models that never see one (single sentences) pack it never."""
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        b = None if bias is None else bias.float().cpu()
        with warnings.catch_warnings():  # the quantized-tensor deprecation warning, once per layer
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q.cpu(), scale.cpu().double(), zero, 0)
            packed = torch.ops.quantized.linear_prepack(qw, b)
        return TorchInt8Handle(packed, q.shape[0], (qw, b) if onednn_for_large_calls() else None)

    def run(self, x, handle):
        # reduce_range=True: activations use 7 bits, as quantize_dynamic does on x86 (no int16
        # saturation in fbgemm's u8 x s8 pairs on CPUs without VNNI)
        return torch.ops.quantized.linear_dynamic(x, handle.for_rows(x.shape[0]), True)


@dataclass
class TorchInt8Handle:
    """The ``torch`` backend's prepared weight: packed for the default engine, and where
    :func:`onednn_for_large_calls` holds, for oneDNN too, packed from ``onednn_source`` (the
    quantized weight and bias) when a call first reaches :data:`ONEDNN_MIN_WORK`."""

    packed: Any
    out_features: int
    onednn_source: tuple[torch.Tensor, torch.Tensor | None] | None = None
    onednn: Any = None

    def for_rows(self, rows: int) -> Any:
        """The packed weight a call with ``rows`` input rows runs on."""
        if self.onednn_source is None or rows * self.out_features < ONEDNN_MIN_WORK:
            return self.packed
        if self.onednn is None:
            self.onednn = _prepack_with("onednn", *self.onednn_source)
        return self.onednn


#: from this much work (tokens x output features of one call) the ``torch`` backend runs oneDNN's
#: kernel where :func:`onednn_for_large_calls` holds. Both engines compute the same arithmetic
#: (per-tensor 7-bit activations, per-row int8 weights); their outputs agree to fp32 rounding, bar
#: a rare activation rounded one step apart (at most 1.5e-3 of max |y| in bench/int8_engines.py).
#: Through a deep model those steps add up: all-MiniLM-L6-v2's last hidden states differ between the
#: engines by a third of int8's own error against fp32 (bench/int8_engines.py --model); the task
#: metric is checked in docs/results.md. Measured on a Sapphire Rapids core
#: (bench/int8_engines.py, docs/results.md): oneDNN's AMX kernel wins from about 2^17 (e.g. 128
#: tokens x 1,152 outputs: 1.35x on 2 threads; 1,408 x 1,152: 5.4x) and loses below (20 tokens: 0.5-0.6x).
ONEDNN_MIN_WORK = 1 << 17
#: ``STACKCOMP_INT8_ONEDNN=0`` keeps every call on the default engine (fbgemm/x86); ``1`` uses
#: oneDNN for large calls even without AMX (to compare)
ONEDNN_ENV = "STACKCOMP_INT8_ONEDNN"


@functools.cache
def onednn_for_large_calls() -> bool:
    """Whether the ``torch`` backend packs a second, oneDNN copy of each weight for large calls:
    where this CPU has AMX tiles (oneDNN's int8 matrix unit; fbgemm does not use it) and PyTorch
    has the oneDNN quantized engine, unless ``STACKCOMP_INT8_ONEDNN`` says otherwise."""
    env = os.environ.get(ONEDNN_ENV, "").strip()
    if env == "0":
        return False
    if "onednn" not in torch.backends.quantized.supported_engines:
        return False
    if env == "1":
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: absent means unknown, so no
    try:
        return bool(amx and amx())
    except Exception:  # noqa: BLE001 -- a build without the check
        return False


def _prepack_with(engine: str, qw: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """``linear_prepack`` under ``engine`` (the packed weight remembers its engine; the global
    setting is restored at once)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():  # the quantized-tensor deprecation warning
            warnings.simplefilter("ignore")
            return torch.ops.quantized.linear_prepack(qw, bias)
    finally:
        torch.backends.quantized.engine = before


class BitsAndBytesInt8(Int8Backend):
    """bitsandbytes' int8 matmul: row-wise int8 activations x row-wise int8 weights, int32 accumulate."""

    name = "bitsandbytes"

    def _functional(self):
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it logs optional-kernel notes on import
        import bitsandbytes.functional as bnbf

        return bnbf

    def available(self, device: torch.device) -> tuple[bool, str]:
        try:
            self._functional()
        except Exception as e:  # noqa: BLE001 - not installed or broken: say why
            return False, f"bitsandbytes cannot be imported ({type(e).__name__}: {e}); pip install bitsandbytes"
        if torch.device(device).type not in ("cpu", "cuda"):
            return False, f"bitsandbytes int8 runs on cpu and cuda, not {torch.device(device).type}"
        return True, ""

    def prepare(self, q, scale, bias):
        return q.contiguous(), scale.float(), None if bias is None else bias.float()

    def run(self, x, handle):
        bnbf = self._functional()
        q, scale, bias = handle
        xq, xscale, _ = bnbf.int8_vectorwise_quant(x)
        acc = bnbf.int8_linear_matmul(xq, q)  # int32 (tokens, out)
        y = acc.float() * (xscale.float().unsqueeze(1) / 127.0) * scale
        return y if bias is None else y + bias


class IntMMInt8(Int8Backend):
    """PyTorch's int8 GEMM (``torch._int_mm``, oneDNN on CPU: VNNI or AMX where the CPU has them)
    with each row of the input rounded to 8 bits by its own absmax: bitsandbytes' arithmetic
    (``int8_linear_per_row`` is its oracle and ONNX form) without bitsandbytes, and one bit more
    per activation than the ``torch`` backend's 7-bit per-tensor rounding. ``_int_mm`` is
    private API, used only here. CPU only (on CUDA, use bitsandbytes)."""

    name = "intmm"

    def available(self, device: torch.device) -> tuple[bool, str]:
        if torch.device(device).type != "cpu":
            return False, "the intmm backend runs on CPU only (bitsandbytes runs int8 on CUDA)"
        if not hasattr(torch, "_int_mm"):
            return False, "this PyTorch build has no torch._int_mm"
        return True, ""

    def prepare(self, q, scale, bias):
        # _int_mm multiplies (tokens, in) by (in, out): the transposed weight, laid out once
        return q.t().contiguous(), scale.float().cpu(), None if bias is None else bias.float().cpu()

    def run(self, x, handle):
        q_t, scale, bias = handle
        absmax = x.abs().amax(-1, keepdim=True)
        xq = torch.round(x * (127.0 / absmax.clamp(min=1e-30))).to(torch.int8)  # a zero row stays zero
        y = torch._int_mm(xq, q_t).float() * ((absmax / 127.0) * scale)
        return y if bias is None else y + bias


class KernelInt8(Int8Backend):
    """stackcomp's compiled CPU kernel (``linear_forward``: the fused FFN's GEMM alone, ds_cpu_ffn.h)
    with ``intmm``'s arithmetic: each input row rounded to 8 bits by its own absmax, exact int32 sums,
    rescaled by row and column scale. One C++ call does the rounding, the GEMM (AVX-512 VNNI; AMX tiles
    for calls of ``AMX_MIN_TOKENS`` rows or more where the CPU has AMX) and the rescale, where the
    ``intmm`` backend runs each as torch ops. ``STACKCOMP_FFN_KERNEL=vnni`` / ``generic`` hold it to
    those paths as they do the fused FFN. CPU only; exports as ``intmm`` does."""

    name = "kernel"

    def available(self, device: torch.device) -> tuple[bool, str]:
        if torch.device(device).type != "cpu":
            return False, "the kernel backend runs on CPU only (bitsandbytes runs int8 on CUDA)"
        from stackcomp.kernels import ds_cpu

        ext = ds_cpu.get_extension()
        if ext is None or not hasattr(ext, "linear_forward"):
            return False, ("the C++ CPU kernel is not loaded (" + (ds_cpu.build_error() or "disabled or unavailable")
                           + ")" if ext is None else "the loaded C++ kernel predates linear_forward: rebuild it")
        return True, ""

    def prepare(self, q, scale, bias):
        from stackcomp.kernels import ds_cpu
        from stackcomp.kernels.ffn import KernelRoute, linear_operands

        weights = (q.detach().cpu(), scale.detach().float().cpu(), None if bias is None else bias.detach().float().cpu())
        return KernelRoute.for_extension(ds_cpu.get_extension(), linear_operands(*weights),
                                         lambda multiple: linear_operands(*weights, multiple=multiple))

    def run(self, x, handle):
        from stackcomp.kernels.ffn import linear_forward_cpu

        x = x.float().contiguous()  # a layer's slice of its input (a DS block) may be strided
        ops, path = handle.pick(x.shape[0])
        return linear_forward_cpu(x, ops, handle.ext, path=path)


BACKENDS: dict[str, type[Int8Backend]] = {"torch": TorchDynamicInt8, "bitsandbytes": BitsAndBytesInt8,
                                          "intmm": IntMMInt8, "kernel": KernelInt8}
_FALLBACK = DequantizedInt8()
_warned: set[tuple[str, str]] = set()


def get_backend(name: str) -> Int8Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise QuantizationError(f"unknown int8 backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None


def _runner(name: str, device: torch.device) -> Int8Backend:
    """The backend itself where it runs on ``device``, else the dequantized fallback (logged once)."""
    backend = get_backend(name)
    ok, why = backend.available(device)
    if ok:
        return backend
    if (name, str(device)) not in _warned:
        _warned.add((name, str(device)))
        log.warning("int8 backend %r cannot run on %s (%s): computing with the dequantized weights", name, device, why)
    return _FALLBACK


# ----------------------------------------------------------------------------- layers


#: where exported graphs run (ONNX Runtime's CPU provider): int8 layers export the arithmetic their backend has there
_CPU = torch.device("cpu")


def _exporting() -> bool:
    """True while torch.onnx / torch.export / torch.jit.trace record a graph: int8 layers then record
    their backend's arithmetic as ops with an ONNX form (:mod:`stackcomp.onnx_ops`), packed and fused
    layers standard ops. (A compiled kernel call is opaque to a trace: it would be baked in as a constant.)"""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def _version(t: torch.Tensor) -> int:
    """A tensor's in-place update counter (inference tensors have none: they cannot change)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _flat(x: torch.Tensor, in_features: int, who: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.shape[-1] != in_features:
        raise QuantizationError(f"{who}: input has {x.shape[-1]} features, expected {in_features}")
    return x.reshape(-1, in_features).float().contiguous(), tuple(x.shape[:-1])


#: the fields an int8 linear's manifest starts with, and those it ends with
_IN_OUT = (count("in_features"), count("out_features"))
_BIAS_BACKEND = (bias_field(default=True), choice("backend", BACKENDS, default="torch"))


class _Int8Layer(DeclaredLayer):
    """Shared machinery: the backend's prepared weights, cached until a buffer or the device changes."""

    backend: str

    def __init__(self, backend: str):
        super().__init__()
        get_backend(backend)  # unknown names fail here
        self.backend = backend
        self._prepared: tuple[Any, Any] | None = None

    def _stored(self) -> list[torch.Tensor]:
        return [b for b in self.buffers()]

    def _prepared_for(self, device: torch.device, make) -> Any:
        key = (device, tuple((t.data_ptr(), _version(t)) for t in self._stored()))
        if self._prepared is None or self._prepared[0] != key:
            runner = _runner(self.backend, device)
            self._prepared = (key, (runner, make(runner)))
        return self._prepared[1]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_prepared"] = None  # library handles are rebuilt on first use (deepcopy, pickle)
        return state

    def _apply(self, fn, recurse=True):
        self._prepared = None
        return super()._apply(fn, recurse)


@register_layer
class Int8Linear(_Int8Layer):
    """``nn.Linear`` with int8 weights (per-row scales) and an fp32 bias, run by an int8 backend.

    Buffers: ``weight`` int8 (out, in), ``weight_scale`` float32 (out,), ``bias`` float32 (out,).
    """

    layout_version: ClassVar[int] = 1
    manifest_fields = (*_IN_OUT, *_BIAS_BACKEND)
    param_tensors = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, backend: str = "torch"):
        super().__init__(backend)
        if min(in_features, out_features) < 1:
            raise QuantizationError(f"Int8Linear: in/out features must be >= 1, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "torch") -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, backend)
        q, s = quantize_rows(linear.weight)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(s)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():  # the backend's int8 arithmetic as one recordable op (ONNX: MatMulInteger)
            from stackcomp.onnx_ops import int8_linear

            return int8_linear(x, self.weight, self.weight_scale, self.bias, _runner(self.backend, _CPU).name)
        x2, lead = _flat(x, self.in_features, "Int8Linear")
        runner, h = self.prepared(x2.device)
        y = runner.run(x2, h) if x2.shape[0] else x2.new_zeros(0, self.out_features)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def prepared(self, device: torch.device) -> tuple[Int8Backend, Any]:
        """(the backend that runs on ``device``, its prepared weights): what ``forward`` runs, cached
        until a buffer changes (native blocks take the kernel backend's operands from here)."""
        return self._prepared_for(device, lambda r: r.prepare(self.weight, self.weight_scale, self.bias))

    def to_dense(self) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale)


@register_layer
class Int8LowRankLinear(_Int8Layer):
    """``y = (x V^T) U^T + b`` with ``U`` (out, r) and ``V`` (r, in) int8, each with per-row scales."""

    layout_version: ClassVar[int] = 1
    manifest_fields = (*_IN_OUT, count("rank"), *_BIAS_BACKEND)
    param_tensors = ("U", "V", "bias")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, backend: str = "torch"):
        super().__init__(backend)
        if min(in_features, out_features, rank) < 1:
            raise QuantizationError(f"Int8LowRankLinear: in, out, rank must be >= 1, got {in_features}, "
                                    f"{out_features}, {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_buffer("U", torch.zeros(out_features, rank, dtype=torch.int8))
        self.register_buffer("U_scale", torch.ones(out_features))
        self.register_buffer("V", torch.zeros(rank, in_features, dtype=torch.int8))
        self.register_buffer("V_scale", torch.ones(rank))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_lowrank(cls, layer: nn.Module, backend: str = "torch") -> Int8LowRankLinear:
        """From a ``LowRankLinear`` (``U``, ``V``, ``bias``)."""
        new = cls(layer.in_features, layer.out_features, layer.rank, layer.bias is not None, backend)
        for name in ("U", "V"):
            q, s = quantize_rows(getattr(layer, name))
            getattr(new, name).copy_(q)
            getattr(new, f"{name}_scale").copy_(s)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach().float())
        return new.to(layer.U.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            from stackcomp.onnx_ops import int8_linear

            runs = _runner(self.backend, _CPU).name
            h = int8_linear(x, self.V, self.V_scale, None, runs)
            return int8_linear(h, self.U, self.U_scale, self.bias, runs)
        x2, lead = _flat(x, self.in_features, "Int8LowRankLinear")
        runner, (hv, hu) = self._prepared_for(x2.device, lambda r: (r.prepare(self.V, self.V_scale, None),
                                                                   r.prepare(self.U, self.U_scale, self.bias)))
        if not x2.shape[0]:
            return x.new_zeros(*lead, self.out_features)
        y = runner.run(runner.run(x2, hv).contiguous(), hu)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def to_dense(self) -> torch.Tensor:
        return dequantize_rows(self.U, self.U_scale) @ dequantize_rows(self.V, self.V_scale)


@register_layer
class Int8DSLinear(_Int8Layer):
    """A DS layer (see ``DSLinear``) with int8 factors.

    Buffers: ``dictionary`` int8 (nb, K, B) with ``dictionary_scale`` (nb, K), one per atom;
    ``values`` int8 (nb, out, s) with ``values_scale`` (out,), one per output row across all
    blocks (it factors out of the row's whole sum); ``indices`` (nb, out, s) uint8/int16; ``bias``
    float32. Forward: ``z_b = x_b D_b^T`` on the int8 backend (each block's dictionary is an
    int8 weight with per-row scales), then one ``embedding_bag`` gathers z with the dequantized
    values. ``pack`` turns it into the packed int8 kernel layout with the same int8 numbers.
    """

    layout_version: ClassVar[int] = 1
    manifest_fields = (
        *_IN_OUT, count("block"), count("atoms"), count("nnz"), *_BIAS_BACKEND,
        Field("index_dtype", lambda v: isinstance(v, str), "a dtype name", default=None,
              dump=lambda m: dtype_name(m.indices.dtype), init=False, repr=False),
    )
    param_tensors = ("dictionary", "values", "bias")

    def __init__(self, in_features: int, out_features: int, block: int, atoms: int, nnz: int, bias: bool = True,
                 backend: str = "torch"):
        super().__init__(backend)
        if min(in_features, out_features, block, atoms, nnz) < 1 or in_features % block or nnz > atoms:
            raise QuantizationError(f"Int8DSLinear: need positive sizes, block | in_features and nnz <= atoms; got "
                                    f"in={in_features} out={out_features} B={block} K={atoms} s={nnz}")
        self.in_features, self.out_features = in_features, out_features
        self.block, self.atoms, self.nnz = block, atoms, nnz
        self.num_blocks = nb = in_features // block
        self.register_buffer("dictionary", torch.zeros(nb, atoms, block, dtype=torch.int8))
        self.register_buffer("dictionary_scale", torch.ones(nb, atoms))
        self.register_buffer("values", torch.zeros(nb, out_features, nnz, dtype=torch.int8))
        self.register_buffer("values_scale", torch.ones(out_features))
        self.register_buffer("indices", torch.zeros(nb, out_features, nnz, dtype=index_dtype(atoms)))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_ds(cls, ds: nn.Module, backend: str = "torch") -> Int8DSLinear:
        """Quantize a ``DSLinear`` (its current factors; a layer still in STF is refused)."""
        if getattr(ds, "stf", False):
            raise QuantizationError("Int8DSLinear.from_ds: the DS layer is still in STF training; call freeze() first")
        layer = cls(ds.in_features, ds.out_features, ds.block, ds.atoms, ds.nnz, ds.bias is not None, backend)
        with torch.no_grad():
            dq, dsc = _quantize_symmetric(ds.dictionary.detach().float(), dim=2)
            vq, vsc = _quantize_symmetric(ds.values.detach().float(), dim=(0, 2))
            layer.dictionary.copy_(dq)
            layer.dictionary_scale.copy_(dsc.squeeze(-1))
            layer.values.copy_(vq)
            layer.values_scale.copy_(vsc.reshape(-1))
            layer.indices.copy_(ds.indices.to(layer.indices.dtype))
            if ds.bias is not None:
                layer.bias.copy_(ds.bias.detach().float())
        return layer.to(ds.dictionary.device)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Canonical float32 (dictionary, values, indices, bias): what ``pack_ds`` takes."""
        d = self.dictionary.float() * self.dictionary_scale.unsqueeze(-1)
        v = self.values.float() * self.values_scale.view(1, -1, 1)
        return d, v, self.indices, self.bias

    def _make(self, runner: Int8Backend):
        blocks = [runner.prepare(self.dictionary[b], self.dictionary_scale[b], None) for b in range(self.num_blocks)]
        v = self.values.float() * self.values_scale.view(1, -1, 1)
        bag_w = v.permute(1, 0, 2).reshape(self.out_features, -1).contiguous()
        return blocks, flat_bag_indices(self.indices, self.atoms), bag_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():  # standard ops: rebuild W by a gather of dictionary rows, then one GEMM
            d, v, i, b = self.dequantized()
            nb, K, B, out, s = self.num_blocks, self.atoms, self.block, self.out_features, self.nnz
            rows = torch.index_select(d.reshape(nb * K, B), 0,
                                      (i.long() + (torch.arange(nb, device=i.device) * K).view(nb, 1, 1)).reshape(-1))
            w = (rows.reshape(nb, out, s, B) * v.unsqueeze(-1)).sum(2).permute(1, 0, 2).reshape(out, nb * B)
            return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        x2, lead = _flat(x, self.in_features, "Int8DSLinear")
        runner, (blocks, bag_idx, bag_w) = self._prepared_for(x2.device, self._make)
        T, B = x2.shape[0], self.block
        if not T:
            return x.new_zeros(*lead, self.out_features)
        z = torch.cat([runner.run(x2[:, b * B:(b + 1) * B].contiguous(), h) for b, h in enumerate(blocks)], 1)
        y = F.embedding_bag(bag_idx, z.t().contiguous(), per_sample_weights=bag_w, mode="sum").t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def to_dense(self) -> torch.Tensor:
        from stackcomp.kernels.reference import ds_rebuild_weight

        d, v, i, _ = self.dequantized()
        return ds_rebuild_weight(d, v, i)


#: the fields an embedding table's manifest starts with
_TABLE = (count("num_embeddings"), count("embedding_dim"),
          Field("padding_idx", lambda v: v is None or (type(v) is int and v >= 0), "null or an integer >= 0",
                default=None))


def _table_padding_idx(layer: str, num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> int | None:
    """Check an embedding table's shape; return ``padding_idx`` in [0, num_embeddings) (or None)."""
    if min(num_embeddings, embedding_dim) < 1:
        raise QuantizationError(f"{layer}: num_embeddings and embedding_dim must be >= 1, got "
                                f"{num_embeddings}, {embedding_dim}")
    if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
        raise QuantizationError(f"{layer}: padding_idx {padding_idx} is outside [0, {num_embeddings})")
    return padding_idx % num_embeddings if padding_idx is not None else None


@register_layer
class Int8Embedding(DeclaredLayer):
    """``nn.Embedding`` with an int8 table and one fp32 scale per row: a quarter of the bytes.

    Buffers: ``weight`` int8 (num_embeddings, embedding_dim), ``weight_scale`` float32
    (num_embeddings,). A lookup gathers the int8 rows and their scales and dequantizes only
    those rows, so the fp32 table never exists. Inference only (no gradients reach the table).
    """

    layout_version: ClassVar[int] = 1
    replaces: ClassVar[str] = "embedding"
    manifest_fields = _TABLE
    param_tensors = ("weight",)

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        padding_idx = _table_padding_idx("Int8Embedding", num_embeddings, embedding_dim, padding_idx)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        if emb.max_norm is not None:  # nn.Embedding renormalizes rows on lookup: not a fixed table
            raise QuantizationError(f"Int8Embedding: embeddings with max_norm={emb.max_norm} rewrite their rows "
                                    "on lookup; they have no int8 form")
        layer = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        q, s = quantize_rows(emb.weight)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(s)
        return layer.to(emb.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)  # int8 rows
        return rows.to(self.weight_scale.dtype) * F.embedding(ids, self.weight_scale.unsqueeze(-1))

    def to_dense(self) -> torch.Tensor:
        """The dequantized table (num_embeddings, embedding_dim)."""
        return dequantize_rows(self.weight, self.weight_scale)

    def dense_params(self) -> int:
        return self.num_embeddings * self.embedding_dim


@register_layer
class Int4Embedding(DeclaredLayer):
    """``nn.Embedding`` with 4-bit codes: 4.5 bits per entry at group 64 (int8: 8.1 on 384-wide rows).

    Each row is cut into groups of ``group_size`` entries; a group stores ``code * scale +
    offset`` with codes in [0, 15] and an fp16 scale and offset (:func:`quantize_groups_4bit`).
    Asymmetric, because on MiniLM's word table it has lower error at the same bytes: relative
    Frobenius error 0.090 at group 64 with min-max ranges (fp16 scale + offset, 0.5 bit per entry
    of overhead) against 0.094-0.097 for symmetric codes at group 32 (fp16 scale only, the same
    overhead); a group's values are not centred on zero, and the offset spends all 16 codes on its
    range. The least-squares fit (``fit="mse"``) lowers it to 0.081, the same bytes.

    ``group_size`` larger than the row means one group per row; otherwise it must divide
    ``embedding_dim`` (a :class:`QuantizationError` says so): groups never straddle rows, and
    ragged last groups would need a second layout for a case no model here has.

    Buffers: ``weight`` uint8 (num_embeddings, ceil(embedding_dim / 2)), two codes a byte
    (:func:`pack_nibbles`); ``weight_scale`` and ``weight_offset`` float16 (num_embeddings,
    embedding_dim / group_size). A lookup gathers only the packed rows of the ids and their
    scales, unpacks and dequantizes those rows. Inference only. ``padding_idx`` is kept as
    ``nn.Embedding`` keeps it (a zero padding row stays exactly zero). On CPU the compiled kernel
    (``int4_embedding``) does the lookup in one pass per id, with the same numbers; ``kernel = False``
    makes this module use torch ops (A/B runs), as exporting and other devices do.
    """

    layout_version: ClassVar[int] = 1
    replaces: ClassVar[str] = "embedding"
    manifest_fields = (*_TABLE, count("group_size", default=64))
    #: use the compiled lookup where it can run (a plain attribute, not saved)
    kernel: bool = True
    param_tensors = ("weight",)

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 group_size: int = 64):
        super().__init__()
        padding_idx = _table_padding_idx("Int4Embedding", num_embeddings, embedding_dim, padding_idx)
        if type(group_size) is not int or group_size < 1:
            raise QuantizationError(f"Int4Embedding: group_size must be an integer >= 1, got {group_size!r}")
        group_size = min(group_size, embedding_dim)
        if embedding_dim % group_size:
            raise QuantizationError(f"Int4Embedding: group_size {group_size} does not divide embedding_dim "
                                    f"{embedding_dim}; pick a divisor (e.g. 32, 64, 128 for 384) or a size >= "
                                    f"{embedding_dim} for one group per row")
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.padding_idx = padding_idx
        groups = embedding_dim // group_size
        self.register_buffer("weight", torch.zeros(num_embeddings, (embedding_dim + 1) // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, groups, dtype=torch.float16))
        self.register_buffer("weight_offset", torch.zeros(num_embeddings, groups, dtype=torch.float16))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int = 64, fit: str = "minmax") -> Int4Embedding:
        """The 4-bit form of ``emb``; ``fit`` picks how groups get their scale and offset (:func:`quantize_groups_4bit`)."""
        if emb.max_norm is not None:  # nn.Embedding renormalizes rows on lookup: not a fixed table
            raise QuantizationError(f"Int4Embedding: embeddings with max_norm={emb.max_norm} rewrite their rows "
                                    "on lookup; they have no 4-bit form")
        layer = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, group_size)
        codes, scale, offset = quantize_groups_4bit(emb.weight, layer.group_size, fit)
        layer.weight.copy_(pack_nibbles(codes))
        layer.weight_scale.copy_(scale)
        layer.weight_offset.copy_(offset)
        return layer.to(emb.weight.device)

    def codes(self) -> torch.Tensor:
        """The unpacked codes, uint8 (num_embeddings, embedding_dim) in [0, 15]."""
        return unpack_nibbles(self.weight, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kernel and ids.device.type == "cpu" and not _exporting():
            from stackcomp.kernels import ds_cpu

            ext = ds_cpu.extension_with("int4_embedding", "Int4Embedding")
            if ext is not None:  # the same numbers in one pass per id (ds_cpu_embedding.h)
                return ext.int4_embedding(self.weight, self.weight_scale, self.weight_offset, ids.long(),
                                          self.embedding_dim)
        rows = F.embedding(ids, self.weight)  # only the looked-up rows
        unpack = _unpack_nibbles_float if _exporting() else unpack_nibbles  # ONNX: no uint8 shifts
        codes = unpack(rows, self.embedding_dim)
        return dequantize_groups_4bit(codes, F.embedding(ids, self.weight_scale), F.embedding(ids, self.weight_offset))

    def to_dense(self) -> torch.Tensor:
        """The dequantized table (num_embeddings, embedding_dim), float32."""
        return dequantize_groups_4bit(self.codes(), self.weight_scale, self.weight_offset)

    def dense_params(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def storage(self) -> LayerStorage:
        """Exact bytes of the packed codes, scales and offsets; params count the table's entries, not bytes."""
        st = super().storage()
        return LayerStorage(params=self.dense_params(), bytes=st.bytes, dense_params=st.dense_params,
                            dense_bytes=st.dense_bytes)


# ----------------------------------------------------------------------------- int8 conversions


@register_conversion("int8", nn.Linear)
def _linear_to_int8(linear: nn.Linear, config: Int8Config) -> Int8Linear:
    return Int8Linear.from_linear(linear, config.backend)


@register_conversion("int8", LowRankLinear)
def _lowrank_to_int8(layer: LowRankLinear, config: Int8Config) -> Int8LowRankLinear:
    return Int8LowRankLinear.from_lowrank(layer, config.backend)


@register_conversion("int8", DSLinear)
def _ds_to_int8(layer: DSLinear, config: Int8Config) -> Int8DSLinear:
    return Int8DSLinear.from_ds(layer, config.backend)


@register_conversion("int8", nn.Embedding)
def _embedding_to_int8(emb: nn.Embedding, config: Int8Config) -> Int8Embedding | Int4Embedding:
    if config.embedding_format == "int8":
        return Int8Embedding.from_embedding(emb)
    return Int4Embedding.from_embedding(emb, config.embedding_group_size, config.embedding_fit)
