"""The fused int8 FFN ``y = W2 act(W1 x + b1) + b2``: its kernel operands, its torch oracle, and a caller.

The C++ kernel is ``ffn_forward`` of the DS CPU extension (``ds_cpu_ffn.h``, built with it, so every
ISA variant has it: AVX-512 VNNI where compiled in, AMX tiles on top where the CPU has them, a portable
loop elsewhere; all give the same integer sums). Its second GEMM alone is ``linear_forward``, the
``kernel`` int8 backend (:func:`linear_operands`, :func:`linear_forward_cpu`). Its numbers, which
:func:`fused_ffn_reference` computes with torch ops:

* each row of x is quantized on its own: ``q = clamp(round(x * (127 / amax_row)), -127, 127)``, scale
  ``amax_row / 127`` (8 bits, no reduce_range; a zero row gets scale 0);
* the int8 weights have one symmetric scale per output channel (:class:`~stackcomp.nn.quantized.Int8Linear`'s layout);
* ``h = act(acc1 * (sx_row * ws1) + b1)``, act = GELU (erf) or its tanh form, in fp32;
* h is quantized per row the same way, and ``y = acc2 * (sh_row * ws2) + b2``.

The oracle and the kernel agree up to float rounding: the integer sums are exact in both; the fp32
epilogues may differ in their last bit (the kernel fuses multiply and add, its erf/exp are polynomials
within 1.5e-7 of exact), which can move a hidden value that sits on a rounding boundary of the second
quantization by one 8-bit step. :func:`fused_ffn_reference` returns the scaled hidden values so a
test can bound exactly that (``tests/test_fused_ffn.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from stackcomp.kernels.reference import KernelError

#: activations the kernel computes, by the names the module and the oracle use, and their kernel codes
ACTS = {"gelu": 0, "gelu_tanh": 1}
#: the kernel's paths (ds_cpu_ffn.h FfnPath): best available, AVX-512 VNNI without AMX, portable loop
PATHS = {"best": 0, "vnni": 1, "generic": 2}
#: input padding of the AMX path's operands (``ffn_operands(multiple=...)``): one tile row is 64 codes
AMX_MULTIPLE = 64
#: calls with at least this many tokens take the kernel's AMX path where the CPU has AMX (the fused FFN and
#: the ``kernel`` int8 backend). It runs blocks of 32 rows, one per thread, so a short call leaves threads idle
#: that the VNNI path's channel split uses; ``bench/fused_ffn.py --crossover`` measured AMX ahead from 16
#: tokens on 1 and 2 threads (docs/results.md)
AMX_MIN_TOKENS = 16
#: ``STACKCOMP_FFN_KERNEL=generic`` runs the kernel's portable path even where the VNNI one is built; ``vnni``
#: never takes the AMX path (A/B runs, tests)
ENV = "STACKCOMP_FFN_KERNEL"


class FFNOperands(NamedTuple):
    """What :func:`ffn_operands` makes: the first ten are ``ffn_forward``'s weight arguments in order."""

    w1p: torch.Tensor
    cor1: torch.Tensor
    ws1: torch.Tensor
    b1: torch.Tensor
    w2p: torch.Tensor
    cor2: torch.Tensor
    ws2: torch.Tensor
    b2: torch.Tensor
    hidden: int
    out: int
    in_features: int
    multiple: int

    def kernel_args(self) -> tuple:
        return tuple(self)[:10]

    def fits_amx(self) -> bool:
        return self.in_features % AMX_MULTIPLE == 0 and self.ws1.numel() % AMX_MULTIPLE == 0


