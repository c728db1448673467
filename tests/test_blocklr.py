"""Block-wise low rank and Monarch: per-block Eckart-Young, the paper's block-diagonal form, the layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stackcomp.errors import ArtifactError, StackcompError
from stackcomp.factorize.blocklr import (
    blocklr_factors,
    blocklr_matmul,
    blocklr_params,
    blocklr_rank_for_ratio,
    blocklr_to_dense,
    monarch_blockdiag,
    monarch_factors,
    monarch_multiply,
)
from stackcomp.factorize.lowrank import svd_factors
from stackcomp.nn.base import LAYER_TYPES
from stackcomp.nn.lowrank import BlockLowRankLinear


def _eckart_young_sq(M: np.ndarray, k: int) -> float:
    s = np.linalg.svd(M, compute_uv=False)
    return float(np.sum(s[k:] ** 2))


def _blocks_by_slicing(W: np.ndarray, p: int, q: int, interleave: bool):
    """Blocks cut with plain numpy slicing, independent of the library's reshapes."""
    out_f, in_f = W.shape
    d, c = out_f // p, in_f // q
    for a in range(p):
        rows = np.arange(a, out_f, p) if interleave else np.arange(a * d, (a + 1) * d)
        for b in range(q):
            yield a, b, W[np.ix_(rows, np.arange(b * c, (b + 1) * c))]


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("shape,grid,rank", [((24, 18), (2, 3), 2), ((12, 32), (4, 2), 1), ((16, 16), (4, 4), 3)])
def test_blocklr_error_is_per_block_eckart_young(shape, grid, rank, interleave):
    rng = np.random.default_rng(0)
    W = rng.standard_normal(shape) @ np.diag(0.8 ** np.arange(shape[1]))
    U, V = blocklr_factors(torch.tensor(W), grid, rank, interleave_out=interleave)
    approx = blocklr_to_dense(U, V, interleave).numpy()
    bound = sum(_eckart_young_sq(B, rank) for _, _, B in _blocks_by_slicing(W, *grid, interleave))
    assert np.sum((W - approx) ** 2) == pytest.approx(bound, rel=1e-9)
    # each block of the approximation, cut by slicing, is U[a, b] @ V[a, b]
    for a, b, B in _blocks_by_slicing(approx, *grid, interleave):
        np.testing.assert_allclose(B, (U[a, b] @ V[a, b]).numpy(), atol=1e-12)
    x = torch.randn(3, 2, shape[1], dtype=torch.float64)
    torch.testing.assert_close(blocklr_matmul(x, U, V, interleave), x @ torch.tensor(approx).T)


def test_grid_1x1_is_plain_svd():
    W = torch.randn(10, 7, dtype=torch.float64)
    U, V = blocklr_factors(W, (1, 1), 3)
    Us, Vs = svd_factors(W, 3)
    torch.testing.assert_close(blocklr_to_dense(U, V), Us @ Vs)


