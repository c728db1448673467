"""The fused int8 FFN ``y = W2 act(W1 x + b1) + b2``: its kernel operands, its torch oracle, and a caller.

The C++ kernel is ``ffn_forward`` of the DS CPU extension (``ds_cpu_ffn.h``, built with it, so every
ISA variant has it: AVX-512 VNNI where compiled in, a portable loop elsewhere). Its numbers, which
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

import torch
import torch.nn.functional as F

from stackcomp.kernels.reference import KernelError

#: activations the kernel computes, by the names the module and the oracle use, and their kernel codes
ACTS = {"gelu": 0, "gelu_tanh": 1}


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
                 w2_scale: torch.Tensor, b2: torch.Tensor | None) -> tuple:
    """The kernel's weight operands (layouts in ds_cpu_ffn.h) from int8 weights and per-channel scales:
    ``(w1p, cor1, ws1, b1, w2p, cor2, ws2, b2, hidden, out)``. Made once per layer (the module caches them)."""
    hid, inp = w1.shape
    out, hid2 = w2.shape
    if hid2 != hid:
        raise KernelError(f"fused FFN: W1 has {hid} outputs, W2 takes {hid2} inputs")
    w1p, cor1, n16a = _pack_weight(w1.detach().cpu(), -(-inp // 4) * 4)
    w2p, cor2, n16b = _pack_weight(w2.detach().cpu(), n16a * 16)
    return (w1p, cor1, _padded(w1_scale, hid, n16a * 16), _padded(b1, hid, n16a * 16),
            w2p, cor2, _padded(w2_scale, out, n16b * 16), _padded(b2, out, n16b * 16), hid, out)


def ffn_kernel(ext) -> bool:
    """Whether the loaded extension has the fused FFN (a build older than ds_cpu_ffn.h has not)."""
    return ext is not None and hasattr(ext, "ffn_forward")


def ffn_forward_cpu(x: torch.Tensor, ops: tuple, act: str, ext, force_generic: bool = False) -> torch.Tensor:
    """Run the kernel: x (..., in) any float dtype on CPU -> (..., out) in x's dtype (fp32 inside).
    ``force_generic`` runs the portable path even where the VNNI one is compiled in (tests, A/B)."""
    inp = ops[0].shape[1] * 4
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > inp or x2.shape[-1] <= inp - 4:
        raise KernelError(f"fused FFN: input has {x.shape[-1]} features, the layer takes {inp - 3}..{inp}")
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = ext.ffn_forward(x2, *ops, ACTS[act], force_generic)
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
