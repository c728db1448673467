"""Batched OMP against scikit-learn, on planted problems and on degenerate input."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

from stackcomp.errors import StackcompError
from stackcomp.factorize.omp import FactorizeError, codes_to_dense, omp, sparse_code


def _unit_dict(K, B, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(K, B, generator=g, dtype=dtype)
    return D / D.norm(dim=1, keepdim=True)


def _sklearn(D, X, s):
    D, X = D.double().numpy(), X.double().numpy()
    C = orthogonal_mp_gram(D @ D.T, D @ X.T, n_nonzero_coefs=s)  # (K, N)
    return torch.from_numpy(np.ascontiguousarray(C.T))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4), (torch.float64, 1e-9)])
def test_matches_sklearn_supports_and_coefficients(dtype, atol):
    K, B, N, s = 48, 32, 300, 6
    D = _unit_dict(K, B, 0)
    X = torch.randn(N, B, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _sklearn(D, X, s)
    vals, idx = sparse_code(X, D, s, dtype=dtype)
    ours = codes_to_dense(vals.double(), idx, K)
    assert torch.equal(ours != 0, ref != 0)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


def test_batched_problems_each_match_sklearn():
    P, K, B, N, s = 3, 24, 16, 50, 4
    D = torch.stack([_unit_dict(K, B, 10 + p) for p in range(P)])
    X = torch.randn(P, N, B, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    vals, idx = sparse_code(X, D, s, dtype=torch.float64)
    assert vals.shape == idx.shape == (P, N, s) and idx.dtype == torch.long
    for p in range(P):
        torch.testing.assert_close(codes_to_dense(vals[p], idx[p], K), _sklearn(D[p], X[p], s), atol=1e-9, rtol=0)


def test_atom_norms_are_not_assumed_unit():
    K, B, N, s = 40, 20, 100, 5
    D = _unit_dict(K, B, 3)
    scale = torch.rand(K, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 10 + 0.1
    X = torch.randn(N, B, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v1, i1 = sparse_code(X, D, s, dtype=torch.float64)
    v2, i2 = sparse_code(X, D * scale[:, None], s, dtype=torch.float64)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(v2, v1 / scale[i1])


def test_planted_sparse_recovery_is_exact():
    K, B, N, s = 512, 64, 200, 4
    D = _unit_dict(K, B, 6, torch.float32)
    g = torch.Generator().manual_seed(7)
    true_idx = torch.stack([torch.randperm(K, generator=g)[:s] for _ in range(N)])
    true_val = (torch.rand(N, s, generator=g) + 0.5) * torch.where(torch.rand(N, s, generator=g) < 0.5, -1.0, 1.0)
    X = codes_to_dense(true_val, true_idx, K) @ D
    vals, idx = sparse_code(X, D, s)
    assert torch.equal(idx.sort(dim=1).values, true_idx.sort(dim=1).values)
    torch.testing.assert_close(codes_to_dense(vals, idx, K), codes_to_dense(true_val, true_idx, K), atol=1e-4, rtol=0)


def _distinct(idx):
    srt = idx.sort(dim=-1).values
    return bool((srt[..., 1:] != srt[..., :-1]).all())


def test_zero_rows_give_zero_values_and_distinct_indices():
    K, B, s = 16, 8, 5
    D = _unit_dict(K, B, 8, torch.float32)
    X = torch.randn(6, B)
    X[[1, 4]] = 0
    vals, idx = sparse_code(X, D, s)
    assert torch.isfinite(vals).all() and _distinct(idx)
    assert (vals[[1, 4]] == 0).all() and (vals[[0, 2, 3, 5]] != 0).all()
    assert idx.min() >= 0 and idx.max() < K


def test_duplicate_and_zero_atoms_are_safe():
    K, B, s = 20, 12, 6
    D = _unit_dict(K, B, 9)
    D[5] = D[3]  # duplicate
    D[7] = 0  # zero atom
    D[11] = -2 * D[2]  # dependent, other scale
    g = torch.Generator().manual_seed(10)
    X = 2 * D[3] + 1.5 * D[0] - D[2] + 0.3 * torch.randn(4, B, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        vals, idx = sparse_code(X, D, s, dtype=dtype)
        assert torch.isfinite(vals).all() and _distinct(idx)
        assert not (idx == 7).any() or (vals[idx == 7] == 0).all()
        # no pair of parallel atoms both carry a value
        dense = codes_to_dense(vals.double(), idx, K)
        assert ((dense[:, 3] != 0) & (dense[:, 5] != 0)).sum() == 0
        assert ((dense[:, 2] != 0) & (dense[:, 11] != 0)).sum() == 0
    # Forcing parallel atoms through a warm start: the dependent ones become zero padding.
    forced = torch.tensor([[3, 5, 2, 11]]).expand(X.shape[0], 4)
    for dtype in (torch.float32, torch.float64):
        vals, idx = sparse_code(X, D, s, dtype=dtype, init_support=forced)
        assert torch.isfinite(vals).all() and _distinct(idx)
        assert (vals[:, [1, 3]] == 0).all() and (vals[:, [0, 2]] != 0).all()
    # The padding cannot make the fit worse than sklearn's (which stops early on dependence).
    ref = _sklearn(D, X, s)
    vals, idx = sparse_code(X, D, s, dtype=torch.float64)
    err = (X - codes_to_dense(vals, idx, K) @ D).norm(dim=1)
    err_ref = (X - ref @ D).norm(dim=1)
    assert (err <= err_ref + 1e-9).all()


def test_nnz_at_least_rank_explains_signal_and_pads():
    K, B, s = 16, 8, 12  # rank 8 < s
    D = _unit_dict(K, B, 11)
    X = torch.randn(10, B, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    for dtype, atol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        vals, idx = sparse_code(X, D, s, dtype=dtype)
        assert torch.isfinite(vals).all() and _distinct(idx)
        rec = codes_to_dense(vals.double(), idx, K) @ D
        torch.testing.assert_close(rec, X, atol=atol, rtol=0)
        assert ((vals != 0).sum(dim=1) <= B).all()


def test_bad_input_raises_clear_errors():
    D = _unit_dict(4, 8, 13)
    X = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(FactorizeError, match="K=4"):
        sparse_code(X, D, 5)
    with pytest.raises(StackcompError):
        sparse_code(X, D, 0)
    with pytest.raises(FactorizeError, match="gram"):
        omp(torch.eye(5), torch.randn(3, 4), 2)
    bad = X.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(FactorizeError, match="NaN"):
        sparse_code(bad, D, 2)
    with pytest.raises(FactorizeError, match="init_support"):
        sparse_code(X, D, 2, init_support=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(FactorizeError, match="dtype"):
        sparse_code(X, D, 2, dtype=torch.float16)


def test_deterministic_and_chunking_invariant():
    K, B, N, s = 32, 16, 500, 5
    D = _unit_dict(K, B, 14, torch.float32)
    X = torch.randn(N, B, generator=torch.Generator().manual_seed(15))
    v1, i1 = sparse_code(X, D, s)
    v2, i2 = sparse_code(X, D, s)
    v3, i3 = sparse_code(X, D, s, chunk_size=37)
    assert torch.equal(v1, v2) and torch.equal(i1, i2)
    threads = torch.get_num_threads()
    v4, i4 = sparse_code(X, D, s, num_threads=None)
    assert torch.get_num_threads() == threads and torch.equal(i1, i4)
    torch.testing.assert_close(v1, v4)
    assert torch.equal(i1, i3)
    torch.testing.assert_close(v1, v3, atol=1e-6, rtol=0)


def test_warm_start_semantics():
    K, B, N, s = 32, 16, 80, 5
    D = _unit_dict(K, B, 16)
    X = torch.randn(N, B, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    v, i = sparse_code(X, D, s, dtype=torch.float64)
    # the full previous support reproduces the same code
    vw, iw = sparse_code(X, D, s, dtype=torch.float64, init_support=i)
    assert torch.equal(iw, i)
    torch.testing.assert_close(vw, v)
    # a fixed arbitrary support is kept and its least squares re-solved
    g = torch.Generator().manual_seed(18)
    fixed = torch.stack([torch.randperm(K, generator=g)[:s] for _ in range(N)])
    vf, i_f = sparse_code(X, D, s, dtype=torch.float64, init_support=fixed)
    assert torch.equal(i_f, fixed)
    for n in range(0, N, 17):
        sol = torch.linalg.lstsq(D[fixed[n]].T, X[n].unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(vf[n], sol)
    # a prefix is taken first, then greedy; -1 entries mean "choose greedily"
    vp, ip = sparse_code(X, D, s, dtype=torch.float64, init_support=fixed[:, :2])
    assert torch.equal(ip[:, :2], fixed[:, :2]) and _distinct(ip)
    vn, i_n = sparse_code(X, D, s, dtype=torch.float64, init_support=torch.full((N, 3), -1))
    assert torch.equal(i_n, i)
    # a repeated warm-start atom is skipped, never duplicated
    rep = fixed[:, :2].clone()
    rep[:, 1] = rep[:, 0]
    _, ir = sparse_code(X, D, s, dtype=torch.float64, init_support=rep)
    assert _distinct(ir) and torch.equal(ir[:, 0], rep[:, 0])


def test_shapes_dtypes_and_shared_gram():
    K, B, s = 12, 6, 3
    D = _unit_dict(K, B, 19, torch.float32)
    X = torch.randn(2, 7, B)
    gram = D @ D.T
    v_shared, i_shared = omp(gram, X @ D.T, s)  # one gram for every problem
    v_batched, i_batched = sparse_code(X, D.expand(2, K, B), s)
    assert v_shared.shape == (2, 7, s) and torch.equal(i_shared, i_batched)
    torch.testing.assert_close(v_shared, v_batched)
    v64, _ = omp(gram.double(), (X @ D.T).double(), s)
    assert v64.dtype == torch.float64
    vh, _ = omp(gram, (X @ D.T).half(), s)
    assert vh.dtype == torch.float16
    v0, i0 = omp(gram, torch.zeros(2, 0, K), s)  # no signals at all
    assert v0.shape == i0.shape == (2, 0, s)
    v, i, e = omp(gram, X @ D.T, s, return_energy=True)
    rec = torch.bmm(codes_to_dense(v, i, K), D.expand(2, K, B))
    torch.testing.assert_close(e, rec.pow(2).sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    K, B, N, s = 64, 32, 1000, 8
    D = _unit_dict(K, B, 20, torch.float32)
    X = torch.randn(N, B, generator=torch.Generator().manual_seed(21))
    v, i = sparse_code(X, D, s)
    vc, ic = sparse_code(X.cuda(), D.cuda(), s)
    assert (ic.cpu() == i).all(dim=1).float().mean() > 0.99
    same = (ic.cpu() == i).all(dim=1)
    torch.testing.assert_close(vc.cpu()[same], v[same], atol=1e-4, rtol=0)