def _pack_weight(q: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int8 (N, K) -> (N16, K4, 16, 4) int8 with K zero padded to ``k_pad``, and 128 * row sums (N16*16) int32."""
    n, k = q.shape
    n16, k4 = -(-n // 16), k_pad // 4
    w = torch.zeros(n16 * 16, k4 * 4, dtype=torch.int8)
    w[:n, :k] = q
    cor = (128 * w.to(torch.int32).sum(1)).to(torch.int32)
    wp = w.view(n16, 16, k4, 4).permute(0, 2, 1, 3).contiguous()
    return wp, cor, n16


def _padded(v: torch.Tensor | None, n: int, size: int) -> torch.Tensor:
    out = torch.zeros(size)
    if v is not None:
        out[:n] = v.detach().float().cpu()
    return out


def ffn_operands(w1: torch.Tensor, w1_scale: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 w2_scale: torch.Tensor, b2: torch.Tensor | None, multiple: int = 4) -> FFNOperands:
    """The kernel's weight operands (layouts in ds_cpu_ffn.h) from int8 weights and per-channel scales.
    Made once per layer (the module caches them).

    ``multiple``: both GEMMs' inputs (x's features, the hidden size) zero padded to a multiple of it: 4 for the
    VNNI and portable paths, 64 for the AMX path (:data:`AMX_MULTIPLE`; a tile holds 64 input codes), which
    every path can run but which costs the others the padded channels."""
    if multiple not in (4, AMX_MULTIPLE):
        raise KernelError(f"fused FFN: multiple must be 4 or {AMX_MULTIPLE}, got {multiple}")
    hid, inp = w1.shape
    out, hid2 = w2.shape
    if hid2 != hid:
        raise KernelError(f"fused FFN: W1 has {hid} outputs, W2 takes {hid2} inputs")
    w1_out = -(-hid // multiple) * multiple  # hidden channels made, zero padded: GEMM2's padded input
    w1p, cor1, n16a = _pack_weight(_zero_rows(w1.detach().cpu(), w1_out), -(-inp // multiple) * multiple)
    w2p, cor2, n16b = _pack_weight(w2.detach().cpu(), n16a * 16)
    return FFNOperands(w1p, cor1, _padded(w1_scale, hid, n16a * 16), _padded(b1, hid, n16a * 16),
                       w2p, cor2, _padded(w2_scale, out, n16b * 16), _padded(b2, out, n16b * 16), hid, out, inp, multiple)


def _zero_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """w with zero rows appended up to ``rows`` (padded hidden channels: weight, scale and bias 0, so GELU(0) = 0)."""
    return w if w.shape[0] >= rows else torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])


class LinearOperands(NamedTuple):
    """One int8 linear in the kernel's layout (:func:`linear_operands`); the first four and ``out`` are
    ``linear_forward``'s weight arguments."""

    wp: torch.Tensor
    cor: torch.Tensor
    ws: torch.Tensor
    b: torch.Tensor
    out: int
    in_features: int
    multiple: int

    def fits_amx(self) -> bool:
        return self.in_features % AMX_MULTIPLE == 0


