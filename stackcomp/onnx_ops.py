"""What int8 layers record while being exported: custom torch ops with an integer ONNX form.

An int8 layer's backend quantizes its activations at run time, and ONNX has no op that does it
the way the backend does; a graph with the dequantized fp32 weights differs from torch by the
activation rounding (about 0.08 of max |logit| after ``int8``). So while exporting, each int8
GEMM records one of these ops, which

* computes in eager torch exactly what its backend computes (the test oracle, and what a
  ``torch.export`` program runs),
* translates to standard ONNX ops (quantize by ``Round``/``Clip``/``Cast``, ``MatMulInteger``, rescale),
  through :func:`translations` (``torch.onnx.export(custom_translation_table=...)``).

Schemes, one op each:

* ``int8_linear_per_tensor``: PyTorch's dynamic int8 linear (fbgemm, ``reduce_range``): the whole
  input quantized to 7-bit unsigned with one scale and zero point from its min and max
  (widened to hold 0), chosen as ``ChooseQuantizationParams`` does (in double precision, scale at
  least 6.1e-5), each entry rounded as fbgemm does: ``fma(x, 1/s, zp)``, one float rounding,
  reproduced in double (``QuantizeLinear``'s ``x / s`` flips a rounding now and then: 0.2-0.3% of
  max |y| on inputs of 1,000+ tokens); ``y = s_x * s_w[row] * sum((x_q - zp) * w_q) + bias``.
* ``int8_linear_per_row``: bitsandbytes' int8 matmul (and the ``intmm`` backend's): each row of the input to int8 by its own
  absmax (``round(x * 127 / absmax)``); ``y = acc * absmax / 127 * s_w[row] + bias``.

Weights stay int8 in the graph (``q`` (out, in) with per-row ``scale``), so the file is as
small as the torch layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["int8_linear", "translations"]

#: fbgemm's smallest activation scale (``SMALL_SCALE_THRESHOLD`` in PyTorch's QuantUtils.h)
_SMALL_SCALE = 6.1e-5
#: smallest row absmax divided into 127 (a zero row then quantizes to zeros, not 0 * inf)
_ROW_FLOOR = 1e-30
#: the 7-bit range PyTorch's dynamic linear uses on x86 (``reduce_range=True``)
_QMAX_U7 = 127


def _per_tensor_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero point float32) of ``ChooseQuantizationParams(min, max, 0, 255, reduce_range)``."""
    lo = x.min().clamp(max=0).double()
    hi = x.max().clamp(min=0).double()
    scale = (hi - lo) / _QMAX_U7
    zp = torch.round(-lo / scale.clamp(min=torch.finfo(torch.float64).tiny)).clamp(0, _QMAX_U7)
    return scale.float().clamp(min=_SMALL_SCALE), zp.float()


@torch.library.custom_op("stackcomp::int8_linear_per_tensor", mutates_args=())
def int8_linear_per_tensor(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    s, zp = _per_tensor_params(x)
    # fbgemm rounds fma(x, 1/s, zp) (one float rounding): the exact product and sum in double, then float
    xq = torch.clamp(torch.round((x.double() * (1.0 / s).double() + zp.double()).float()), 0, 255) - zp
    acc = torch.matmul(xq.double(), q.double().t()).float()  # exact integers
    y = acc * (s * scale)
    return y if bias is None else y + bias


@torch.library.custom_op("stackcomp::int8_linear_per_row", mutates_args=())
def int8_linear_per_row(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    absmax = x.abs().amax(-1, keepdim=True)
    xq = torch.round(x * (127.0 / absmax.clamp(min=_ROW_FLOOR)))  # a zero row stays zero
    acc = torch.matmul(xq.double(), q.double().t()).float()
    y = acc * (absmax / 127.0) * scale
    return y if bias is None else y + bias


@int8_linear_per_tensor.register_fake
@int8_linear_per_row.register_fake
def _(x, q, scale, bias):
    return x.new_empty(*x.shape[:-1], q.shape[0])


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                runs: str) -> torch.Tensor:
    """``y = x (q * scale)^T + bias`` as the int8 backend named ``runs`` computes it, as a recordable op
    (``"torch"``, ``"bitsandbytes"``, ``"intmm"`` or ``"kernel"``; anything else: the dequantized GEMM, the layers' fallback)."""
    x32 = x.float()
    b = None if bias is None else bias.float()
    if runs == "torch":
        y = torch.ops.stackcomp.int8_linear_per_tensor(x32, q, scale, b)
    elif runs in ("bitsandbytes", "intmm", "kernel"):  # the same per-row arithmetic
        y = torch.ops.stackcomp.int8_linear_per_row(x32, q, scale, b)
    else:
        y = F.linear(x32, q.float() * scale.unsqueeze(-1), b)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- ONNX forms


def translations() -> dict:
    """``{torch op: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``."""
    import numpy as np
    from onnx import TensorProto, numpy_helper
    from onnxscript import opset18 as op

    def f64(v: float):
        return op.Constant(value=numpy_helper.from_array(np.array(v, dtype=np.float64)))

    def per_tensor(x, q, scale, bias=None):
        zero = op.Constant(value_float=0.0)
        lo = op.Cast(op.Min(op.ReduceMin(x, keepdims=0), zero), to=TensorProto.DOUBLE)
        hi = op.Cast(op.Max(op.ReduceMax(x, keepdims=0), zero), to=TensorProto.DOUBLE)
        s64 = op.Div(op.Sub(hi, lo), f64(_QMAX_U7))
        zp = op.Clip(op.Round(op.Div(op.Neg(lo), op.Max(s64, f64(np.finfo(np.float64).tiny)))),
                     f64(0.0), f64(_QMAX_U7))
        s = op.Max(op.Cast(s64, to=TensorProto.FLOAT), op.Constant(value_float=_SMALL_SCALE))
        zp8 = op.Cast(zp, to=TensorProto.UINT8)
        inv = op.Cast(op.Div(op.Constant(value_float=1.0), s), to=TensorProto.DOUBLE)
        fma = op.Cast(op.Add(op.Mul(op.Cast(x, to=TensorProto.DOUBLE), inv), zp), to=TensorProto.FLOAT)
        xq = op.Cast(op.Clip(op.Round(fma), op.Constant(value_float=0.0), op.Constant(value_float=255.0)),
                     to=TensorProto.UINT8)
        acc = op.MatMulInteger(xq, op.Transpose(q, perm=[1, 0]), zp8)
        y = op.Mul(op.Cast(acc, to=TensorProto.FLOAT), op.Mul(s, scale))
        return y if bias is None else op.Add(y, bias)

    def per_row(x, q, scale, bias=None):
        absmax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        inv = op.Div(op.Constant(value_float=127.0),
                     op.Max(absmax, op.Constant(value_float=_ROW_FLOOR)))
        xq = op.Cast(op.Round(op.Mul(x, inv)), to=TensorProto.INT8)
        acc = op.MatMulInteger(xq, op.Transpose(q, perm=[1, 0]))
        y = op.Mul(op.Mul(op.Cast(acc, to=TensorProto.FLOAT), op.Div(absmax, op.Constant(value_float=127.0))), scale)
        return y if bias is None else op.Add(y, bias)

    return {torch.ops.stackcomp.int8_linear_per_tensor.default: per_tensor,
            torch.ops.stackcomp.int8_linear_per_row.default: per_row}

