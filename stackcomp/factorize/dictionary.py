"""Dictionary learning per weight block, batched over blocks, and the DSFormer factorization.

A weight ``W`` (out x in) is cut along its input dimension into ``nb = in / B`` blocks; block
``b`` holds the ``out`` signals ``W[:, b*B:(b+1)*B]`` (rows of length B). Each block gets its own
dictionary ``D_b`` (K x B, unit-norm rows = atoms) and codes with exactly ``s`` atoms per row,
so ``W_b ~= C_b D_b``. All blocks are learned at once, as a batch of P problems.

Alternation: sparse coding by batched OMP, then a dictionary update, either

* ``"mod"`` (method of optimal directions): ``D = argmin ||X - C D||`` with the codes fixed,
  one small K x K solve per block (float64, tiny ridge), rows renormalised with the codes
  rescaled so the product is unchanged; or
* ``"ksvd"``: approximate K-SVD as in the DSFormer author's code (NOTES 1.4): atoms in turn,
  one power iteration on the residual of the rows that use the atom, which updates the atom
  and those rows' coefficients; the support is kept.

Both updates never increase the error. The coding step is OMP, which is greedy, so a new code
can be worse than the old one for a row; each row keeps whichever of its old code (on the new
dictionary) and its new OMP code fits better, which makes the error history monotone.

Atoms that no row uses are re-seeded with the worst-fitted rows (normalised residuals), the
usual K-SVD remedy; this cannot raise the error since those atoms carried nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from stackcomp.factorize.checks import check_int
from stackcomp.factorize.omp import FactorizeError, codes_to_dense, omp

__all__ = [
    "DictionaryResult",
    "DSFactors",
    "learn_dictionary",
    "factorize_ds",
    "ds_blocks",
    "ds_reconstruct",
    "relative_error",
    "normalize_rows",
]

METHODS = ("mod", "ksvd")
INITS = ("data", "svd")


@dataclass
class DictionaryResult:
    """Learned dictionaries (P, K, B), codes (P, N, s) and the relative error after each round.

    ``errors[0]`` is the error of the initial dictionary's codes, ``errors[i]`` after round i.
    """

    dictionary: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    errors: list[float] = field(default_factory=list)


@dataclass
class DSFactors:
    """DSFormer factors of one weight: ``W[:, b*B:(b+1)*B] ~= C_b @ dictionary[b]``.

    ``dictionary`` (nb, K, B) unit-norm rows; ``values`` / ``indices`` (nb, out, s) the ELL codes
    (indices long, distinct per row); ``error`` = ||W - W_hat||_F / ||W||_F.
    """

    dictionary: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    error: float = float("nan")
    errors: list[float] = field(default_factory=list)

    @property
    def block(self) -> int:
        return self.dictionary.shape[2]

    @property
    def atoms(self) -> int:
        return self.dictionary.shape[1]

    @property
    def nnz(self) -> int:
        return self.values.shape[2]

    def to_dense(self) -> torch.Tensor:
        return ds_reconstruct(self.dictionary, self.values, self.indices)


# ----------------------------------------------------------------------------- helpers


def normalize_rows(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm rows and the norms they had (zero rows stay zero, norm 0)."""
    n = D.norm(dim=-1)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    return D / safe.unsqueeze(-1), n


