"""Batched orthogonal matching pursuit (OMP) in the Gram domain, on any torch device.

DSFormer codes every B-wide row segment of a weight with exactly ``s`` atoms of its block's
dictionary. That is hundreds of thousands of tiny OMP problems per model (and again at every
STF refresh), so they are solved all at once, vectorised over signals, instead of one by one
as in scikit-learn.

The algorithm is Cholesky OMP written as progressive Gram-Schmidt in the Gram domain: for the
k-th selected atom ``l`` we keep ``U_k = q_k^T D`` (the inner products of the k-th
orthonormalised direction with every atom) and ``a_k = q_k^T x``; the correlations update as
``alpha <- alpha - a_k U_k`` and the Cholesky factor of ``G[I, I]`` is read off ``U``. The
coefficients are one triangular solve at the end. Per step and signal: O(k K) work, no
Python loop over signals.

Rules that make the output safe to store as a fixed-width ELL layout:

* every row gets exactly ``nnz`` distinct atom indices;
* atoms are chosen by the largest ``alpha_j^2 / G_jj`` (atom norms are *not* assumed to be 1);
* an atom that is (numerically) dependent on the atoms already chosen, or any atom once the
  residual is exhausted, fills its slot as *padding*: an unused atom index with value 0;
* zero rows, zero or duplicate atoms and ``nnz >= rank`` give finite results, never NaN.
"""

from __future__ import annotations

import torch

# One shared error class for bad factorization input (a StackcompError subclass).
from stackcomp.factorize.lowrank import FactorizeError

__all__ = ["FactorizeError", "omp", "sparse_code", "gram_and_xy", "codes_to_dense"]

# Default relative tolerances, per working dtype: an atom whose squared distance to the span
# of the chosen atoms is below ``eps * ||d||^2`` counts as dependent; the residual counts as
# exhausted once the best normalised squared correlation falls below ``eps^2`` times the
# initial one.
_DEFAULT_EPS = {torch.float32: 1e-5, torch.float64: 1e-10}

# Signals per chunk: about this many (slot, signal, atom) numbers in U at once (memory and cache
# stay small), but never fewer than _MIN_CHUNK signals (per-op overhead would dominate).
_CHUNK_ELEMENTS = 1 << 21
_MIN_CHUNK = 2048


def omp(
    gram: torch.Tensor,
    xy: torch.Tensor,
    nnz: int,
    *,
    init_support: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    eps: float | None = None,
    chunk_size: int | None = None,
    return_energy: bool = False,
    num_threads: int | None = 1,
) -> tuple[torch.Tensor, ...]:
    """Sparse-code many signals with exactly ``nnz`` atoms each.

    Args:
        gram: ``D D^T`` of the dictionary whose rows are the atoms: (K, K) shared by every
            problem, or (P, K, K) one per problem (P may be 1 to broadcast).
        xy: ``X D^T``, the correlations of each signal with each atom: (N, K) or (P, N, K).
        nnz: atoms per signal, ``1 <= nnz <= K``.
        init_support: optional warm start, long (..., N, s0) with ``s0 <= nnz`` and the same
            leading dims as ``xy``. These atoms are taken first, in the given order (entries
            ``< 0`` and repeats are skipped, i.e. chosen greedily), then selection continues
            greedily up to ``nnz``. With ``s0 == nnz`` this keeps the prior support and just
            re-solves the least squares; with a prefix it keeps the strongest prior atoms and lets
            the rest move. A warm-start atom that turns out dependent becomes padding (value 0).
        dtype: working precision, float32 (default) or float64. Values come back in ``xy``'s
            floating dtype (float32 if ``xy`` is not floating).
        eps: relative tolerance for dependence / exhaustion (see module doc); default per dtype.
        chunk_size: signals solved at once (default: bounded by memory).
        return_energy: also return ``||x_hat||^2`` per signal (..., N), the squared norm of the
            signal's projection on its chosen atoms, so ``||x||^2 - energy`` is the residual
            energy without a reconstruction.
        num_threads: torch intra-op threads on CPU while solving (restored afterwards); None
            leaves torch's setting. Default 1: the solve is hundreds of small memory-bound ops,
            which a second thread speeds up little, and which slow down by 10-100x when the
            threads are oversubscribed (measured on a shared 2-core machine, bench/omp.py).

    Returns:
        ``(values, indices)`` (plus ``energy`` if asked), each shaped like ``xy`` with K replaced
        by ``nnz``; indices are long, in selection order, distinct within a row; padding slots
        hold value 0.
    """
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise FactorizeError(f"omp: num_threads must be a positive int or None, got {num_threads!r}")
    before = torch.get_num_threads()
    on_cpu = isinstance(xy, torch.Tensor) and xy.device.type == "cpu"
    switch = num_threads is not None and on_cpu and num_threads != before
    if switch:
        torch.set_num_threads(num_threads)
    try:
        return _omp(gram, xy, nnz, init_support, dtype, eps, chunk_size, return_energy)
    finally:
        if switch:
            torch.set_num_threads(before)


