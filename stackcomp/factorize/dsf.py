"""Double sparse factorization (DSF, Boza & Macko, ICLR 2025): ``W ~= P Q`` with both factors sparse.

Ported from the authors' ``doublesparse.py`` (``usamec/double_sparse`` @ 8ca9bfb), per layer,
on tensors only. With ``m = min(out, in)`` and ``n = max(out, in)`` the work happens on an
``m x n`` matrix ``M`` (``W`` itself if ``out < in``, else ``W^T``) factorized as ``A B`` with
``A`` (m x m) and ``B`` (m x n) sparse:

1. **Wanda-style scaling.** ``norm_j = sqrt(H_jj)`` for ``H = X^T X`` (the input feature norms;
   all ones without calibration data); ``M`` is scaled by ``norm`` along its input side.
2. **Budget.** ``nnz(A) + nnz(B) <= density * out * in``, with ``nnz(A) = a_fraction * m^2``
   (0.16 for square, 0.25 for rectangular weights by default, as the authors).
3. **Init.** ``A = I``; ``B`` = magnitude pruning of the scaled ``M`` to half of B's budget.
4. **Alternation** (``iters`` = 40): ``A <- argmin ||A B - M||`` then ``B <- argmin ||A B - M||``,
   each an ADMM for sparse least squares (:func:`admm_sparse_ls`) warm-started from the
   previous factor and its dual, with the start penalty ramped cubically,
   ``rho_start = min(1, it / (iters - 3))**3``.
5. **Unscale** and map back: ``W ~= P Q`` with ``P`` (out x m) and ``Q`` (m x in).
6. **Finalize** (``finalize=True``): with ``Q`` and the support of ``P`` fixed, solve
   ``min_P tr((P Q - W) H (P Q - W)^T)`` -- the data-aware output error. The authors run 20 ADMM
   steps with a fixed mask; here each row is solved exactly (row-wise normal equations on its
   support, batched), and a row is only replaced if that lowers its error, so finalize never
   increases the data-aware error. Without ``X``/``gram``, ``H = I`` (a plain least-squares refit).

**Which objective is monotone.** The alternation targets
``f(A, B) = ||A B - M_s||_F^2 / ||M_s||_F^2`` with ``M_s`` the scaled working matrix -- in the
original orientation ``||(What - W) diag(norm)||_F^2 / ||W diag(norm)||_F^2``, the diagonal
(Wanda) approximation of the data-aware error. ADMM with a hard sparsity projection does not
decrease ``f`` by itself. With ``monotone=True`` (default) each half-step's result is accepted
only if ``f`` does not grow (the ADMM duals carry on either way, so the next attempt differs);
``trace["objective"][t]``, ``f`` after outer iteration ``t`` (index 0 = the init), is then
non-increasing by construction, and ``trace["candidate"]`` keeps ``f`` of every raw ADMM
proposal. ``monotone=False`` is the authors' unguarded iteration (``objective == candidate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stackcomp.factorize.lowrank import FactorizeError, check_matrix

__all__ = ["DSFResult", "dsf_budget", "dsf_factors", "admm_sparse_ls", "refit_rows", "calibration_error"]


@dataclass
class DSFResult:
    """``W ~= P @ Q``; ``P`` (out x m) and ``Q`` (m x in) are dense tensors holding exact zeros."""

    P: torch.Tensor
    Q: torch.Tensor
    #: True if the work ran on W^T (out >= in): then P = B^T and Q = (A / norm)^T
    transposed: bool
    nnz_budget: int
    trace: dict[str, list[float]] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.P)) + int(torch.count_nonzero(self.Q))

    def to_dense(self) -> torch.Tensor:
        return self.P @ self.Q


def dsf_budget(out_features: int, in_features: int, density: float, a_fraction: float | None = None,
               *, name: str = "weight") -> tuple[int, int]:
    """``(nnz_A, nnz_B)``: A (m x m) gets ``int(a_fraction * m^2)``, B the rest of
    ``int(density * out * in)``; ``a_fraction`` defaults to 0.16 (square) / 0.25 (rectangular)."""
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise FactorizeError(f"{name}: density must be in (0, 1] (kept fraction of out*in), got {density!r}")
    m = min(out_features, in_features)
    if a_fraction is None:
        a_fraction = 0.16 if out_features == in_features else 0.25
    if not 0 < a_fraction <= 1:
        raise FactorizeError(f"{name}: a_fraction must be in (0, 1], got {a_fraction!r}")
    total = int(density * out_features * in_features)
    nza = int(m * m * a_fraction)
    nzb = total - nza
    if nza < 1 or nzb < 1:
        raise FactorizeError(
            f"{name}: density {density} of a {out_features}x{in_features} weight ({total} nonzeros) cannot hold "
            f"A's {nza} (a_fraction {a_fraction}) and still leave B any; raise density or lower a_fraction"
        )
    return nza, nzb


def _topk_mask(V: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest |V| entries over the whole matrix (global threshold)."""
    k = max(0, min(k, V.numel()))
    mask = torch.zeros(V.numel(), dtype=torch.bool, device=V.device)
    if k:
        mask[torch.topk(V.abs().flatten(), k, sorted=False).indices] = True
    return mask.view_as(V)