def linear_operands(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, multiple: int = 4) -> LinearOperands:
    """An int8 weight (out, in) with per-row scales, packed as the fused FFN's weights are; the input
    zero padded to a multiple of ``multiple`` (4, or :data:`AMX_MULTIPLE` for the AMX path)."""
    if multiple not in (4, AMX_MULTIPLE):
        raise KernelError(f"int8 linear: multiple must be 4 or {AMX_MULTIPLE}, got {multiple}")
    out, inp = q.shape
    wp, cor, n16 = _pack_weight(q.detach().cpu(), -(-inp // multiple) * multiple)
    return LinearOperands(wp, cor, _padded(scale, out, n16 * 16), _padded(bias, out, n16 * 16), out, inp, multiple)


def linear_forward_cpu(x: torch.Tensor, ops: LinearOperands, ext, path: str = "best") -> torch.Tensor:
    """``y = x W^T + b`` with x's rows quantized to 8 bits each (the FFN kernel's second GEMM alone); x
    (tokens, in) float32 contiguous on CPU. ``path`` as :func:`ffn_forward_cpu`'s."""
    if x.shape[-1] != ops.in_features:
        raise KernelError(f"int8 linear: input has {x.shape[-1]} features, the layer takes {ops.in_features}")
    return ext.linear_forward(x, ops.wp, ops.cor, ops.ws, ops.b, ops.out, PATHS[path])


def linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear_forward_cpu`'s arithmetic in torch ops (exact integer sums in float64)."""
    qx, sx, _ = quantize_rows_act(x.float())
    y = (qx.double() @ q.double().t()).float() * (sx.unsqueeze(-1) * scale.float())
    return y if bias is None else y + bias.float()


def ffn_kernel(ext) -> bool:
    """Whether the loaded extension has the fused FFN (a build older than ds_cpu_ffn.h has not)."""
    return ext is not None and hasattr(ext, "ffn_forward")


@dataclass
class KernelRoute:
    """Which path of the kernel a layer's call takes, and with which operands (the fused FFN's and the
    ``kernel`` int8 backend's): ``small_path`` ("vnni", the portable loop in a build without VNNI, or
    "generic") for every call, except that calls of at least :data:`AMX_MIN_TOKENS` rows take the AMX
    path where ``amx``. The AMX path needs inputs padded to :data:`AMX_MULTIPLE`: where the layer's sizes
    are not multiples of it already, ``remake(AMX_MULTIPLE)`` packs that second copy on the first long call."""

    ext: Any
    ops: Any  # FFNOperands or LinearOperands
    remake: Callable[[int], Any]
    small_path: str = "vnni"
    amx: bool = False
    amx_ops: Any = None

    @classmethod
    def for_extension(cls, ext, ops, remake: Callable[[int], Any]) -> KernelRoute:
        """The route :data:`ENV` and this process's CPU allow."""
        env = os.environ.get(ENV, "").strip().lower()
        return cls(ext, ops, remake, "generic" if env == "generic" else "vnni",
                   amx=env not in ("generic", "vnni") and ffn_has_amx(ext))

    def pick(self, rows: int) -> tuple[Any, str]:
        """(operands, path) for a call of ``rows`` rows."""
        if not (self.amx and rows >= AMX_MIN_TOKENS):
            return self.ops, self.small_path
        if self.amx_ops is None:
            self.amx_ops = self.ops if self.ops.fits_amx() else self.remake(AMX_MULTIPLE)
        return self.amx_ops, "best"


def ffn_has_amx(ext) -> bool:
    """Whether the extension can take its AMX path in this process (an older build has no such check)."""
    return ext is not None and hasattr(ext, "ffn_has_amx") and bool(ext.ffn_has_amx())


def ffn_forward_cpu(x: torch.Tensor, ops: FFNOperands, act: str, ext, path: str = "best") -> torch.Tensor:
    """Run the kernel: x (..., in) any float dtype on CPU -> (..., out) in x's dtype (fp32 inside).

    ``path`` (:data:`PATHS`): "best" takes AMX where the CPU has it and ``ops`` were made with
    ``multiple=64``, else AVX-512 VNNI where compiled in, else the portable loop; "vnni" never AMX;
    "generic" the portable loop (tests, A/B). All give the same integer sums."""
    if path not in PATHS:
        raise KernelError(f"fused FFN: path must be one of {sorted(PATHS)}, got {path!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] != ops.in_features:
        raise KernelError(f"fused FFN: input has {x.shape[-1]} features, the layer takes {ops.in_features}")
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = ext.ffn_forward(x2, *ops.kernel_args(), ACTS[act], PATHS[path])
    return y.reshape(*lead, y.shape[-1]).to(x.dtype)


def quantize_rows_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row symmetric 8-bit codes as the kernel makes them: (codes float32 in [-127, 127], scale (rows,),
    x * (127 / amax) before rounding). A zero row gets codes 0 and scale 0."""
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax.clamp_min(torch.finfo(torch.float32).tiny),
                      torch.zeros_like(amax))
    u = x * inv.unsqueeze(-1)
    return torch.round(u).clamp_(-127, 127), amax / 127, u


def gelu(h: torch.Tensor, act: str) -> torch.Tensor:
    if act not in ACTS:
        raise KernelError(f"fused FFN: activation must be one of {sorted(ACTS)}, got {act!r}")
    return F.gelu(h, approximate="tanh" if act == "gelu_tanh" else "none")


def fused_ffn_reference(x: torch.Tensor, w1: torch.Tensor, w1_scale: torch.Tensor, b1: torch.Tensor | None,
                        w2: torch.Tensor, w2_scale: torch.Tensor, b2: torch.Tensor | None, act: str = "gelu",
                        exact: bool = True, return_hidden: bool = False):
    """The kernel's arithmetic in torch ops; x (..., in) -> y (..., out) float32.

    ``exact``: the integer sums in float64 (exact); False: in float32 (standard ops for export; sums
    above 2^24 round). ``return_hidden``: also the hidden rows scaled by 127 / amax before rounding
    (tests use them to find the values the kernel's rounding may push across a boundary).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    mm = torch.float64 if exact else torch.float32
    qx, sx, _ = quantize_rows_act(x2)
    acc1 = (qx.to(mm) @ w1.to(mm).t()).float()
    h = acc1 * (sx.unsqueeze(-1) * w1_scale.float()) + (b1.float() if b1 is not None else 0.0)
    h = gelu(h, act)
    qh, sh, u = quantize_rows_act(h)
    acc2 = (qh.to(mm) @ w2.to(mm).t()).float()
    y = acc2 * (sh.unsqueeze(-1) * w2_scale.float()) + (b2.float() if b2 is not None else 0.0)
    y = y.reshape(*lead, y.shape[-1])
    return (y, u, sh) if return_hidden else y