def test_monarch_matches_papers_blockdiag_form_and_recovers_planted_monarch():
    torch.manual_seed(1)
    n, b = 16, 4  # square, b = sqrt(n): the paper's main case
    # a planted Monarch matrix built from random block-diagonal factors in the paper's layout
    w1 = torch.randn(b, 1 * b, n // b, dtype=torch.float64)
    w2 = torch.randn(b, n // b, b * 1, dtype=torch.float64)
    M = monarch_multiply(torch.eye(n, dtype=torch.float64), w1, w2).T  # column j = M e_j
    U, V = monarch_factors(M, b, rank=1)
    assert torch.linalg.norm(blocklr_to_dense(U, V, True) - M) < 1e-10 * torch.linalg.norm(M)
    # stored numbers: 2 n sqrt(n) = 2 n^2 / b
    assert U.numel() + V.numel() == blocklr_params(n, n, (b, b), 1) == 2 * n * n // b
    # the same matrix is NOT block rank-1 without the output interleave: the permutation matters
    U0, V0 = blocklr_factors(M, (b, b), 1)
    assert torch.linalg.norm(blocklr_to_dense(U0, V0) - M) > 0.1 * torch.linalg.norm(M)
    # the paper's permute/bmm/permute/bmm form equals the block form on any matrix, rectangular, rank 2
    W = torch.randn(12, 20, dtype=torch.float64)
    U, V = monarch_factors(W, (3, 4), rank=2)
    w1, w2 = monarch_blockdiag(U, V)
    assert w1.shape == (4, 2 * 3, 5) and w2.shape == (3, 4, 4 * 2)
    x = torch.randn(7, 20, dtype=torch.float64)
    torch.testing.assert_close(monarch_multiply(x, w1, w2), x @ blocklr_to_dense(U, V, True).T)
    bound = sum(_eckart_young_sq(B, 2) for _, _, B in _blocks_by_slicing(W.numpy(), 3, 4, True))
    assert float(torch.sum((W - blocklr_to_dense(U, V, True)) ** 2)) == pytest.approx(bound, rel=1e-9)


@pytest.mark.parametrize("kind", ["zero", "rank1", "dupcols"])
def test_degenerate_matrices_give_finite_results(kind):
    rng = np.random.default_rng(2)
    W = {"zero": np.zeros((8, 8)),
         "rank1": np.outer(rng.standard_normal(8), rng.standard_normal(8)),
         "dupcols": np.repeat(rng.standard_normal((8, 4)), 2, axis=1)}[kind]
    for interleave in (False, True):
        U, V = blocklr_factors(torch.tensor(W, dtype=torch.float32), (2, 2), 2, interleave_out=interleave)
        assert torch.isfinite(U).all() and torch.isfinite(V).all()
    if kind == "rank1":  # every block of a rank-1 matrix is rank 1: exact
        U, V = monarch_factors(torch.tensor(W), 2, rank=1)
        assert np.abs(blocklr_to_dense(U, V, True).numpy() - W).max() < 1e-12


def test_bad_grid_and_rank():
    W = torch.randn(12, 10)
    with pytest.raises(StackcompError, match="enc.fc.*grid 5x2"):
        blocklr_factors(W, (5, 2), 1, name="enc.fc")
    with pytest.raises(StackcompError, match="block rank"):
        blocklr_factors(W, (2, 2), 6)
    with pytest.raises(StackcompError, match="grid"):
        BlockLowRankLinear(10, 12, (5, 2), 1)


@pytest.mark.parametrize("shape,grid", [((768, 768), (2, 2)), ((768, 768), (4, 4)), ((3072, 768), (4, 2)),
                                        ((768, 3072), (2, 4))])
@pytest.mark.parametrize("ratio", [2.0, 2.8, 3.57])
def test_blocklr_rank_for_ratio_within_2_percent(shape, grid, ratio):
    out_f, in_f = shape
    r = blocklr_rank_for_ratio(out_f, in_f, grid, ratio)
    got = BlockLowRankLinear(in_f, out_f, grid, r).storage().ratio
    assert ratio <= got
    assert BlockLowRankLinear(in_f, out_f, grid, r + 1).storage().ratio < ratio  # the largest such rank
    if grid[0] * grid[1] <= 8:  # one rank step is then < 2% of the budget; a 4x4 grid's step is ~4%
        assert got <= ratio * 1.02


@pytest.mark.parametrize("interleave,bias", [(False, True), (True, False)])
def test_block_lowrank_linear_forward_storage_roundtrip(interleave, bias, tmp_path):
    torch.manual_seed(3)
    lin = torch.nn.Linear(12, 8, bias=bias)
    layer = BlockLowRankLinear.from_linear(lin, (2, 3), 2, interleave_out=interleave)
    x = torch.randn(4, 3, 12)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + (layer.bias if bias else 0))
    # U: 2*3 blocks of 4x2, V: 2*3 blocks of 2x4, bias 8; fp32
    st = layer.storage()
    assert st.params == 6 * 8 + 6 * 8 + (8 if bias else 0) == blocklr_params(8, 12, (2, 3), 2) + (8 if bias else 0)
    assert st.bytes == 4 * st.params and st.dense_params == 96 + (8 if bias else 0)
    entry = json.loads(json.dumps({"type": type(layer).__name__, **layer.manifest()}))
    save_file(dict(layer.state_dict()), str(tmp_path / "w.safetensors"))
    new = LAYER_TYPES[entry.pop("type")].from_manifest(entry)
    new.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    torch.testing.assert_close(new(x), layer(x), rtol=0, atol=0)
    assert new.interleave_out == interleave
    with pytest.raises(ArtifactError, match="grid"):
        BlockLowRankLinear.from_manifest({**entry, "grid": [2]})
