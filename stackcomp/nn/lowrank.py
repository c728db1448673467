"""Layers for the factorizers DSFormer is compared against.

* :class:`LowRankLinear`        -- ``W = U V`` (SVD, FWSVD, DRONE);
* :class:`BlockLowRankLinear`   -- a p x q grid of rank-r blocks; Monarch is the case with an
  interleaved output order (see :mod:`stackcomp.factorize.blocklr`);
* :class:`SparseLowRankLinear`  -- LoSparse ``W = U V + S`` with ``S`` row-sparse;
* :class:`DoubleSparseLinear`   -- DSF ``W = P Q`` with both factors sparse (CSR).

Every layer stores exactly the tensors it reports in :meth:`storage` (values at their dtype,
indices at the narrowest integer type that holds them), so the reported bytes are the bytes in
the safetensors file. ``manifest()`` holds the shapes needed to rebuild an empty layer; the
values come from the state dict. Manifest, repr and storage follow from each class's
``manifest_fields`` and ``param_tensors`` (:mod:`stackcomp.nn.manifest`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from stackcomp.errors import StackcompError
from stackcomp.factorize.budget import index_dtype
from stackcomp.nn.base import register_layer
from stackcomp.nn.manifest import DeclaredLayer, Field, bias_field, count, dtype_field, flag

__all__ = [
    "LayerInputError",
    "index_dtype",
    "LowRankLinear",
    "BlockLowRankLinear",
    "SparseLowRankLinear",
    "DoubleSparseLinear",
]


class LayerInputError(StackcompError):
    """Factors or arguments given to a compressed layer do not fit together."""


# ----------------------------------------------------------------------------- helpers


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format))


def _check_bias(bias: torch.Tensor | None, out_features: int, who: str) -> None:
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise LayerInputError(f"{who}: bias has shape {tuple(bias.shape)}, expected ({out_features},)")


def _set_params(layer: nn.Module, dtype: torch.dtype, **tensors: torch.Tensor | None) -> None:
    """Copy factors into ``layer`` as parameters of ``dtype`` (``None`` ones, e.g. no bias, are skipped)."""
    for name, t in tensors.items():
        if t is not None:
            setattr(layer, name, _as_param(t.to(dtype)))


#: the fields every layer here starts its manifest with
_IN_OUT = (count("in_features"), count("out_features"))


# ----------------------------------------------------------------------------- low rank


@register_layer
class LowRankLinear(DeclaredLayer):
    """``y = x V^T U^T + b``: two thin GEMMs, ``rank * (in + out)`` MACs per token.

    Parameters ``U`` (out x rank), ``V`` (rank x in), ``bias`` (out) or none.
    """

    layout_version: ClassVar[int] = 1
    manifest_fields = (*_IN_OUT, count("rank"), bias_field(), dtype_field("U"))
    param_tensors = ("U", "V", "bias")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if min(in_features, out_features, rank) < 1:
            raise LayerInputError(
                "LowRankLinear: in_features, out_features and rank must be >= 1, "
                f"got {in_features}, {out_features}, {rank}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.V = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """A layer computing ``x (U V)^T + bias``; the tensors are copied."""
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0]:
            raise LayerInputError(
                f"LowRankLinear.from_factors: U {tuple(U.shape)} and V {tuple(V.shape)} must be (out x r) and (r x in)"
            )
        _check_bias(bias, U.shape[0], "LowRankLinear.from_factors")
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias=bias is not None, dtype=U.dtype)
        _set_params(layer, U.dtype, U=U, V=V, bias=bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, split: str = "sqrt") -> LowRankLinear:
        """Truncated-SVD replacement of ``linear`` (the pass may use FWSVD/DRONE factors instead)."""
        from stackcomp.factorize.lowrank import svd_factors

        U, V = svd_factors(linear.weight.detach(), rank, split=split)
        return cls.from_factors(U, V, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.U @ self.V


# ----------------------------------------------------------------------------- block low rank


@register_layer
class BlockLowRankLinear(DeclaredLayer):
    """A p x q grid of rank-r blocks: ``U`` (p, q, d, r), ``V`` (p, q, r, c), two batched GEMMs.

    With ``interleave_out=True`` output group ``a`` holds rows ``a, a+p, a+2p, ...``: that is a
    Monarch matrix (:func:`stackcomp.factorize.blocklr.monarch_factors`), stored in the same
    numbers as its two block-diagonal factors.
    """

    layout_version: ClassVar[int] = 1
    manifest_fields = (
        *_IN_OUT,
        Field("grid", lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(type(g) is int and g > 0 for g in v),
              "[p, q] positive integers", load=tuple, dump=lambda m: list(m.grid)),
        count("rank"), flag("interleave_out"), bias_field(), dtype_field("U"),
    )
    param_tensors = ("U", "V", "bias")

    def __init__(self, in_features: int, out_features: int, grid: tuple[int, int], rank: int, bias: bool = True,
                 interleave_out: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        p, q = (int(g) for g in grid)
        if min(p, q, rank) < 1 or out_features % p or in_features % q:
            raise LayerInputError(
                f"BlockLowRankLinear: grid {p}x{q} with rank {rank} does not fit a {out_features}x{in_features} layer"
            )
        self.in_features, self.out_features = in_features, out_features
        self.grid, self.rank, self.interleave_out = (p, q), rank, bool(interleave_out)
        d, c = out_features // p, in_features // q
        self.U = nn.Parameter(torch.zeros(p, q, d, rank, dtype=dtype))
        self.V = nn.Parameter(torch.zeros(p, q, rank, c, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                     interleave_out: bool = False) -> BlockLowRankLinear:
        if U.dim() != 4 or V.dim() != 4 or U.shape[:2] != V.shape[:2] or U.shape[3] != V.shape[2]:
            raise LayerInputError(
                f"BlockLowRankLinear.from_factors: U {tuple(U.shape)} and V {tuple(V.shape)} must be "
                "(p, q, d, r) and (p, q, r, c)"
            )
        p, q, d, r = U.shape
        c = V.shape[3]
        _check_bias(bias, p * d, "BlockLowRankLinear.from_factors")
        layer = cls(q * c, p * d, (p, q), r, bias=bias is not None, interleave_out=interleave_out, dtype=U.dtype)
        _set_params(layer, U.dtype, U=U, V=V, bias=bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid: tuple[int, int], rank: int, interleave_out: bool = False,
                    split: str = "sqrt") -> BlockLowRankLinear:
        """Best block-wise fit of ``linear`` (per-block truncated SVD); Monarch with ``interleave_out``."""
        from stackcomp.factorize.blocklr import blocklr_factors

        U, V = blocklr_factors(linear.weight.detach(), grid, rank, interleave_out=interleave_out, split=split)
        return cls.from_factors(U, V, None if linear.bias is None else linear.bias.detach(), interleave_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from stackcomp.factorize.blocklr import blocklr_matmul

        y = blocklr_matmul(x, self.U, self.V, self.interleave_out)
        return y + self.bias if self.bias is not None else y

    def to_dense(self) -> torch.Tensor:
        from stackcomp.factorize.blocklr import blocklr_to_dense

        return blocklr_to_dense(self.U, self.V, self.interleave_out)


# ----------------------------------------------------------------------------- LoSparse


def _row_selection(keep: torch.Tensor | None, out_features: int, who: str) -> torch.Tensor:
    """Sorted row indices from a boolean mask (out,) or an index tensor."""
    if keep.dtype == torch.bool:
        if keep.shape != (out_features,):
            raise LayerInputError(f"{who}: boolean row mask has shape {tuple(keep.shape)}, expected ({out_features},)")
        return torch.nonzero(keep.cpu()).flatten()
    idx = torch.unique(keep.cpu().long().flatten())  # sorted, distinct
    if idx.numel() and (idx[0] < 0 or idx[-1] >= out_features):
        raise LayerInputError(f"{who}: row indices must lie in [0, {out_features}), got {idx[0]}..{idx[-1]}")
    return idx


@register_layer
class SparseLowRankLinear(DeclaredLayer):
    """LoSparse: ``W = U V + S`` with ``S`` stored as its kept rows only.

    ``sparse`` (n_rows x in) holds rows ``row_index`` (sorted, narrowest integer dtype) of ``S``;
    every other row of ``S`` is zero. Forward: ``y = x V^T U^T + b``, then ``x sparse^T`` is added
    into the kept output columns -- three dense GEMMs and an index add, no sparse kernel.

    Training keeps all rows (``n_rows == out``) and zeroes pruned ones with :meth:`zero_rows_`;
    :meth:`prune_rows` then returns the compact layer for inference and export.
    """

    layout_version: ClassVar[int] = 1
    manifest_fields = (*_IN_OUT, count("rank"), count("n_rows", minimum=0), bias_field(), dtype_field("U"))
    param_tensors = ("U", "V", "sparse", "bias")

    def __init__(self, in_features: int, out_features: int, rank: int, n_rows: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if min(in_features, out_features, rank) < 1 or not 0 <= n_rows <= out_features:
            raise LayerInputError(
                f"SparseLowRankLinear: need in, out, rank >= 1 and 0 <= n_rows <= out; got {in_features}, "
                f"{out_features}, {rank}, {n_rows}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.V = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))
        self.sparse = nn.Parameter(torch.zeros(n_rows, in_features, dtype=dtype))
        self.register_buffer("row_index", torch.arange(n_rows).to(index_dtype(out_features)))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @property
    def n_rows(self) -> int:
        return self.sparse.shape[0]

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor, bias: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None) -> SparseLowRankLinear:
        """``U`` (out x r), ``V`` (r x in), dense ``S`` (out x in); keep the rows ``rows`` of ``S``
        (boolean mask or indices; all rows if omitted)."""
        who = "SparseLowRankLinear.from_factors"
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0] or tuple(S.shape) != (U.shape[0], V.shape[1]):
            raise LayerInputError(
                f"{who}: U {tuple(U.shape)}, V {tuple(V.shape)}, S {tuple(S.shape)} must be "
                "(out x r), (r x in), (out x in)"
            )
        out_f, in_f = S.shape
        _check_bias(bias, out_f, who)
        idx = torch.arange(out_f) if rows is None else _row_selection(rows, out_f, who)
        layer = cls(in_f, out_f, U.shape[1], idx.numel(), bias=bias is not None, dtype=U.dtype)
        _set_params(layer, U.dtype, U=U, V=V, sparse=S.detach()[idx.to(S.device)], bias=bias)
        layer.row_index = idx.to(device=U.device, dtype=index_dtype(out_f))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> SparseLowRankLinear:
        """LoSparse initialisation: SVD low-rank part, dense residual ``S`` (all rows kept)."""
        from stackcomp.factorize.losparse import losparse_init

        U, V, S = losparse_init(linear.weight.detach(), rank)
        return cls.from_factors(U, V, S, None if linear.bias is None else linear.bias.detach())

    @torch.no_grad()
    def zero_rows_(self, keep: torch.Tensor) -> None:
        """Training-time masking: zero the stored rows of ``S`` whose output row is not kept.

        ``keep`` is a boolean mask over all ``out`` rows (as :func:`select_rows` returns)."""
        if keep.dtype != torch.bool or keep.shape != (self.out_features,):
            raise LayerInputError(f"zero_rows_: keep must be a boolean mask of shape ({self.out_features},)")
        drop = ~keep.to(self.sparse.device)[self.row_index.long()]
        self.sparse[drop] = 0

    def prune_rows(self, keep: torch.Tensor | None = None) -> SparseLowRankLinear:
        """A new compact layer storing only the kept rows of ``S``.

        ``keep``: boolean mask over the ``out`` rows, or row indices; rows not stored now stay
        absent. ``None`` keeps the stored rows that hold any nonzero.
        """
        stored = self.row_index.long().cpu()
        if keep is None:
            sel = (self.sparse.detach() != 0).any(dim=1).cpu()
        else:
            wanted = torch.zeros(self.out_features, dtype=torch.bool)
            wanted[_row_selection(keep, self.out_features, "prune_rows")] = True
            sel = wanted[stored]
        S = torch.zeros(self.out_features, self.in_features, dtype=self.sparse.dtype, device=self.sparse.device)
        S[stored.to(S.device)] = self.sparse.detach()
        return type(self).from_factors(self.U.detach(), self.V.detach(), S,
                                       None if self.bias is None else self.bias.detach(), rows=stored[sel])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.V), self.U, self.bias)
        if self.n_rows:
            y = y.index_add(-1, self.row_index.long(), F.linear(x, self.sparse))
        return y

    def to_dense(self) -> torch.Tensor:
        return (self.U @ self.V).index_add(0, self.row_index.long(), self.sparse)


# ----------------------------------------------------------------------------- DSF


def _csr(M: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, crow, col)`` of a dense matrix's nonzeros, row-major; narrow index dtypes."""
    mask = M != 0
    rows, cols = torch.nonzero(mask, as_tuple=True)
    nnz = rows.numel()
    ptr_dtype = torch.int32 if nnz < 1 << 31 else torch.int64
    crow = torch.zeros(M.shape[0] + 1, dtype=torch.int64, device=M.device)
    crow[1:] = torch.cumsum(mask.sum(1), 0)
    return M[rows, cols], crow.to(ptr_dtype), cols.to(index_dtype(n_cols))


