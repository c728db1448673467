"""Low-rank factorizers DSFormer is compared against: truncated SVD, FWSVD and DRONE.

Each returns two factors ``U`` (out x r) and ``V`` (r x in) with ``W ~= U @ V`` for a weight
``W`` stored as ``nn.Linear`` stores it (out x in). They differ only in the error they minimise:

* :func:`svd_factors`   -- ``||W - UV||_F``                      (Eckart-Young);
* :func:`fwsvd_factors` -- ``||diag(d) (W - UV)||_F``, ``d_i = sqrt(F_i + eps)``, with ``F_i``
  the summed Fisher information of output row ``i`` (Hsu et al., ICLR 2022);
* :func:`drone_factors` -- ``||(W - UV) X^T||_F`` for calibration activations ``X`` (n x in)
  (Chen et al., NeurIPS 2021, "DRONE").

All three are exact minimisers (closed forms through one SVD), computed in float64 by default
and returned in ``W``'s dtype. How the singular values are split between the two factors is
chosen by ``split``; it never changes the product:

* ``"sqrt"`` (default): ``U = U_r sqrt(S_r)``, ``V = sqrt(S_r) V_r^T``. Both factors get the same
  scale, which is what gradient training of the factors wants (LoSparse initialises this way);
* ``"left"``: ``U = U_r S_r``, ``V = V_r^T`` (orthonormal rows);
* ``"right"``: ``U = U_r`` (orthonormal columns), ``V = S_r V_r^T``.

For FWSVD and DRONE the row/column weighting is undone inside the factor it belongs to
(``diag(d)^-1`` on the left of ``U``, ``S_X^-1 U_X^T`` on the right of ``V``), so "orthonormal"
above holds before that undoing only.

This module is pure numerics on tensors; it imports no model, layer or pass code.
"""

from __future__ import annotations

import math

import torch

from stackcomp.errors import FactorizeError, NumericalError


__all__ = [
    "FactorizeError",
    "SPLITS",
    "svd_factors",
    "fwsvd_factors",
    "drone_factors",
    "lowrank_bytes",
    "rank_for_ratio",
]

SPLITS = ("sqrt", "left", "right")


# ----------------------------------------------------------------------------- checks