def ds_blocks(W: torch.Tensor, block: int) -> torch.Tensor:
    """(out, in) -> (nb, out, B): the signals of every input block."""
    out_f, in_f = W.shape
    return W.reshape(out_f, in_f // block, block).permute(1, 0, 2)


def ds_reconstruct(dictionary: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The dense weight (out, nb*B) of DS factors: block b is ``C_b @ dictionary[b]``."""
    nb, K, B = dictionary.shape
    C = codes_to_dense(values.to(dictionary.dtype), indices.long(), K)  # (nb, out, K)
    blocks = torch.bmm(C, dictionary)  # (nb, out, B)
    return blocks.permute(1, 0, 2).reshape(values.shape[1], nb * B)


def relative_error(W: torch.Tensor, factors: DSFactors | torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F (0 for a zero W reconstructed exactly)."""
    W_hat = factors.to_dense() if isinstance(factors, DSFactors) else factors
    num = (W.double() - W_hat.double()).norm()
    den = W.double().norm()
    return float(num / den) if den > 0 else float(num)


def _rows_error(X: torch.Tensor, D: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Squared residual per row, (P, N)."""
    rec = torch.bmm(codes_to_dense(values, indices, D.shape[1]), D)
    return (X - rec).pow(2).sum(dim=-1)


def _code(X, D, nnz, omp_dtype, x2):
    """OMP codes of X over D and each row's squared residual (from OMP's explained energy)."""
    gram = torch.bmm(D, D.transpose(1, 2))
    xy = torch.bmm(X, D.transpose(1, 2))
    values, indices, energy = omp(gram, xy, nnz, dtype=omp_dtype, return_energy=True)
    return values, indices, (x2 - energy.to(x2.dtype)).clamp_min(0)


# ----------------------------------------------------------------------------- init


def _init_dictionary(X: torch.Tensor, atoms: int, init, gen: torch.Generator) -> torch.Tensor:
    P, N, B = X.shape
    if isinstance(init, torch.Tensor):
        D = init.to(device=X.device, dtype=X.dtype)
        if D.dim() == 2:
            D = D.expand(P, *D.shape)
        if D.shape != (P, atoms, B):
            raise FactorizeError(
                f"learn_dictionary: initial dictionary must be (P, K, B) = {(P, atoms, B)}, got {tuple(init.shape)}"
            )
        if not bool(torch.isfinite(D).all()):
            raise FactorizeError("learn_dictionary: initial dictionary holds NaN or Inf")
        D = D.clone()
    elif init == "data":
        # K distinct rows of each block (random order); short blocks are topped up below.
        take = min(atoms, N)
        order = torch.rand(P, N, generator=gen).argsort(dim=1)[:, :take].to(X.device)
        D = torch.zeros(P, atoms, B, dtype=X.dtype, device=X.device)
        D[:, :take] = X.gather(1, order.unsqueeze(2).expand(P, take, B))
    elif init == "svd":
        # Right singular vectors first (the best rank-min(K, B) basis), then data rows.
        _, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
        r = min(atoms, Vh.shape[1])
        D = torch.zeros(P, atoms, B, dtype=X.dtype, device=X.device)
        D[:, :r] = Vh[:, :r].to(X.dtype)
        if atoms > r:
            extra = min(atoms - r, N)
            order = torch.rand(P, N, generator=gen).argsort(dim=1)[:, :extra].to(X.device)
            D[:, r : r + extra] = X.gather(1, order.unsqueeze(2).expand(P, extra, B))
    else:
        raise FactorizeError(f"learn_dictionary: init must be one of {INITS} or a (P, K, B) tensor, got {init!r}")
    D, n = normalize_rows(D)
    dead = n <= 0
    if bool(dead.any()):  # zero data rows or too few rows: random unit atoms
        rnd, _ = normalize_rows(torch.randn(P, atoms, B, generator=gen, dtype=torch.float64).to(D))
        D = torch.where(dead.unsqueeze(-1), rnd, D)
    return D


def _reseed_unused(X, D, values, indices, gen):
    """Replace atoms that carry no value in their block by the worst-fitted rows' residuals."""
    P, K, _ = D.shape
    used = (codes_to_dense(values.abs(), indices, K) > 0).any(dim=1)  # (P, K)
    dead = ~used
    if not bool(dead.any()):
        return D
    rec = torch.bmm(codes_to_dense(values, indices, K), D)
    R = X - rec
    rn = R.pow(2).sum(-1)  # (P, N)
    D = D.clone()
    for p in dead.any(dim=1).nonzero().flatten().tolist():
        slots = dead[p].nonzero().flatten()
        take = min(slots.numel(), X.shape[1])
        worst = rn[p].topk(take).indices
        cand, cn = normalize_rows(R[p, worst])
        ok = cn > 1e-12 * (X[p].pow(2).sum(-1).max().sqrt() + 1e-30)
        new = D[p, slots].clone()
        new[:take] = torch.where(ok.unsqueeze(1), cand, new[:take])
        D[p, slots] = new
    return D


# ----------------------------------------------------------------------------- updates


def _mod_update(X, D, values, indices):
    """MOD: least-squares dictionary for fixed codes, renormalised; codes rescaled to match."""
    P, K, B = D.shape
    C = codes_to_dense(values, indices, K)  # (P, N, K)
    # Products in the working dtype (BLAS speed), the small K x K solve in float64.
    A = torch.bmm(C.transpose(1, 2), C).double()  # (P, K, K)
    rhs = torch.bmm(C.transpose(1, 2), X).double()  # (P, K, B)
    # Tiny ridge: unused atoms (zero rows/columns of A) come out as zero, the rest are unaffected.
    scale = torch.diagonal(A, dim1=1, dim2=2).amax(dim=1).clamp_min(1e-300)
    A = A + (1e-12 * scale).view(P, 1, 1) * torch.eye(K, dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        Dn = torch.linalg.lstsq(A, rhs).solution
    else:
        Dn = torch.cholesky_solve(rhs, L)
    Dn, norms = normalize_rows(Dn.to(D.dtype))
    dead = norms <= 0
    Dn = torch.where(dead.unsqueeze(-1), D, Dn)  # keep unused atoms as they were (re-seeded later)
    new_values = values * norms.gather(1, indices.reshape(P, -1)).reshape(values.shape).to(values.dtype)
    return Dn, new_values


def _ksvd_update(X, D, values, indices):
    """Approximate K-SVD sweep: for each atom in turn, one power iteration on its rows' residual.

    Rows are gathered by atom (one sort per sweep), so a sweep costs O(P N s B), not O(P N K B).
    """
    P, K, B = D.shape
    N, s = values.shape[1], values.shape[2]
    D = D.clone()
    vals = values.reshape(-1).clone()
    R = (X - torch.bmm(codes_to_dense(values, indices, K), D)).reshape(P * N, B)
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=K).tolist()
    start = 0
    for j in range(K):
        n_j = counts[j]
        if n_j == 0:
            continue
        e = order[start : start + n_j]
        start += n_j
        r = e.div(s, rounding_mode="floor")  # flat row
        p = r.div(N, rounding_mode="floor")  # block
        g = vals[e]
        dj = D[p, j]  # (n, B)
        E = R[r] + g.unsqueeze(1) * dj
        v = torch.zeros(P, B, dtype=D.dtype, device=D.device).index_add_(0, p, g.unsqueeze(1) * E)
        nv = v.norm(dim=1, keepdim=True)
        d_new = torch.where(nv > 0, v / nv.clamp_min(1e-300), D[:, j])
        dp = d_new[p]
        g_new = (E * dp).sum(dim=1)
        R[r] = E - g_new.unsqueeze(1) * dp
        vals[e] = g_new
        D[:, j] = d_new
    return D, vals.view_as(values)


# ----------------------------------------------------------------------------- learning


def learn_dictionary(
    X: torch.Tensor,
    atoms: int,
    nnz: int,
    *,
    iters: int = 8,
    method: str = "mod",
    init: str | torch.Tensor = "data",
    dtype: torch.dtype | None = None,
    omp_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> DictionaryResult:
    """Learn one dictionary per problem for signals X (P, N, B), ``nnz`` atoms per signal.

    Args:
        atoms: K, atoms per dictionary (``K >= nnz``; K > B is an overcomplete dictionary).
        iters: rounds of (dictionary update, OMP coding) after the initial coding.
        method: ``"mod"`` or ``"ksvd"`` (see the module doc).
        init: ``"data"`` (K random distinct rows), ``"svd"`` (right singular vectors, then rows)
            or a (P, K, B) / (K, B) dictionary to warm-start from (renormalised).
        dtype: working dtype of X and D (float32 default, float64 allowed).
        omp_dtype: OMP precision (default ``dtype``).
        seed: for the random choices of ``init="data"`` and re-seeding; results are deterministic.
    """
    if X.dim() != 3:
        raise FactorizeError(f"learn_dictionary: X must be (P, N, B), got shape {tuple(X.shape)}")
    check_int("learn_dictionary", "atoms", atoms)
    check_int("learn_dictionary", "nnz", nnz)
    if nnz > atoms:
        raise FactorizeError(f"learn_dictionary: nnz={nnz} non-zeros per row need at least that many atoms, got K={atoms}")
    check_int("learn_dictionary", "iters", iters, minimum=0)
    if method not in METHODS:
        raise FactorizeError(f"learn_dictionary: method must be one of {METHODS}, got {method!r}")
    work = dtype or torch.float32
    if work not in (torch.float32, torch.float64):
        raise FactorizeError(f"learn_dictionary: dtype must be float32 or float64, got {work}")
    X = X.to(work)
    if not bool(torch.isfinite(X).all()):
        raise FactorizeError("learn_dictionary: the signals hold NaN or Inf")
    odt = omp_dtype or work
    gen = torch.Generator().manual_seed(int(seed))

    x2 = X.double().pow(2).sum(dim=-1)  # (P, N) squared row norms
    total = x2.sum().clamp_min(1e-300)
    D = _init_dictionary(X, atoms, init, gen)
    values, indices, row_err = _code(X, D, nnz, odt, x2)
    errors = [math.sqrt(float(row_err.sum() / total))]

    for _ in range(iters):
        if method == "mod":
            D, values = _mod_update(X, D, values, indices)
        else:
            D, values = _ksvd_update(X, D, values, indices)
        D = _reseed_unused(X, D, values, indices, gen)
        old_err = _rows_error(X, D, values, indices).double()
        new_values, new_indices, new_err = _code(X, D, nnz, odt, x2)
        better = new_err < old_err
        values = torch.where(better.unsqueeze(-1), new_values, values)
        indices = torch.where(better.unsqueeze(-1), new_indices, indices)
        row_err = torch.where(better, new_err, old_err)
        errors.append(math.sqrt(float(row_err.sum() / total)))

    return DictionaryResult(dictionary=D, values=values, indices=indices, errors=errors)


def factorize_ds(
    W: torch.Tensor,
    block: int,
    atoms: int,
    nnz: int,
    *,
    iters: int = 8,
    method: str = "mod",
    init: str | torch.Tensor = "data",
    dtype: torch.dtype | None = None,
    omp_dtype: torch.dtype | None = None,
    seed: int = 0,
    name: str = "weight",
) -> DSFactors:
    """DSFormer factors of a weight W (out x in): blocks of ``block`` input columns, ``atoms``
    atoms per block dictionary, ``nnz`` non-zeros per row of every block.

    Returns :class:`DSFactors` in ``W``'s floating dtype (float32 for other dtypes), with the
    relative Frobenius error of the whole weight. ``name`` labels error messages.
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise FactorizeError(f"{name}: DS factorization needs a 2-D weight (out x in), got {getattr(W, 'shape', W)!r}")
    out_f, in_f = W.shape
    check_int(name, "block", block)
    if in_f % block:
        raise FactorizeError(f"{name}: block must be a positive int dividing in_features={in_f}, got {block!r}")
    check_int(name, "atoms", atoms)
    check_int(name, "nnz", nnz, maximum=atoms, maximum_name="atoms")
    if not bool(torch.isfinite(W).all()):
        raise FactorizeError(f"{name}: the weight holds NaN or Inf")
    if isinstance(init, torch.Tensor) and init.shape != (in_f // block, atoms, block):
        raise FactorizeError(
            f"{name}: initial dictionary must be (nb, K, B) = {(in_f // block, atoms, block)}, got {tuple(init.shape)}"
        )
    out_dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    X = ds_blocks(W.detach().to(dtype or torch.float32), block)
    res = learn_dictionary(
        X, atoms, nnz, iters=iters, method=method, init=init, dtype=dtype, omp_dtype=omp_dtype, seed=seed
    )
    f = DSFactors(
        dictionary=res.dictionary.to(out_dtype),
        values=res.values.to(out_dtype),
        indices=res.indices,
        errors=res.errors,
    )
    f.error = relative_error(W, f)
    return f
