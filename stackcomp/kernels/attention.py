"""Attention over packed variable-length sequences: the C++ kernel's caller and its torch oracle.

A batch packed without padding stores its sequences' tokens back to back, ``(tokens, heads, head_dim)``,
with ``cu_seqlens`` (int64, batch + 1) marking where each sequence starts, as flash-attention's varlen
functions and transformers' packed-sequence kwargs (``cu_seq_lens_q``) do. Each sequence attends to
itself only, at its own length: no pad position is computed. The kernel is ``varlen_attention`` of the
DS CPU extension (``ds_cpu_attention.h``: AVX-512 where built, a portable loop elsewhere);
:func:`varlen_attention_reference` computes the same with ``scaled_dot_product_attention``, one
sequence at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stackcomp.kernels.reference import KernelError


def cu_seqlens_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(batch + 1,)`` int64 starts of each row's real tokens once packed, from a ``(batch, length)``
    padding mask (true or 1 at real tokens)."""
    lengths = mask.sum(dim=1, dtype=torch.int64)
    return F.pad(lengths.cumsum(0), (1, 0))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise KernelError(f"varlen attention: q, k, v must be (tokens, heads, head_dim) of one shape, got "
                          f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0]:
        raise KernelError(f"varlen attention: cu_seqlens must run from 0 to the {q.shape[0]} tokens, got "
                          f"{cu_seqlens.tolist()}")


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """The oracle: ``scaled_dot_product_attention`` on each sequence alone; ``(tokens, heads, head_dim)``."""
    _check(q, k, v, cu_seqlens)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    starts = cu_seqlens.tolist()
    for a, b in zip(starts[:-1], starts[1:]):
        if b > a:
            seq = [t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, heads, length, head_dim)
            out[a:b] = F.scaled_dot_product_attention(*seq, scale=scale)[0].transpose(0, 1)
    return out


def _extension():
    from stackcomp.kernels import ds_cpu

    return ds_cpu.extension_with("varlen_attention", "varlen attention")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                     path: str = "best") -> torch.Tensor:
    """softmax(scale Q K^T) V per packed sequence and head: ``(tokens, heads, head_dim)``.

    fp32 CPU tensors whose head dim is contiguous (any token and head strides, e.g. slices of one fused
    QKV output) run the C++ kernel (``path="generic"``: its portable loop); anything else, or no kernel,
    runs :func:`varlen_attention_reference`.
    """
    ext = None
    if (q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == v.dtype == q.dtype
            and all(t.stride(-1) == 1 for t in (q, k, v)) and not (torch.is_grad_enabled() and q.requires_grad)):
        ext = _extension()
    if ext is None:
        return varlen_attention_reference(q, k, v, cu_seqlens, scale)
    _check(q, k, v, cu_seqlens)
    return ext.varlen_attention(q, k, v, cu_seqlens.to(device="cpu", dtype=torch.int64), float(scale),
                                path == "generic")
