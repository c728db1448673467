"""Exact byte accounting for DSFormer and rank-r factors, and the choice of (B, K, s) for a budget.

The byte formulas live here, once: what a stored tensor costs (:func:`tensor_bytes`), what the
dense fp32 reference costs (:func:`linear_params`, :data:`FP32_BYTES`, :func:`dense_bytes`), and
what a DS layer costs before it exists (:func:`ds_bytes`). ``LayerStorage`` (``stackcomp.nn``),
the passes and the size report call them; nothing here imports model code.

Conventions (shared with :mod:`stackcomp.factorize.lowrank` and ``LayerStorage``):

* the dense reference is the fp32 ``nn.Linear``: ``(out*in + out) * 4`` bytes with a bias;
* a compressed layer stores its float tensors (dictionary, values, bias; or U, V, bias) at
  ``value_bits`` and its indices at the width of the integer type that actually holds them
  (:func:`index_dtype`): uint8 for K <= 256, int16 for K <= 32768, int32 beyond. ``DSLinear``
  stores its indices with that same type, so these numbers equal its ``storage()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from stackcomp.factorize.checks import check_int
from stackcomp.factorize.dictionary import DSFactors, factorize_ds
from stackcomp.factorize.lowrank import lowrank_bytes
from stackcomp.factorize.omp import FactorizeError

__all__ = [
    "FP32_BYTES",
    "tensor_bytes",
    "linear_params",
    "index_dtype",
    "index_bits_for",
    "dense_bytes",
    "ds_bytes",
    "svd_bytes",
    "svd_rank_for_bytes",
    "ds_max_nnz",
    "ds_max_atoms",
    "DSChoice",
    "search_ds_config",
    "blocklr_bytes",
    "dsf_bytes",
    "sparse_row_bytes",
    "TABLE_FORMATS",
    "embedding_table_bytes",
    "remap_bytes",
    "FP32_BYTES",
    "tensor_bytes",
    "linear_params",
]


#: bytes of one number of the dense reference (fp32)
FP32_BYTES = 4


def tensor_bytes(*tensors: torch.Tensor | None) -> float:
    """Bytes of the given tensors as stored: each at its dtype's width (an int8 entry 1 byte, a
    uint8 index 1 byte, two packed 4-bit codes 1 byte); None (an absent bias) counts nothing."""
    return float(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def linear_params(out_features: int, in_features: int, bias: bool = True) -> int:
    """Numbers in a dense linear: ``out*in`` weights plus ``out`` biases if it has one."""
    return out_features * in_features + (out_features if bias else 0)


def index_dtype(n: int) -> torch.dtype:
    """The narrowest integer type that stores indices 0..n-1 (atoms, rows, columns): uint8,
    int16, int32 or int64. Every layer stores its indices with it."""
    if n <= 1 << 8:
        return torch.uint8
    if n <= 1 << 15:
        return torch.int16
    if n <= 1 << 31:
        return torch.int32
    return torch.int64


def index_bits_for(atoms: int) -> int:
    """Bits per stored index for K atoms (``ceil(log2 K)`` rounded up to the storage type)."""
    return torch.empty((), dtype=index_dtype(atoms)).element_size() * 8


def _check_pos(name: str, **vals: int) -> None:
    for k, v in vals.items():
        check_int(name, k, v)


def dense_bytes(out_features: int, in_features: int, value_bits: int = 32, bias: bool = True) -> float:
    """Bytes of a dense linear (weight + bias) at ``value_bits``."""
    _check_pos("dense_bytes", out_features=out_features, in_features=in_features)
    return linear_params(out_features, in_features, bias) * value_bits / 8


def ds_bytes(
    out_features: int,
    in_features: int,
    block: int,
    atoms: int,
    nnz: int,
    value_bits: int = 32,
    index_bits: int | None = None,
    bias: bool = True,
) -> float:
    """Bytes of a DS layer: dictionaries ``nb*K*B`` and values ``out*nb*s`` (and the bias) at
    ``value_bits``, indices ``out*nb*s`` at ``index_bits`` (default: the storage type's width)."""
    _check_pos("ds_bytes", out_features=out_features, in_features=in_features, block=block, atoms=atoms, nnz=nnz)
    if in_features % block:
        raise FactorizeError(f"ds_bytes: block={block} does not divide in_features={in_features}")
    nb = in_features // block
    ibits = index_bits_for(atoms) if index_bits is None else index_bits
    floats = nb * atoms * block + out_features * nb * nnz + (out_features if bias else 0)
    return floats * value_bits / 8 + out_features * nb * nnz * ibits / 8


def svd_bytes(out_features: int, in_features: int, rank: int, value_bits: int = 32, bias: bool = True) -> float:
    """Bytes of rank-r factors ``U (out x r)``, ``V (r x in)`` plus bias at ``value_bits``."""
    _check_pos("svd_bytes", out_features=out_features, in_features=in_features, rank=rank)
    return lowrank_bytes(out_features, in_features, rank, value_bits, bias)


def blocklr_bytes(out_features: int, in_features: int, grid: tuple[int, int], rank: int, bias: bool = True) -> float:
    """Bytes of a fp32 block low-rank layer on a ``p x q`` grid: ``(rank * (q*out + p*in) + out_bias) * 4``."""
    p, q = grid
    return float((rank * (q * out_features + p * in_features) + (out_features if bias else 0)) * FP32_BYTES)


def sparse_row_bytes(in_features: int, out_features: int) -> int:
    """Bytes one kept row of a row-sparse matrix costs: its fp32 values and its row index."""
    return FP32_BYTES * in_features + torch.empty((), dtype=index_dtype(out_features)).element_size()


#: the stored forms of an embedding table that :func:`embedding_table_bytes` prices
TABLE_FORMATS = ("fp32", "int8", "int4")


def embedding_table_bytes(rows: int, dim: int, fmt: str = "fp32", group_size: int = 64) -> float:
    """Bytes of a ``rows`` x ``dim`` embedding table as stored: ``fp32``; ``int8`` (one byte an entry and
    an fp32 scale per row, ``Int8Embedding``); ``int4`` (two codes a byte and an fp16 scale and offset per
    group of ``min(group_size, dim)`` entries, ``Int4Embedding``; the group must divide ``dim``)."""
    _check_pos("embedding table", rows=rows, dim=dim)
    if fmt == "fp32":
        return float(rows * dim * FP32_BYTES)
    if fmt == "int8":
        return float(rows * dim + rows * FP32_BYTES)
    if fmt == "int4":
        group = min(group_size, dim)
        if group < 1 or dim % group:
            raise ValueError(f"int4 groups of {group_size} do not tile rows of {dim} entries")
        return float(rows * ((dim + 1) // 2) + rows * (dim // group) * 2 * 2)
    raise ValueError(f"table format must be one of {TABLE_FORMATS}, got {fmt!r}")


def remap_bytes(vocab_size: int, kept_rows: int) -> float:
    """Bytes of the id remap of a pruned vocabulary: one row index per vocabulary id, at the width that
    indexes ``kept_rows`` (:func:`index_dtype`)."""
    _check_pos("remap", vocab_size=vocab_size, kept_rows=kept_rows)
    return float(vocab_size * torch.empty((), dtype=index_dtype(kept_rows)).element_size())


def dsf_bytes(out_features: int, in_features: int, nnz: int, a_fraction: float | None, bias: bool = True) -> float:
    """Bytes of a fp32 double-sparse layer ``P Q`` holding ``nnz`` nonzeros split as ``dsf_budget`` does.

    The inner size is ``m = min(out, in)``; the square factor gets ``int(a * m^2)`` nonzeros (it is
    ``P`` when out < in, else ``Q``); values 4 bytes, column indices at the width that indexes
    ``m`` (P) or ``in`` (Q), int32 row pointers for ``out + 1`` and ``m + 1`` rows, fp32 bias.
    """
    m = min(out_features, in_features)
    a = a_fraction if a_fraction is not None else (0.16 if out_features == in_features else 0.25)
    nza = int(m * m * a)
    nzb = nnz - nza
    nnz_p, nnz_q = (nzb, nza) if out_features >= in_features else (nza, nzb)
    ptr = 4 if nnz_p < 1 << 31 and nnz_q < 1 << 31 else 8

    def isize(n: int) -> int:
        return torch.empty((), dtype=index_dtype(n)).element_size()

    return float(nnz_p * (FP32_BYTES + isize(m)) + nnz_q * (FP32_BYTES + isize(in_features))
                 + ptr * (out_features + 1) + ptr * (m + 1) + (FP32_BYTES * out_features if bias else 0))


def svd_rank_for_bytes(
    out_features: int, in_features: int, budget: float, value_bits: int = 32, bias: bool = True
) -> int:
    """The largest rank whose factors fit in ``budget`` bytes (0 if none does)."""
    b = out_features if bias else 0
    per_rank = (out_features + in_features) * value_bits / 8
    return max(0, math.floor((budget - b * value_bits / 8) / per_rank + 1e-9))


def ds_max_nnz(
    out_features: int,
    in_features: int,
    block: int,
    atoms: int,
    budget: float,
    value_bits: int = 32,
    index_bits: int | None = None,
    bias: bool = True,
) -> int:
    """The largest s whose DS layer fits in ``budget`` bytes (0 if none does)."""
    base = ds_bytes(out_features, in_features, block, atoms, 1, value_bits, index_bits, bias)
    step = ds_bytes(out_features, in_features, block, atoms, 2, value_bits, index_bits, bias) - base
    if base > budget:
        return 0
    return 1 + math.floor((budget - base) / step + 1e-9)


def ds_max_atoms(
    out_features: int,
    in_features: int,
    block: int,
    nnz: int,
    budget: float,
    value_bits: int = 32,
    index_bits: int | None = None,
    bias: bool = True,
    max_atoms: int = 256,
) -> int:
    """The largest K <= ``max_atoms`` whose DS layer with ``nnz`` per row fits in ``budget``
    bytes (0 if even K = nnz does not). The index width follows K unless ``index_bits`` is given."""
    lo, hi = 0, max_atoms
    while lo < hi:  # bytes grow with K (index width steps up only at 256 / 32768)
        mid = (lo + hi + 1) // 2
        if mid >= nnz and ds_bytes(out_features, in_features, block, mid, nnz, value_bits, index_bits, bias) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo >= nnz else 0


@dataclass
class DSChoice:
    """The chosen configuration, its bytes and ratio, its (proxy) error and factors, and every
    candidate tried as ``(block, atoms, nnz, bytes, error)``."""

    block: int
    atoms: int
    nnz: int
    bytes: float
    ratio: float
    error: float
    factors: DSFactors
    tried: list[tuple[int, int, int, float, float]] = field(default_factory=list)


def _default_candidates(in_features: int) -> list[tuple[int, int]]:
    out = []
    for B in (16, 32, 64, 128):
        if B <= in_features and in_features % B == 0:
            for K in (B, 2 * B, 4 * B):
                out.append((B, K))
    return out


def search_ds_config(
    W: torch.Tensor,
    target_ratio: float,
    candidates: list[tuple[int, ...]] | None = None,
    *,
    value_bits: int = 32,
    index_bits: int | None = None,
    bias: bool = True,
    iters: int = 2,
    method: str = "mod",
    fill_atoms: bool = True,
    seed: int = 0,
    name: str = "weight",
) -> DSChoice:
    """Pick (B, K, s) for one weight W (out x in) at ``target_ratio`` x smaller than dense fp32.

    The budget is ``dense_bytes(out, in, 32, bias) / target_ratio``. Candidates are ``(B, K)``
    pairs (s = the largest that fits, capped at min(K, B)) or ``(B, K, s)`` triples (skipped when
    over budget); by default B in {16, 32, 64, 128} dividing ``in`` and K in {B, 2B, 4B}. With
    ``fill_atoms`` a pair's K is then raised to the largest that still fits with its s (bytes left
    over by the integer s buy atoms; never past the pair's index width). Each candidate is
    scored by a cheap factorization (``iters`` rounds of ``method``); the least error wins.
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise FactorizeError(f"{name}: search_ds_config needs a 2-D weight, got {getattr(W, 'shape', W)!r}")
    if not (isinstance(target_ratio, (int, float)) and math.isfinite(target_ratio) and target_ratio > 0):
        raise FactorizeError(f"{name}: target_ratio must be a positive number, got {target_ratio!r}")
    out_f, in_f = W.shape
    budget = dense_bytes(out_f, in_f, 32, bias) / target_ratio
    trials: list[tuple[int, int, int]] = []
    for c in candidates if candidates is not None else _default_candidates(in_f):
        if len(c) not in (2, 3):
            raise FactorizeError(f"{name}: a candidate must be (B, K) or (B, K, s), got {c!r}")
        B, K = int(c[0]), int(c[1])
        if B < 1 or K < 1 or in_f % B:
            continue
        if len(c) == 3:
            s = int(c[2])
            if s < 1 or s > K or ds_bytes(out_f, in_f, B, K, s, value_bits, index_bits, bias) > budget:
                continue
        else:
            s = min(ds_max_nnz(out_f, in_f, B, K, budget, value_bits, index_bits, bias), K, B)
            if s < 1:
                continue
            if fill_atoms:
                cap = 256 if K <= 256 else (1 << 15 if K <= 1 << 15 else K)
                K = max(K, ds_max_atoms(out_f, in_f, B, s, budget, value_bits, index_bits, bias, max_atoms=cap))
        trials.append((B, K, s))
    if not trials:
        raise FactorizeError(
            f"{name}: no (B, K, s) candidate fits {target_ratio:g}x ({budget:.0f} bytes) for a {out_f}x{in_f} weight; "
            "try a smaller ratio or other candidates"
        )
    best: DSChoice | None = None
    tried = []
    trials = list(dict.fromkeys(trials))  # filled pairs may coincide
    for B, K, s in trials:
        f = factorize_ds(W, B, K, s, iters=iters, method=method, seed=seed, name=name)
        nbytes = ds_bytes(out_f, in_f, B, K, s, value_bits, index_bits, bias)
        tried.append((B, K, s, nbytes, f.error))
        if best is None or f.error < best.error:
            best = DSChoice(B, K, s, nbytes, dense_bytes(out_f, in_f, 32, bias) / nbytes, f.error, f)
    best.tried = tried
    return best
