"""Block-wise low rank, with Monarch (Dao et al., ICML 2022) as a named special case.

Block-wise low rank cuts ``W`` (out x in) into a ``p x q`` grid of blocks of ``d = out/p`` rows
and ``c = in/q`` columns and gives each block its own rank-``r`` factorization
``W_ab ~= U[a, b] @ V[a, b]`` with ``U`` of shape (p, q, d, r) and ``V`` (p, q, r, c). Stored
numbers: ``p*q*r*(d + c) = r*(q*out + p*in)``, the same number of MACs per token, computed as
two batched GEMMs (:func:`blocklr_matmul`).

Monarch is the same thing with a permuted output. Dao et al. write ``M = P L P^T R`` with
``R`` block-diagonal (q blocks, each c -> p*r), a fixed permutation, ``L`` block-diagonal
(p blocks, each q*r -> d) and a final permutation that interleaves the ``p`` output groups.
Expanding the product, entry ``(o, (b, j))`` with ``o = i*p + a`` is
``sum_rho L[a][i, (b, rho)] R[b][(rho, a), j]``: block ``(a, b)`` of the matrix whose rows are
taken with stride ``p`` (rows ``a, a+p, a+2p, ...``) has rank ``r``. So Monarch is block-wise
low rank on the row-interleaved matrix (``interleave_out=True``), rank 1 in the original paper,
and its projection (best fit) is one SVD per block -- exactly Eckart-Young per block.
:func:`monarch_blockdiag` turns ``(U, V)`` into the paper's two block-diagonal factors and
:func:`monarch_multiply` runs the paper's permute/bmm/permute/bmm form, which the tests check
against the block form.
"""

from __future__ import annotations

import math

import torch

from stackcomp.factorize.lowrank import (
    FactorizeError,
    _check_split,
    check_matrix,
    split_singular_values,
    truncated_svd,
)

__all__ = [
    "blocklr_factors",
    "blocklr_blocks",
    "blocklr_to_dense",
    "blocklr_matmul",
    "blocklr_params",
    "blocklr_rank_for_ratio",
    "monarch_factors",
    "monarch_blockdiag",
    "monarch_multiply",
]


def _check_grid(out_f: int, in_f: int, grid: tuple[int, int], name: str) -> tuple[int, int, int, int]:
    try:
        p, q = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise FactorizeError(f"{name}: grid must be a pair (p, q) of block counts, got {grid!r}") from None
    if p < 1 or q < 1 or out_f % p or in_f % q:
        raise FactorizeError(
            f"{name}: grid {p}x{q} does not divide a {out_f}x{in_f} weight (need out % p == 0 and in % q == 0)"
        )
    return p, q, out_f // p, in_f // q


def blocklr_blocks(W: torch.Tensor, grid: tuple[int, int], interleave_out: bool = False) -> torch.Tensor:
    """The blocks of ``W`` as a (p, q, d, c) tensor (a view when possible).

    Block ``(a, b)`` holds rows ``a*d .. a*d+d-1`` (or, with ``interleave_out``, rows
    ``a, a+p, a+2p, ...``) and columns ``b*c .. b*c+c-1``.
    """
    out_f, in_f = W.shape
    p, q, d, c = _check_grid(out_f, in_f, grid, "weight")
    if interleave_out:
        return W.reshape(d, p, q, c).permute(1, 2, 0, 3)
    return W.reshape(p, d, q, c).permute(0, 2, 1, 3)