def admm_sparse_ls(
    P: torch.Tensor,
    T: torch.Tensor,
    nnz: int,
    Z: torch.Tensor,
    U: torch.Tensor,
    *,
    rho_start: float,
    reg: float = 1e-2,
    iters: int = 5,
    prune_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM for ``min_X ||P X - T||_F^2`` s.t. ``nnz(X) <= nnz`` (the authors' ``find_other2``).

    The columns of ``P`` are normalised (the scale goes into X's rows), a ridge of
    ``reg * mean(diag(G))`` is added to ``G = Pn^T Pn``, then: ``X = (G + rho_start I)^-1 (R +
    rho_start (Z - U))``; ``iters`` times: (mask of the global top-``nnz`` of ``|X + U|``, during
    the first ``prune_iters`` only), ``Z = (X + U) * mask``, ``U += X - Z``,
    ``X = (G + I)^-1 (R + Z - U)``. Returns the sparse ``Z`` and the dual ``U``, unnormalised.
    """
    col = P.norm(dim=0) + 1e-8
    Pn = P / col
    G = Pn.T @ Pn
    ridge = reg * float(G.diagonal().mean())
    if not ridge > 0:
        ridge = reg
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    G = G + ridge * eye
    R = Pn.T @ T
    inv1 = torch.linalg.inv(G + eye)
    inv0 = torch.linalg.inv(G + rho_start * eye) if rho_start != 1 else inv1
    Z = Z * col.unsqueeze(1)
    U = U * col.unsqueeze(1)
    X = inv0 @ (R + rho_start * (Z - U))
    mask = None
    for it in range(iters):
        if mask is None or it < prune_iters:
            mask = _topk_mask(X + U, nnz)
        Z = (X + U) * mask
        U = U + (X - Z)
        X = inv1 @ (R + (Z - U))
    return Z / col.unsqueeze(1), U / col.unsqueeze(1)


def _rel_err(A: torch.Tensor, B: torch.Tensor, M: torch.Tensor, m_sq: float) -> float:
    return float(torch.linalg.matrix_norm(A @ B - M) ** 2) / m_sq


def calibration_error(What: torch.Tensor, W: torch.Tensor, H: torch.Tensor | None) -> float:
    """``tr((What - W) H (What - W)^T)`` -- the summed squared output error on the calibration
    inputs when ``H = X^T X``; the squared Frobenius error when ``H`` is None."""
    E = (What - W).to(torch.float64)
    if H is None:
        return float((E * E).sum())
    return float(((E @ H.to(torch.float64)) * E).sum())


def refit_rows(
    P: torch.Tensor, Q: torch.Tensor, W: torch.Tensor, H: torch.Tensor | None, *, chunk_elements: int = 1 << 24
) -> torch.Tensor:
    """Best ``P`` on its own support for ``min tr((P Q - W) H (P Q - W)^T)``, ``Q`` fixed.

    Rows are independent: row ``o`` with support ``S`` solves ``G[S, S] p = R[o, S]`` with
    ``G = Q H Q^T`` and ``R = W H Q^T``, all rows of similar support size in one batched Cholesky
    (float64, a 1e-12 relative ridge). A row is replaced only if its error drops, so the result is
    never worse than ``P``.
    """
    dt = torch.float64
    Pd, Qd, Wd = P.to(dt), Q.to(dt), W.to(dt)
    QH = Qd if H is None else Qd @ H.to(dt)
    G = QH @ Qd.T
    R = Wd @ QH.T
    ridge = 1e-12 * max(float(G.diagonal().mean()), 1e-300)
    support = Pd != 0
    sizes = support.sum(1)
    order = torch.argsort(sizes, stable=True)  # similar support sizes share a batch: little padding
    sorted_sizes = [max(int(v), 1) for v in sizes[order]]
    out = Pd.clone()
    cols = torch.arange(Pd.shape[1], device=Pd.device)
    i, n_rows = 0, Pd.shape[0]
    while i < n_rows:
        j = i + 1  # grow the batch while (rows x padded size^2) fits
        while j < n_rows and (j + 1 - i) * sorted_sizes[j] ** 2 <= chunk_elements:
            j += 1
        rows, s_max = order[i:j], sorted_sizes[j - 1]
        sup = support[rows]
        # each row's support indices first (ascending), padding after; padded slots point at column 0
        idx = torch.sort(torch.where(sup, cols, Pd.shape[1]), dim=1).values[:, :s_max]
        valid = idx < Pd.shape[1]
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        Gs = G[idx.unsqueeze(2), idx.unsqueeze(1)] * both
        Gs = Gs + torch.diag_embed(torch.where(valid, ridge, 1.0).to(dt))
        rhs = torch.gather(R[rows], 1, idx) * valid
        L, info = torch.linalg.cholesky_ex(Gs)
        sol = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2) * valid
        old = torch.gather(Pd[rows], 1, idx) * valid

        def phi(p: torch.Tensor) -> torch.Tensor:  # row error up to a constant: p G p^T - 2 p . r
            return (p.unsqueeze(1) @ Gs @ p.unsqueeze(2)).flatten() - 2 * (p * rhs).sum(1)

        better = (info == 0) & torch.isfinite(sol).all(dim=1) & (phi(sol) <= phi(old))
        # padded slots go to a spare last column, so they cannot overwrite column 0
        spare = torch.where(valid, idx, torch.full_like(idx, Pd.shape[1]))
        new_rows = torch.zeros(rows.numel(), Pd.shape[1] + 1, dtype=dt, device=Pd.device).scatter_(1, spare, sol)
        out[rows[better]] = new_rows[better, :-1]
        i = j
    return out.to(P.dtype)


def dsf_factors(
    W: torch.Tensor,
    *,
    density: float,
    X: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    a_fraction: float | None = None,
    iters: int = 40,
    inner_iters: int = 5,
    prune_iters: int = 2,
    reg: float = 1e-2,
    monotone: bool = True,
    finalize: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    name: str = "weight",
) -> DSFResult:
    """Factorize one weight ``W`` (out x in) as ``P @ Q`` with ``nnz(P) + nnz(Q) <= density*out*in``.

    ``X`` (n x in calibration inputs) or ``gram`` (``X^T X``) enable the Wanda scaling and the
    data-aware finalize; see the module docstring for every step and for the monotone objective.
    ``trace`` holds ``objective`` and ``candidate`` (``iters + 1`` values: the init, then one per
    alternation; see above), ``rho`` (``rho_start`` of each alternation, ``iters`` values) and,
    when finalize runs, ``calib_before``/``calib_after`` (:func:`calibration_error` before and
    after it).
    """
    check_matrix(W, name)
    out_f, in_f = W.shape
    if iters < 1 or inner_iters < 1 or prune_iters < 0:
        raise FactorizeError(f"{name}: need iters >= 1, inner_iters >= 1, prune_iters >= 0")
    nza, nzb = dsf_budget(out_f, in_f, density, a_fraction, name=name)
    dt = compute_dtype
    H = None
    if X is not None and gram is not None:
        raise FactorizeError(f"{name}: pass X or gram, not both")
    if X is not None:
        check_matrix(X, name, "calibration activations X")
        if X.shape[1] != in_f:
            raise FactorizeError(f"{name}: X has shape {tuple(X.shape)}; expected (n, {in_f})")
        Xd = X.to(device=W.device, dtype=torch.float64)
        H = Xd.T @ Xd
    elif gram is not None:
        check_matrix(gram, name, "gram")
        if gram.shape != (in_f, in_f):
            raise FactorizeError(f"{name}: gram has shape {tuple(gram.shape)}; expected ({in_f}, {in_f})")
        H = gram.to(device=W.device, dtype=torch.float64)
    norm = (H.diagonal().clamp_min(0).sqrt() if H is not None else torch.ones(in_f, dtype=torch.float64,
                                                                               device=W.device))
    norm = norm.to(dt) + 1e-8
    transposed = out_f >= in_f
    M = (W.T * norm.unsqueeze(1)) if transposed else (W * norm)  # m x n, scaled on the input side
    M = M.to(dt)
    m, n = M.shape
    m_sq = float(torch.linalg.matrix_norm(M) ** 2) or 1.0

    A = torch.eye(m, dtype=dt, device=W.device)
    Au = torch.zeros_like(A)
    B = M * _topk_mask(M, nzb // 2)
    Bu = torch.zeros_like(B)
    f = _rel_err(A, B, M, m_sq)
    trace: dict[str, list[float]] = {"objective": [f], "candidate": [f], "rho": []}
    for it in range(iters):
        rho = min(1.0, it / max(iters - 3, 1)) ** 3
        Zt, Ut = admm_sparse_ls(B.T, M.T, nza, A.T, Au.T, rho_start=rho, reg=reg, iters=inner_iters,
                                prune_iters=prune_iters)
        A_new, Au = Zt.T, Ut.T
        B_new, Bu = admm_sparse_ls(A_new, M, nzb, B, Bu, rho_start=rho, reg=reg, iters=inner_iters,
                                   prune_iters=prune_iters)
        f_new = _rel_err(A_new, B_new, M, m_sq)
        if not monotone or f_new <= f:  # the guard judges a whole alternation, A-step and B-step together
            A, B, f = A_new, B_new, f_new
        trace["candidate"].append(f_new)
        trace["objective"].append(f)
        trace["rho"].append(rho)

    if transposed:  # W^T ~= diag(1/norm) A B  =>  W ~= B^T (A / norm)^T
        P, Q = B.T, (A / norm.unsqueeze(1)).T
    else:  # W ~= A (B / norm)
        P, Q = A, B / norm
    P, Q = P.contiguous(), Q.contiguous()
    if finalize:
        trace["calib_before"] = [calibration_error(P @ Q, W, H)]
        P = refit_rows(P, Q, W.to(dt), H)
        trace["calib_after"] = [calibration_error(P @ Q, W, H)]
    return DSFResult(P=P.to(W.dtype), Q=Q.to(W.dtype), transposed=transposed, nnz_budget=nza + nzb, trace=trace)
