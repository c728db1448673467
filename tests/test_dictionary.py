"""Dictionary learning (MOD, approximate K-SVD), DS factorization and byte accounting."""

import math

import pytest
import torch

from stackcomp.factorize import dictionary as dl
from stackcomp.factorize.budget import (
    dense_bytes,
    ds_bytes,
    ds_max_atoms,
    ds_max_nnz,
    index_bits_for,
    index_dtype,
    search_ds_config,
    svd_bytes,
    svd_rank_for_bytes,
)
from stackcomp.factorize.dictionary import (
    DSFactors,
    ds_blocks,
    factorize_ds,
    learn_dictionary,
    normalize_rows,
    relative_error,
)
from stackcomp.factorize.omp import FactorizeError, codes_to_dense, sparse_code


def _planted(P, K, B, N, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    D, _ = normalize_rows(torch.randn(P, K, B, generator=g, dtype=torch.float64))
    idx = torch.stack([torch.stack([torch.randperm(K, generator=g)[:s] for _ in range(N)]) for _ in range(P)])
    val = (torch.rand(P, N, s, generator=g, dtype=torch.float64) + 0.5) * torch.sign(
        torch.randn(P, N, s, generator=g, dtype=torch.float64)
    )
    X = torch.bmm(codes_to_dense(val, idx, K), D)
    return X, D, val, idx


def _err(X, D, v, i):
    return float((X - torch.bmm(codes_to_dense(v.to(D.dtype), i, D.shape[1]), D)).norm())


@pytest.mark.parametrize("method", ["mod", "ksvd"])
def test_error_decreases_monotonically_on_planted_problem(method):
    # B=16, K=24, s=2: incoherent enough for OMP to recover codes over the true dictionary
    X, _, _, _ = _planted(P=2, K=24, B=16, N=600, s=2)
    res = learn_dictionary(X.float(), 24, 2, iters=8, method=method)
    e = res.errors
    assert len(e) == 9
    assert all(b <= a + 1e-6 for a, b in zip(e, e[1:])), e
    assert e[-1] < 0.4 * e[0], e
    D = res.dictionary
    torch.testing.assert_close(D.norm(dim=-1), torch.ones(2, 24), atol=1e-5, rtol=0)
    # the reported error is the error of the returned factors
    assert math.isclose(_err(X.float(), D, res.values, res.indices) / float(X.float().norm()), e[-1], rel_tol=1e-4)


def test_mod_update_is_the_least_squares_dictionary():
    X, _, _, _ = _planted(P=2, K=10, B=6, N=80, s=3, seed=1)
    D0, _ = normalize_rows(torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    v, i = sparse_code(X, D0, 3, dtype=torch.float64)
    D1, v1 = dl._mod_update(X, D0, v, i)
    C = codes_to_dense(v, i, 10)
    D_ls = torch.linalg.lstsq(C, X).solution  # (P, K, B)
    # same product, unit rows
    torch.testing.assert_close(torch.bmm(codes_to_dense(v1, i, 10), D1), torch.bmm(C, D_ls), atol=1e-9, rtol=0)
    torch.testing.assert_close(D1.norm(dim=-1), torch.ones(2, 10, dtype=torch.float64))


def _ksvd_reference(X, D, v, idx):
    """Approximate K-SVD sweep written plainly after NOTES 1.4, one block at a time."""
    D = D.clone()
    P, K, _ = D.shape
    C = codes_to_dense(v, idx, K)
    for p in range(P):
        for j in range(K):
            rows = (idx[p] == j).any(dim=1).nonzero().flatten()
            if rows.numel() == 0:
                continue
            g = C[p, rows, j].clone()
            E = X[p, rows] - C[p, rows] @ D[p] + torch.outer(g, D[p, j])
            d = E.T @ g
            if d.norm() > 0:
                D[p, j] = d / d.norm()
            C[p, rows, j] = E @ D[p, j]
    return D, C


def test_ksvd_sweep_matches_plain_reference_and_does_not_increase_error():
    X, _, _, _ = _planted(P=2, K=12, B=8, N=60, s=3, seed=3)
    D0, _ = normalize_rows(torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    v, i = sparse_code(X, D0, 3, dtype=torch.float64)
    D1, v1 = dl._ksvd_update(X, D0, v, i)
    D_ref, C_ref = _ksvd_reference(X, D0, v, i)
    torch.testing.assert_close(D1, D_ref)
    torch.testing.assert_close(codes_to_dense(v1, i, 12), C_ref)
    assert _err(X, D1, v1, i) <= _err(X, D0, v, i)


def test_svd_init_with_full_codes_reaches_the_eckart_young_bound():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(40, 24, generator=g, dtype=torch.float64)
    B, r = 8, 3
    f = factorize_ds(W, B, r, r, iters=0, init="svd", dtype=torch.float64)
    bound = 0.0
    for b in range(W.shape[1] // B):
        S = torch.linalg.svdvals(W[:, b * B : (b + 1) * B])
        bound += float(S[r:].pow(2).sum())
    assert math.isclose(f.error, math.sqrt(bound) / float(W.norm()), rel_tol=1e-9)


def test_factorize_ds_layout_and_reconstruction():
    # A weight that is exactly DS-factorizable: planted blocks laid side by side.
    X, _, _, _ = _planted(P=2, K=24, B=16, N=500, s=2, seed=6)
    W = X.permute(1, 0, 2).reshape(500, 32).float()
    torch.testing.assert_close(ds_blocks(W, 16), X.float())
    f = factorize_ds(W, 16, 24, 2, iters=8)
    assert isinstance(f, DSFactors) and (f.block, f.atoms, f.nnz) == (16, 24, 2)
    assert f.dictionary.shape == (2, 24, 16) and f.values.shape == (2, 500, 2) and f.indices.shape == (2, 500, 2)
    assert f.values.dtype == torch.float32 and f.indices.dtype == torch.long
    # block b of the reconstruction is C_b @ D_b, written out by hand
    W_hat = f.to_dense()
    for b in range(2):
        Cb = torch.zeros(500, 24)
        Cb.scatter_(1, f.indices[b], f.values[b])
        torch.testing.assert_close(W_hat[:, b * 16 : (b + 1) * 16], Cb @ f.dictionary[b], atol=1e-5, rtol=0)
    assert math.isclose(relative_error(W, f), f.error, rel_tol=1e-5)
    assert f.error == pytest.approx(f.errors[-1], rel=1e-3)
    assert f.error < 0.4 * f.errors[0]


def test_warm_start_from_a_given_dictionary():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(50, 16, generator=g)
    D0 = torch.randn(2, 10, 8, generator=g)
    f = factorize_ds(W, 8, 10, 3, iters=0, init=D0)
    Dn, _ = normalize_rows(D0)
    torch.testing.assert_close(f.dictionary, Dn)
    v, i = sparse_code(ds_blocks(W, 8), Dn, 3)
    assert torch.equal(f.indices, i)
    # more rounds from there do not get worse, and are deterministic
    f2 = factorize_ds(W, 8, 10, 3, iters=3, init=D0, method="ksvd")
    f3 = factorize_ds(W, 8, 10, 3, iters=3, init=D0, method="ksvd")
    assert f2.error <= f.error + 1e-6 and torch.equal(f2.indices, f3.indices)


def test_degenerate_weights_stay_finite():
    W = torch.zeros(20, 16)
    W[3] = torch.randn(16, generator=torch.Generator().manual_seed(3))  # almost all rows zero, fewer rows than atoms
    for method in ("mod", "ksvd"):
        f = factorize_ds(W, 8, 32, 4, iters=2, method=method)
        assert torch.isfinite(f.dictionary).all() and torch.isfinite(f.values).all()
        torch.testing.assert_close(f.dictionary.norm(dim=-1), torch.ones(2, 32), atol=1e-5, rtol=0)
        assert f.error < 1e-5
    f = factorize_ds(torch.zeros(6, 8), 8, 4, 2, iters=1)
    assert f.error == 0.0 and (f.values == 0).all()


def test_bad_input_raises():
    W = torch.randn(8, 12)
    with pytest.raises(FactorizeError, match="block"):
        factorize_ds(W, 5, 8, 2)
    with pytest.raises(FactorizeError, match="nnz"):
        factorize_ds(W, 4, 3, 4)
    with pytest.raises(FactorizeError, match="method"):
        factorize_ds(W, 4, 8, 2, method="svd")
    with pytest.raises(FactorizeError, match="2-D"):
        factorize_ds(W[None], 4, 8, 2)
    with pytest.raises(FactorizeError, match="initial dictionary"):
        factorize_ds(W, 4, 8, 2, init=torch.randn(2, 8, 4))


# ----------------------------------------------------------------------------- budget


def test_byte_counts_by_hand():
    # 768x768, B=64 -> 12 blocks; K=128 (uint8 indices), s=16
    floats = 12 * 128 * 64 + 768 * 12 * 16 + 768
    assert ds_bytes(768, 768, 64, 128, 16) == floats * 4 + 768 * 12 * 16 * 1
    assert ds_bytes(768, 768, 64, 128, 16, bias=False) == (floats - 768) * 4 + 768 * 12 * 16
    assert ds_bytes(768, 768, 64, 128, 16, value_bits=16) == floats * 2 + 768 * 12 * 16
    # K=300 needs int16 indices, K=256 still uint8
    assert index_dtype(256) == torch.uint8 and index_bits_for(256) == 8
    assert index_dtype(300) == torch.int16 and index_bits_for(300) == 16
    assert index_dtype(40000) == torch.int32 and index_bits_for(40000) == 32
    assert ds_bytes(64, 128, 32, 300, 4) == (4 * 300 * 32 + 64 * 4 * 4 + 64) * 4 + 64 * 4 * 4 * 2
    assert ds_bytes(64, 128, 32, 300, 4, index_bits=9) == (4 * 300 * 32 + 64 * 4 * 4 + 64) * 4 + 64 * 4 * 4 * 9 / 8
    assert svd_bytes(768, 3072, 100) == (100 * (768 + 3072) + 768) * 4
    assert dense_bytes(768, 3072) == (768 * 3072 + 768) * 4
    with pytest.raises(FactorizeError, match="divide"):
        ds_bytes(10, 30, 8, 4, 2)


def test_largest_rank_and_nnz_that_fit():
    budget = dense_bytes(384, 1536) / 2
    r = svd_rank_for_bytes(384, 1536, budget)
    assert svd_bytes(384, 1536, r) <= budget < svd_bytes(384, 1536, r + 1)
    for B, K in ((16, 32), (32, 64), (64, 128)):
        s = ds_max_nnz(384, 1536, B, K, budget)
        assert ds_bytes(384, 1536, B, K, s) <= budget < ds_bytes(384, 1536, B, K, s + 1)
    assert ds_max_nnz(384, 1536, 64, 256, budget) == 0  # the dictionaries alone are over budget
    for B, s in ((16, 5), (32, 10), (64, 20)):
        K = ds_max_atoms(384, 1536, B, s, budget)
        assert ds_bytes(384, 1536, B, K, s) <= budget < ds_bytes(384, 1536, B, K + 1, s)
    # crossing 256 atoms widens every index to int16: the cap keeps uint8
    assert ds_max_atoms(64, 4096, 16, 1, 1e9) == 256
    assert ds_max_atoms(64, 4096, 16, 1, 1e9, max_atoms=1000) == 1000
    assert ds_max_atoms(384, 1536, 64, 40, 1000.0) == 0


def test_search_picks_the_planted_configuration():
    X, _, _, _ = _planted(P=2, K=24, B=16, N=300, s=2, seed=8)
    W = X.permute(1, 0, 2).reshape(300, 32).float()
    ratio = dense_bytes(300, 32) / ds_bytes(300, 32, 16, 24, 2) * 0.999
    cands = [(16, 24, 2), (16, 12, 2), (8, 12, 1), (32, 8, 2), (16, 24, 3)]
    choice = search_ds_config(W, ratio, cands, iters=8)
    assert (choice.block, choice.atoms, choice.nnz) == (16, 24, 2)
    assert choice.bytes == ds_bytes(300, 32, 16, 24, 2)
    assert choice.ratio == pytest.approx(dense_bytes(300, 32) / choice.bytes)
    assert choice.error == min(t[4] for t in choice.tried)
    assert all(t[3] <= dense_bytes(300, 32) / ratio for t in choice.tried)
    assert (16, 24, 3) not in [t[:3] for t in choice.tried]  # over budget, skipped
    with pytest.raises(FactorizeError, match="no \\(B, K, s\\) candidate"):
        search_ds_config(W, 1000.0, cands)
    # (B, K) pairs get the largest s that fits
    pair = search_ds_config(W, ratio, [(16, 24)], iters=1)
    assert pair.nnz == ds_max_nnz(300, 32, 16, 24, dense_bytes(300, 32) / ratio) == 2
    # ... and, with fill_atoms, as many atoms as the bytes left over buy
    loose = search_ds_config(W, 2.0, [(16, 8)], iters=1)
    budget = dense_bytes(300, 32) / 2.0
    assert loose.nnz == ds_max_nnz(300, 32, 16, 8, budget)
    assert loose.atoms == ds_max_atoms(300, 32, 16, loose.nnz, budget) > 8
    tight = search_ds_config(W, 2.0, [(16, 8)], iters=1, fill_atoms=False)
    assert tight.atoms == 8 and tight.nnz == loose.nnz