def _csr_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Dense matrix from CSR, differentiable in ``values``."""
    counts = (crow[1:] - crow[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(shape[0], device=values.device), counts)
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_put((rows, col.long()), values)


@register_layer
class DoubleSparseLinear(DeclaredLayer):
    """DSF: ``W = P Q`` with ``P`` (out x k) and ``Q`` (k x in) both sparse, stored as CSR.

    Each factor is ``*_values`` (its nonzeros in row-major order, a trainable parameter),
    ``*_col`` (column of each value, narrowest integer dtype that holds the column count) and
    ``*_crow`` (row pointers, int32). Training updates only the stored values, i.e. the support is
    frozen -- the same as masked-dense training with a fixed mask, without storing the dense
    matrices. Forward scatters each factor to dense and runs two GEMMs, ``y = (x Q^T) P^T + b``;
    sparse kernels belong to ``stackcomp.kernels``. ``storage()`` counts values, column indices and
    row pointers at their stored widths.
    """

    layout_version: ClassVar[int] = 1
    manifest_fields = (*_IN_OUT, count("inner"), count("nnz_p", minimum=0), count("nnz_q", minimum=0), bias_field(),
                       dtype_field("p_values"))
    param_tensors = ("p_values", "q_values", "bias")

    def __init__(self, in_features: int, out_features: int, inner: int, nnz_p: int, nnz_q: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if min(in_features, out_features, inner) < 1 or not (0 <= nnz_p <= out_features * inner) or not (
                0 <= nnz_q <= inner * in_features):
            raise LayerInputError(
                f"DoubleSparseLinear: shapes ({out_features}x{inner})({inner}x{in_features}) cannot hold "
                f"nnz_p={nnz_p}, nnz_q={nnz_q}"
            )
        self.in_features, self.out_features, self.inner = in_features, out_features, inner
        self.p_values = nn.Parameter(torch.zeros(nnz_p, dtype=dtype))
        self.q_values = nn.Parameter(torch.zeros(nnz_q, dtype=dtype))
        ptr = lambda nnz: torch.int32 if nnz < 1 << 31 else torch.int64  # noqa: E731
        self.register_buffer("p_crow", torch.zeros(out_features + 1, dtype=ptr(nnz_p)))
        self.register_buffer("p_col", torch.zeros(nnz_p, dtype=index_dtype(inner)))
        self.register_buffer("q_crow", torch.zeros(inner + 1, dtype=ptr(nnz_q)))
        self.register_buffer("q_col", torch.zeros(nnz_q, dtype=index_dtype(in_features)))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, P: torch.Tensor, Q: torch.Tensor, bias: torch.Tensor | None = None) -> DoubleSparseLinear:
        """From dense factors holding exact zeros (e.g. ``dsf_factors(...).P, .Q``)."""
        if P.dim() != 2 or Q.dim() != 2 or P.shape[1] != Q.shape[0]:
            raise LayerInputError(
                f"DoubleSparseLinear.from_factors: P {tuple(P.shape)} and Q {tuple(Q.shape)} must be "
                "(out x k), (k x in)"
            )
        out_f, k = P.shape
        in_f = Q.shape[1]
        _check_bias(bias, out_f, "DoubleSparseLinear.from_factors")
        pv, pc, pcol = _csr(P.detach(), k)
        qv, qc, qcol = _csr(Q.detach().to(P.dtype), in_f)
        layer = cls(in_f, out_f, k, pv.numel(), qv.numel(), bias=bias is not None, dtype=P.dtype)
        _set_params(layer, P.dtype, p_values=pv, q_values=qv, bias=bias)
        layer.p_crow, layer.p_col, layer.q_crow, layer.q_col = pc, pcol, qc, qcol
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, density: float, X: torch.Tensor | None = None,
                    **dsf_kwargs: Any) -> DoubleSparseLinear:
        """DSF of ``linear`` at ``density`` (kept fraction of out*in), data-aware when ``X`` is given."""
        from stackcomp.factorize.dsf import dsf_factors

        res = dsf_factors(linear.weight.detach(), density=density, X=X, **dsf_kwargs)
        return cls.from_factors(res.P, res.Q, None if linear.bias is None else linear.bias.detach())

    @property
    def nnz_p(self) -> int:
        return self.p_values.numel()

    @property
    def nnz_q(self) -> int:
        return self.q_values.numel()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(P, Q)``, differentiable in the stored values."""
        P = _csr_dense(self.p_values, self.p_crow, self.p_col, (self.out_features, self.inner))
        Q = _csr_dense(self.q_values, self.q_crow, self.q_col, (self.inner, self.in_features))
        return P, Q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P, Q = self.factors()
        return F.linear(F.linear(x, Q), P, self.bias)

    def to_dense(self) -> torch.Tensor:
        P, Q = self.factors()
        return P @ Q