def blocklr_factors(
    W: torch.Tensor,
    grid: tuple[int, int],
    rank: int,
    *,
    interleave_out: bool = False,
    split: str = "sqrt",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best block-wise rank-``rank`` fit: one truncated SVD per block (Eckart-Young per block).

    Returns ``U`` (p, q, d, rank) and ``V`` (p, q, rank, c) in ``W``'s dtype; the squared error
    is the sum over blocks of their discarded squared singular values.
    """
    check_matrix(W, name)
    out_f, in_f = W.shape
    p, q, d, c = _check_grid(out_f, in_f, grid, name)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(d, c):
        raise FactorizeError(f"{name}: block rank must be an integer in [1, min({d}, {c})], got {rank!r}")
    _check_split(split, name)
    blocks = blocklr_blocks(W.to(compute_dtype), (p, q), interleave_out)
    Ub, Sb, Vb = truncated_svd(blocks, rank)
    U, V = split_singular_values(Ub, Sb, Vb, split)
    return U.to(W.dtype).contiguous(), V.to(W.dtype).contiguous()


def _factor_shapes(U: torch.Tensor, V: torch.Tensor) -> tuple[int, int, int, int, int]:
    if U.dim() != 4 or V.dim() != 4 or U.shape[:2] != V.shape[:2] or U.shape[3] != V.shape[2]:
        raise FactorizeError(
            f"block factors must be U (p, q, d, r) and V (p, q, r, c); got {tuple(U.shape)} and {tuple(V.shape)}"
        )
    p, q, d, r = U.shape
    return p, q, d, r, V.shape[3]


def blocklr_to_dense(U: torch.Tensor, V: torch.Tensor, interleave_out: bool = False) -> torch.Tensor:
    """The (out x in) matrix the block factors stand for."""
    p, q, d, r, c = _factor_shapes(U, V)
    blocks = U @ V  # (p, q, d, c)
    if interleave_out:
        return blocks.permute(2, 0, 1, 3).reshape(d * p, q * c)
    return blocks.permute(0, 2, 1, 3).reshape(p * d, q * c)


def blocklr_matmul(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, interleave_out: bool = False) -> torch.Tensor:
    """``x @ blocklr_to_dense(U, V).T`` without forming the dense matrix: two batched GEMMs.

    ``x`` is (..., in); the first GEMM is batched over the q input blocks, the second over the p
    output blocks.
    """
    p, q, d, r, c = _factor_shapes(U, V)
    lead = x.shape[:-1]
    xt = x.reshape(-1, q, c)
    z = torch.einsum("tbc,abrc->tabr", xt, V)  # (T, p, q, r)
    y = torch.einsum("tabr,abdr->tad", z, U)  # (T, p, d)
    if interleave_out:
        y = y.transpose(1, 2)
    return y.reshape(*lead, p * d)


def blocklr_params(out_features: int, in_features: int, grid: tuple[int, int], rank: int) -> int:
    """Stored numbers of the factors (no bias): ``rank * (q*out + p*in)``."""
    p, q, _, _ = _check_grid(out_features, in_features, grid, "weight")
    return rank * (q * out_features + p * in_features)


def blocklr_rank_for_ratio(
    out_features: int,
    in_features: int,
    grid: tuple[int, int],
    ratio: float,
    value_bits: int = 32,
    bias: bool = True,
    *,
    name: str = "weight",
) -> int:
    """Largest block rank whose layer is at least ``ratio`` times smaller than the dense fp32 layer.

    Same accounting as :func:`stackcomp.factorize.lowrank.rank_for_ratio`: dense
    ``(out*in + out)*4`` bytes against ``(blocklr_params + out) * value_bits/8``.
    """
    p, q, d, c = _check_grid(out_features, in_features, grid, name)
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise FactorizeError(f"{name}: ratio must be a positive number, got {ratio!r}")
    b = out_features if bias else 0
    budget = (out_features * in_features + b) * 4 / ratio * 8 / value_bits
    per_rank = q * out_features + p * in_features
    rank = math.floor((budget - b) / per_rank + 1e-9)
    if rank < 1:
        raise FactorizeError(f"{name}: grid {p}x{q} cannot reach {ratio:g}x on a {out_features}x{in_features} layer")
    if rank > min(d, c):
        raise FactorizeError(
            f"{name}: {ratio:g}x needs block rank {rank} > min(block shape) = {min(d, c)}; keep the layer dense"
        )
    return rank


# ----------------------------------------------------------------------------- Monarch


def monarch_factors(
    W: torch.Tensor,
    nblocks: int | tuple[int, int],
    rank: int = 1,
    *,
    split: str = "sqrt",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection onto Monarch matrices (Dao et al.): per-block rank-``rank`` SVD of the
    row-interleaved matrix.

    ``nblocks`` is the number of diagonal blocks of both factors, or ``(p, q)``: p blocks in the
    output-side factor ``L`` (output groups, rows ``a, a+p, ...``) and q in the input-side factor
    ``R`` (contiguous input blocks). Returns ``(U, V)`` in the block layout of
    :func:`blocklr_factors` with ``interleave_out=True``; :func:`monarch_blockdiag` converts.
    For n x n with p = q = sqrt(n) and rank 1 this stores ``2 n sqrt(n)`` numbers.
    """
    p, q = (nblocks, nblocks) if isinstance(nblocks, int) else nblocks
    return blocklr_factors(W, (p, q), rank, interleave_out=True, split=split, compute_dtype=compute_dtype,
                           name=name)


def monarch_blockdiag(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's two block-diagonal factors from Monarch block factors ``(U, V)``.

    Returns ``w1`` (q, r*p, c): block ``b`` of ``R`` maps input block ``b`` to its ``(rho, a)``
    outputs; and ``w2`` (p, d, q*r): block ``a`` of ``L`` maps the ``(b, rho)`` values routed to
    group ``a`` to the group's ``d`` outputs (the layout of Dao et al.'s
    ``blockdiag_butterfly_multiply_einsum_rank``).
    """
    p, q, d, r, c = _factor_shapes(U, V)
    w1 = V.permute(1, 2, 0, 3).reshape(q, r * p, c)  # [b, (rho, a), j] = V[a, b, rho, j]
    w2 = U.permute(0, 2, 1, 3).reshape(p, d, q * r)  # [a, i, (b, rho)] = U[a, b, i, rho]
    return w1.contiguous(), w2.contiguous()


def monarch_multiply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``y = P L P^T R x`` for (..., in) inputs: bmm with R, permute, bmm with L, interleave."""
    q, rp, c = w1.shape
    p, d, qr = w2.shape
    r = rp // p
    if rp != r * p or qr != q * r:
        raise FactorizeError(f"monarch factors do not fit: w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    lead = x.shape[:-1]
    xt = x.reshape(-1, q, c).transpose(0, 1)  # (q, T, c)
    z = torch.bmm(xt, w1.transpose(1, 2))  # (q, T, r*p): R, one block per input block
    T = z.shape[1]
    z = z.reshape(q, T, r, p).permute(3, 1, 0, 2).reshape(p, T, q * r)  # P^T: route (b, rho) to group a
    u = torch.bmm(z, w2.transpose(1, 2))  # (p, T, d): L, one block per output group
    return u.permute(1, 2, 0).reshape(*lead, d * p)  # P: output o = i*p + a