def _omp(gram, xy, nnz, init_support, dtype, eps, chunk_size, return_energy):
    gram, xy, squeeze = _check_inputs(gram, xy, nnz)
    P, N, K = xy.shape
    work = dtype or torch.float32
    if work not in _DEFAULT_EPS:
        raise FactorizeError(f"omp: dtype must be torch.float32 or torch.float64, got {work}")
    out_dtype = xy.dtype if xy.dtype.is_floating_point else torch.float32
    tol = float(eps) if eps is not None else _DEFAULT_EPS[work]
    if not 0 < tol < 1:
        raise FactorizeError(f"omp: eps must lie in (0, 1), got {eps}")

    if init_support is not None:
        init_support = _check_init_support(init_support, xy, nnz, K, squeeze)

    # Normalise the atoms once: selection is then a plain argmax of |alpha| and the Cholesky
    # diagonal is relative. Zero atoms get scale 0: never useful, only ever padding.
    gram = gram.to(work)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (P or 1, K)
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(work).tiny), torch.zeros_like(norms))
    gram_n = gram * inv.unsqueeze(2) * inv.unsqueeze(1)
    xy_n = (xy.to(work) * inv.unsqueeze(1)).reshape(P * N, K)
    shared = gram.shape[0] == 1
    gram_rows = gram_n.reshape(-1, K)  # row (problem * K + atom) = normalised G[atom, :]
    inv_rows = inv.reshape(-1)

    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise FactorizeError(f"omp: chunk_size must be a positive int, got {chunk_size!r}")
    M = P * N
    step = max(1, min(M, chunk_size or max(_MIN_CHUNK, _CHUNK_ELEMENTS // (nnz * K))))
    values = torch.empty(M, nnz, dtype=work, device=xy.device)
    indices = torch.empty(M, nnz, dtype=torch.long, device=xy.device)
    energy = torch.empty(M, dtype=work, device=xy.device) if return_energy else None
    init_flat = None if init_support is None else init_support.reshape(M, -1)
    ws = _Workspace(step, K, nnz, work, xy.device)
    for lo in range(0, M, step):
        hi = min(M, lo + step)
        base = None if shared else torch.arange(lo, hi, device=xy.device).div_(N, rounding_mode="floor").mul_(K)
        v, i, e = _omp_chunk(
            ws, gram_rows, base, xy_n[lo:hi], nnz, tol, None if init_flat is None else init_flat[lo:hi]
        )
        # Back from the normalised atoms to the caller's atoms.
        v *= inv_rows[i if base is None else i + base.unsqueeze(1)]
        values[lo:hi] = v
        indices[lo:hi] = i
        if energy is not None:
            energy[lo:hi] = e
    values = values.to(out_dtype).reshape(P, N, nnz)
    indices = indices.reshape(P, N, nnz)
    if energy is not None:
        energy = energy.reshape(P, N)
    if squeeze:
        values, indices = values[0], indices[0]
        energy = None if energy is None else energy[0]
    if return_energy:
        return values, indices, energy
    return values, indices


class _Workspace:
    """Buffers for one chunk of M signals, reused by every chunk of an :func:`omp` call.

    On CPU, fresh large allocations cost page faults on first touch that would otherwise
    dominate the run time. Per-slot arrays are slot-major (slot, signal) so each step writes
    contiguous rows.
    """

    def __init__(self, M: int, K: int, nnz: int, work: torch.dtype, dev: torch.device):
        self.alpha = torch.empty(M, K, dtype=work, device=dev)
        self.score = torch.empty(M, K, dtype=work, device=dev)
        self.buf = torch.empty(M, K, dtype=work, device=dev)
        self.g = torch.empty(M, K, dtype=work, device=dev)
        self.U = torch.empty(nnz, M, K, dtype=work, device=dev)  # U[j] = q_j^T D, chosen direction j
        self.L = torch.zeros(nnz, nnz, M, dtype=work, device=dev)  # L[k, j, m]: Cholesky of G[I, I]
        self.a = torch.empty(nnz, M, dtype=work, device=dev)  # a[j] = q_j^T x
        self.idx = torch.empty(nnz, M, dtype=torch.long, device=dev)
        self.pads = torch.empty(nnz, M, dtype=torch.bool, device=dev)
        self.rev = torch.arange(K, 0, -1, dtype=work, device=dev)  # first maximum wins ties, as argmax


def _omp_chunk(
    ws: _Workspace,
    gram_rows: torch.Tensor,
    row_base: torch.Tensor | None,
    alpha0: torch.Tensor,
    nnz: int,
    tol: float,
    init: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OMP for M signals over unit-norm (or zero) atoms. Signal m uses gram rows
    ``row_base[m] + atom`` (``row_base`` None: one shared gram). Returns values, indices (M, nnz)
    and the explained energy ``||x_hat||^2`` (M,)."""
    M, K = alpha0.shape
    dev, work = alpha0.device, alpha0.dtype
    alpha, score, buf, g = ws.alpha[:M], ws.score[:M], ws.buf[:M], ws.g[:M]
    U, L, a, idx, pads = ws.U[:, :M], ws.L[:, :, :M], ws.a[:, :M], ws.idx[:, :M], ws.pads[:, :M]
    alpha.copy_(alpha0)
    torch.abs(alpha, out=score)
    res_tol = score.amax(dim=1) * tol  # residual exhausted below this correlation
    done = torch.zeros(M, dtype=torch.bool, device=dev)  # residual exhausted: pad from now on
    one = torch.ones((), dtype=work, device=dev)
    tiny = torch.finfo(work).tiny
    s0 = 0 if init is None else init.shape[1]

    for k in range(nnz):
        # No mask for chosen atoms: their correlation is zeroed when chosen and stays at rounding
        # level (the residual is orthogonal to them), so they can win only once the residual is
        # exhausted, i.e. for a padding slot, whose index is rewritten at the end anyway.
        if k:
            torch.abs(alpha, out=score)
        best = score.amax(dim=1)
        torch.eq(score, best.unsqueeze(1), out=buf)
        lam = (K - buf.mul_(ws.rev).amax(dim=1)).long()
        if k < s0:
            forced = init[:, k]
            safe = forced.clamp_min(0)
            ok = forced >= 0
            if k:
                ok &= ~(idx[:k] == safe).any(dim=0)
            lam = torch.where(ok, safe, lam)
            done |= ~ok & (best <= res_tol)  # only greedy picks can find the residual exhausted
        else:
            done |= best <= res_tol
        lam1 = lam.unsqueeze(1)

        torch.index_select(gram_rows, 0, lam if row_base is None else row_base + lam, out=g)
        g_ll = g.gather(1, lam1).squeeze(1)  # normalised G[lam, lam]: 1, or 0 for a zero atom
        if k:
            w = L[k, :k]  # (k, M): row k of the Cholesky factor, U_j[lam]
            torch.gather(U[:k], 2, lam1.unsqueeze(0).expand(k, M, 1), out=w.unsqueeze(2))
            l2 = g_ll - (w * w).sum(dim=0)
        else:
            l2 = g_ll
        # Dependent (or zero) atom, or exhausted residual: this slot is padding.
        pad = done | (l2 <= tol * g_ll)
        scale = torch.where(pad, torch.zeros_like(l2), l2.clamp_min(tiny).rsqrt())  # 1 / L_kk
        u = U[k]
        if k:
            w.mul_((~pad).to(work))
            torch.addcmul(g, U[0], w[0].unsqueeze(1), value=-1, out=u)
            for j in range(1, k):
                u.addcmul_(U[j], w[j].unsqueeze(1), value=-1)
        else:
            u.copy_(g)
        u.mul_(scale.unsqueeze(1))
        ak = alpha.gather(1, lam1).squeeze(1).mul_(scale)
        alpha.addcmul_(u, ak.unsqueeze(1), value=-1)
        alpha.scatter_(1, lam1, 0.0)  # chosen, or dependent: never chosen again while it matters

        torch.where(pad, one, l2.clamp_min(tiny).sqrt(), out=L[k, k])
        a[k] = ak
        idx[k] = lam
        pads[k] = pad

    # Coefficients: solve L^T x = a per signal, back substitution vectorised over signals
    # (a batched LAPACK call per tiny matrix costs more than these nnz^2/2 row operations).
    x = torch.empty(nnz, M, dtype=work, device=dev)
    for i in range(nnz - 1, -1, -1):
        if i == nnz - 1:
            x[i] = a[i] / L[i, i]
        else:
            x[i] = (a[i] - (L[i + 1 :, i] * x[i + 1 :]).sum(dim=0)) / L[i, i]
    out_idx = idx.T.contiguous()
    _fill_padding(out_idx, pads.T, K)
    return x.T.contiguous(), out_idx, (a * a).sum(dim=0)


def _fill_padding(idx: torch.Tensor, pads: torch.Tensor, K: int) -> None:
    """Give padding slots the smallest atom indices the row does not use, in place.

    Once a residual is exhausted the greedy pick is arbitrary (possibly an atom already in the
    row); rewriting every padding slot keeps each row's indices distinct and deterministic.
    """
    rows = pads.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    sub_idx, sub_pad = idx[rows], pads[rows]
    used = torch.zeros(rows.numel(), K, dtype=torch.int32, device=idx.device)
    used.scatter_add_(1, sub_idx, (~sub_pad).to(torch.int32))  # counts real atoms only
    # stable sort of used flags: the unused atoms come first, in increasing index order
    free = torch.sort((used > 0).to(torch.uint8), dim=1, stable=True).indices
    rank = sub_pad.long().cumsum(dim=1) - 1  # k-th padding slot of a row takes its k-th free atom
    fill = free.gather(1, rank.clamp_min(0))
    idx[rows] = torch.where(sub_pad, fill, sub_idx)


def _check_inputs(gram: torch.Tensor, xy: torch.Tensor, nnz: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if not isinstance(gram, torch.Tensor) or not isinstance(xy, torch.Tensor):
        raise FactorizeError("omp: gram and xy must be torch tensors")
    squeeze = xy.dim() == 2
    if squeeze:
        xy = xy.unsqueeze(0)
    if xy.dim() != 3:
        raise FactorizeError(f"omp: xy must be (N, K) or (P, N, K), got shape {tuple(xy.shape)}")
    if gram.dim() == 2:
        gram = gram.unsqueeze(0)
    P, N, K = xy.shape
    if gram.dim() != 3 or gram.shape[1:] != (K, K) or gram.shape[0] not in (1, P):
        raise FactorizeError(
            f"omp: gram must be (K, K) or (P, K, K) with K={K}, P={P} taken from xy {tuple(xy.shape)}; "
            f"got {tuple(gram.shape)}"
        )
    if squeeze and gram.shape[0] != 1:
        raise FactorizeError("omp: a 2-D xy (N, K) needs a single (K, K) gram")
    if gram.device != xy.device:
        raise FactorizeError(f"omp: gram is on {gram.device} but xy on {xy.device}")
    if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 1:
        raise FactorizeError(f"omp: nnz must be a positive int, got {nnz!r}")
    if nnz > K:
        raise FactorizeError(f"omp: nnz={nnz} non-zeros per row need at least that many atoms, but K={K}")
    # A sum is finite only if every entry is (barring overflow, which the full check settles).
    for name, t in (("gram", gram), ("xy", xy)):
        if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            raise FactorizeError(f"omp: {name} holds NaN or Inf")
    return gram, xy, squeeze


def _check_init_support(init: torch.Tensor, xy: torch.Tensor, nnz: int, K: int, squeeze: bool) -> torch.Tensor:
    if squeeze:
        init = init.unsqueeze(0) if init.dim() == 2 else init
    if init.dim() != 3 or init.shape[:2] != xy.shape[:2]:
        raise FactorizeError(
            f"omp: init_support must be shaped like xy with K replaced by s0 <= nnz, i.e. "
            f"{tuple(xy.shape[:2])} + (s0,), got {tuple(init.shape)}"
        )
    if init.dtype.is_floating_point or init.dtype == torch.bool:
        raise FactorizeError(f"omp: init_support must hold integer atom indices, got {init.dtype}")
    if init.shape[2] > nnz:
        raise FactorizeError(f"omp: init_support has {init.shape[2]} atoms per row, more than nnz={nnz}")
    init = init.to(device=xy.device, dtype=torch.long)
    if init.numel() and int(init.max()) >= K:
        raise FactorizeError(f"omp: init_support holds atom index {int(init.max())}, but K={K}")
    return init


def gram_and_xy(X: torch.Tensor, D: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D D^T, X D^T)`` for signals X (..., N, B) and dictionaries D (..., K, B), batched."""
    work = dtype or torch.float32
    X = X.to(work)
    D = D.to(work)
    return D @ D.transpose(-1, -2), X @ D.transpose(-1, -2)


def sparse_code(
    X: torch.Tensor,
    D: torch.Tensor,
    nnz: int,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OMP of signals X (P, N, B) over dictionaries D (P, K, B) (rows are atoms); 2-D X, D work too.

    Keyword arguments go to :func:`omp`. Returns ``(values, indices)`` (P, N, nnz).
    """
    if X.dim() != D.dim() or X.dim() not in (2, 3) or X.shape[-1] != D.shape[-1]:
        raise FactorizeError(
            f"sparse_code: X (P, N, B) and D (P, K, B) must agree on B and rank, got "
            f"{tuple(X.shape)} and {tuple(D.shape)}"
        )
    if X.dim() == 3 and D.shape[0] not in (1, X.shape[0]):
        raise FactorizeError(f"sparse_code: D has {D.shape[0]} dictionaries for {X.shape[0]} problems")
    gram, xy = gram_and_xy(X, D, kwargs.get("dtype"))
    return omp(gram, xy, nnz, **kwargs)


def codes_to_dense(values: torch.Tensor, indices: torch.Tensor, atoms: int) -> torch.Tensor:
    """Scatter ELL codes (..., N, s) into dense coefficients (..., N, K)."""
    out = torch.zeros(*values.shape[:-1], atoms, dtype=values.dtype, device=values.device)
    return out.scatter_add_(-1, indices.long(), values)