def check_matrix(W: torch.Tensor, name: str, what: str = "weight") -> None:
    """Refuse anything but a finite 2-D floating tensor; the message names the layer."""
    if not isinstance(W, torch.Tensor):
        raise FactorizeError(f"{name}: {what} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise FactorizeError(f"{name}: {what} must be a 2-D matrix, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise FactorizeError(f"{name}: {what} must be floating point, got {W.dtype}")
    if W.numel() and not torch.isfinite(W).all():
        raise NumericalError(f"{name}: {what} holds NaN or Inf")


def check_rank(rank: int, out_features: int, in_features: int, name: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise FactorizeError(f"{name}: rank must be an integer, got {rank!r}")
    top = min(out_features, in_features)
    if not 1 <= rank <= top:
        raise FactorizeError(
            f"{name}: rank must be between 1 and min(out, in) = {top} for a {out_features}x{in_features} weight, "
            f"got {rank}"
        )
    return rank


def _check_split(split: str, name: str) -> None:
    if split not in SPLITS:
        raise FactorizeError(f"{name}: split must be one of {SPLITS}, got {split!r}")


def split_singular_values(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold singular values ``S`` into ``U`` (..., m x r) and/or ``Vh`` (..., r x n) as ``split`` says.

    Works on batches (leading dimensions), so block-wise factorizers share it.
    """
    if split == "sqrt":
        s = S.clamp_min(0).sqrt()
        return U * s.unsqueeze(-2), s.unsqueeze(-1) * Vh
    if split == "left":
        return U * S.unsqueeze(-2), Vh
    if split == "right":
        return U, S.unsqueeze(-1) * Vh
    raise FactorizeError(f"split must be one of {SPLITS}, got {split!r}")


def truncated_svd(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets of ``M`` (batched over leading dims)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[..., :, :rank], S[..., :rank], Vh[..., :rank, :]


# ----------------------------------------------------------------------------- SVD


def svd_factors(
    W: torch.Tensor,
    rank: int,
    *,
    split: str = "sqrt",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation ``W ~= U @ V`` in Frobenius norm (truncated SVD).

    The error ``||W - UV||_F`` equals ``sqrt(sum_{i>r} s_i^2)`` (Eckart-Young). Returns
    ``U`` (out x rank), ``V`` (rank x in) in ``W``'s dtype and device.
    """
    check_matrix(W, name)
    out_f, in_f = W.shape
    check_rank(rank, out_f, in_f, name)
    _check_split(split, name)
    U, S, Vh = truncated_svd(W.to(compute_dtype), rank)
    L, R = split_singular_values(U, S, Vh, split)
    return L.to(W.dtype), R.to(W.dtype)


# ----------------------------------------------------------------------------- FWSVD


def fwsvd_row_weights(fisher: torch.Tensor, out_features: int, eps: float, name: str) -> torch.Tensor:
    """Row weights ``d_i = sqrt(F_i + eps)`` from a per-row (out,) or per-entry (out x in) Fisher."""
    if not isinstance(fisher, torch.Tensor) or not fisher.is_floating_point():
        raise FactorizeError(f"{name}: fisher must be a floating-point tensor")
    if fisher.dim() == 2:
        if fisher.shape[0] != out_features:
            raise FactorizeError(
                f"{name}: fisher has shape {tuple(fisher.shape)}; expected ({out_features}, in) or ({out_features},)"
            )
        fisher = fisher.sum(dim=1)
    if fisher.shape != (out_features,):
        raise FactorizeError(
            f"{name}: fisher has shape {tuple(fisher.shape)}; expected ({out_features},) row sums "
            f"or ({out_features}, in) per-entry values"
        )
    if not torch.isfinite(fisher).all():
        raise NumericalError(f"{name}: fisher holds NaN or Inf")
    if (fisher < 0).any():
        raise FactorizeError(f"{name}: fisher must be non-negative (sums of squared gradients)")
    if not (eps > 0 and math.isfinite(eps)):
        raise FactorizeError(f"{name}: eps must be a positive number, got {eps!r}")
    return (fisher.double() + eps).sqrt()


def fwsvd_factors(
    W: torch.Tensor,
    rank: int,
    fisher_rows: torch.Tensor,
    *,
    eps: float = 1e-5,
    split: str = "sqrt",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fisher-weighted SVD (FWSVD, Hsu et al. 2022): minimise ``||diag(d) (W - UV)||_F``.

    ``fisher_rows`` is the Fisher information summed over each output row,
    ``F_i = sum_j E[(dL/dW_ij)^2]`` (shape (out,)); a per-entry Fisher (out x in) is summed here.
    The row weight is ``d_i = sqrt(F_i + eps)``; ``eps`` (absolute, 1e-5 as in the reference
    implementation) keeps rows that never saw a gradient from being ignored entirely.

    Closed form: ``diag(d) W = U S V^T``; ``U_fw = diag(d)^-1 U_r S_r^a``, ``V_fw = S_r^(1-a) V_r^T``,
    which is the exact weighted optimum (the weighting is an invertible row scaling).
    """
    check_matrix(W, name)
    out_f, in_f = W.shape
    check_rank(rank, out_f, in_f, name)
    _check_split(split, name)
    d = fwsvd_row_weights(fisher_rows.to(W.device), out_f, eps, name).to(compute_dtype)
    U, S, Vh = truncated_svd(d.unsqueeze(1) * W.to(compute_dtype), rank)
    L, R = split_singular_values(U, S, Vh, split)
    return (L / d.unsqueeze(1)).to(W.dtype), R.to(W.dtype)


# ----------------------------------------------------------------------------- DRONE


def _input_basis(
    X: torch.Tensor | None, gram: torch.Tensor | None, in_f: int, damp: float, rtol: float | None,
    dtype: torch.dtype, name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis ``Q`` (in x r) of the data's input space and the scales ``s`` (r,), with
    ``X^T X (+ damping) = Q diag(s^2) Q^T`` restricted to the directions kept.

    Directions with ``s <= rtol * max(s)`` carry no (numerically meaningful) data and are dropped.
    """
    if (X is None) == (gram is None):
        raise FactorizeError(f"{name}: pass exactly one of X (n x in activations) or gram (X^T X, in x in)")
    if not (damp >= 0 and math.isfinite(damp)):
        raise FactorizeError(f"{name}: damp must be a non-negative number, got {damp!r}")
    if X is not None:
        check_matrix(X, name, "calibration activations X")
        if X.shape[1] != in_f:
            raise FactorizeError(
                f"{name}: calibration activations X have shape {tuple(X.shape)}; expected (n, {in_f}) "
                "with one row per token"
            )
        Xd = X.to(dtype)
        if damp == 0:
            # SVD of X itself: better conditioned than eigh(X^T X) (no squaring of small scales).
            _, s, Vh = torch.linalg.svd(Xd, full_matrices=False)
            tol = rtol if rtol is not None else max(Xd.shape) * torch.finfo(dtype).eps
            keep = s > tol * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
            return Vh[keep].T, s[keep]
        gram = Xd.T @ Xd
    else:
        check_matrix(gram, name, "gram")
        if gram.shape != (in_f, in_f):
            raise FactorizeError(f"{name}: gram has shape {tuple(gram.shape)}; expected ({in_f}, {in_f}) = X^T X")
    H = gram.to(dtype)
    H = 0.5 * (H + H.T)
    if damp > 0:
        H = H + damp * H.diagonal().mean().clamp_min(torch.finfo(dtype).tiny) * torch.eye(in_f, dtype=dtype,
                                                                                        device=H.device)
    lam, Q = torch.linalg.eigh(H)
    s = lam.clamp_min(0).sqrt()
    # eigenvalues carry an absolute error ~ in * eps * max(lam), i.e. sqrt(in * eps) relative on s
    tol = rtol if rtol is not None else math.sqrt(in_f * torch.finfo(dtype).eps)
    keep = s > tol * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    return Q[:, keep], s[keep]


def drone_factors(
    W: torch.Tensor,
    rank: int,
    X: torch.Tensor | None = None,
    *,
    gram: torch.Tensor | None = None,
    damp: float = 0.0,
    rtol: float | None = None,
    split: str = "sqrt",
    compute_dtype: torch.dtype = torch.float64,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-aware low rank (DRONE): minimise ``||(W - UV) X^T||_F`` over rank-``rank`` ``UV``.

    ``X`` (n x in) holds calibration inputs of the layer, one token per row; alternatively pass
    ``gram = X^T X`` (in x in), e.g. accumulated by a forward hook without keeping ``X``.

    Closed form: with ``X^T X = Q diag(s^2) Q^T`` (kept directions only, see ``rtol``),
    ``Z = W Q diag(s)`` and its truncated SVD ``[Z]_r = U_Z S_Z V_Z^T``, the optimum is
    ``UV = [Z]_r diag(s)^-1 Q^T``. The error equals the Eckart-Young error of ``W X^T`` itself.

    Rank-deficient ``X``: the objective ignores how ``UV`` acts on directions ``X`` never spans;
    the returned solution is the minimum-norm optimum, which maps those directions to zero. If
    ``rank`` exceeds the number of directions kept, the extra factor columns/rows are zero.
    ``damp > 0`` instead adds ``damp * mean(diag(X^T X)) * I`` to the Gram (as GPTQ/SparseGPT do),
    which makes every direction count a little and interpolates towards plain SVD.
    ``rtol``: directions with scale ``s <= rtol * max(s)`` are dropped (default: ``max(n, in) * eps``
    for ``X``, ``sqrt(in * eps)`` for ``gram``).
    """
    check_matrix(W, name)
    out_f, in_f = W.shape
    check_rank(rank, out_f, in_f, name)
    _check_split(split, name)
    if X is not None:
        X = X.to(W.device)
    if gram is not None:
        gram = gram.to(W.device)
    Q, s = _input_basis(X, gram, in_f, damp, rtol, compute_dtype, name)
    Wd = W.to(compute_dtype)
    L = torch.zeros(out_f, rank, dtype=compute_dtype, device=W.device)
    R = torch.zeros(rank, in_f, dtype=compute_dtype, device=W.device)
    k = min(rank, s.numel())
    if k > 0:
        Z = (Wd @ Q) * s  # out x r_x
        Uz, Sz, Vzh = truncated_svd(Z, k)
        Lk, Rk = split_singular_values(Uz, Sz, Vzh, split)
        L[:, :k] = Lk
        R[:k] = (Rk / s) @ Q.T
    return L.to(W.dtype), R.to(W.dtype)


# ----------------------------------------------------------------------------- sizes


def lowrank_bytes(out_features: int, in_features: int, rank: int, value_bits: int = 32, bias: bool = True) -> float:
    """Bytes of a rank-``rank`` factorization ``U (out x r), V (r x in)`` plus bias, at ``value_bits``."""
    n = rank * (out_features + in_features) + (out_features if bias else 0)
    return n * value_bits / 8


def rank_for_ratio(
    out_features: int,
    in_features: int,
    ratio: float,
    value_bits: int = 32,
    bias: bool = True,
    *,
    name: str = "weight",
) -> int:
    """The largest rank whose layer is at least ``ratio`` times smaller than the dense fp32 layer.

    ``ratio`` is a compression ratio, dense bytes / compressed bytes (as ``LayerStorage.ratio``):
    dense = ``(out*in + out) * 4`` bytes, compressed = ``(r*(out+in) + out) * value_bits/8``
    (the ``+ out`` terms only with ``bias``, the bias stored at ``value_bits`` too). Rounding down
    means the ratio reached is never below the one asked, and above it by at most one rank's
    worth of bytes, ``(out+in)*value_bits/8``.
    """
    for field, v in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FactorizeError(f"{name}: {field} must be a positive integer, got {v!r}")
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise FactorizeError(f"{name}: ratio must be a positive number (dense bytes / compressed bytes), got {ratio!r}")
    if value_bits not in (4, 8, 16, 32, 64):
        raise FactorizeError(f"{name}: value_bits must be one of 4, 8, 16, 32, 64, got {value_bits!r}")
    b = out_features if bias else 0
    dense = (out_features * in_features + b) * 4
    budget_values = dense / ratio * 8 / value_bits  # numbers we may store
    rank = math.floor((budget_values - b) / (out_features + in_features) + 1e-9)
    if rank < 1:
        best = dense / lowrank_bytes(out_features, in_features, 1, value_bits, bias)
        raise FactorizeError(
            f"{name}: a {out_features}x{in_features} layer cannot reach {ratio:g}x with low rank: "
            f"rank 1 already gives only {best:.3g}x"
        )
    top = min(out_features, in_features)
    if rank > top:
        raise FactorizeError(
            f"{name}: {ratio:g}x for a {out_features}x{in_features} layer would need rank {rank} > "
            f"min(out, in) = {top}; "
            "low rank cannot help at so mild a ratio, keep the layer dense"
        )
    return rank
