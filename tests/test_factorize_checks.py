"""The integer checks the numerics share: bools and out-of-range values are refused by name."""

from __future__ import annotations

import pytest
import torch

from stackcomp.factorize.budget import ds_bytes, index_bits_for, index_dtype
from stackcomp.factorize.checks import check_int
from stackcomp.factorize.dictionary import factorize_ds, learn_dictionary
from stackcomp.factorize.omp import FactorizeError


@pytest.mark.parametrize("v,kw,msg", [
    (True, {}, "k must be a positive int, got True"),
    (0, {}, "k must be a positive int, got 0"),
    (2.0, {}, "k must be a positive int, got 2.0"),
    (-1, {"minimum": 0}, "k must be an int >= 0, got -1"),
    (5, {"maximum": 4, "maximum_name": "atoms"}, r"k must be an int in \[1, atoms=4\], got 5"),
])
def test_check_int_refuses_with_one_message_shape(v, kw, msg):
    with pytest.raises(FactorizeError, match=f"^who: {msg}$"):
        check_int("who", "k", v, **kw)


def test_check_int_accepts_the_bounds():
    check_int("w", "k", 1)
    check_int("w", "k", 0, minimum=0)
    check_int("w", "k", 4, maximum=4)


def test_callers_name_the_argument():
    W = torch.randn(8, 16)
    with pytest.raises(FactorizeError, match="layer.q: nnz must be an int in \\[1, atoms=4\\], got 5"):
        factorize_ds(W, 8, 4, 5, name="layer.q")
    with pytest.raises(FactorizeError, match="layer.q: block must be a positive int dividing in_features=16"):
        factorize_ds(W, 5, 4, 2, name="layer.q")
    with pytest.raises(FactorizeError, match="learn_dictionary: iters must be an int >= 0"):
        learn_dictionary(torch.randn(1, 8, 4), 4, 2, iters=-1)
    with pytest.raises(FactorizeError, match="ds_bytes: atoms must be a positive int, got True"):
        ds_bytes(8, 16, 8, True, 1)


@pytest.mark.parametrize("n,dtype,bits", [(1, torch.uint8, 8), (256, torch.uint8, 8), (257, torch.int16, 16),
                                          (1 << 15, torch.int16, 16), ((1 << 15) + 1, torch.int32, 32),
                                          (1 << 31, torch.int32, 32), ((1 << 31) + 1, torch.int64, 64)])
def test_index_dtype_is_the_narrowest_that_holds_n_indices(n, dtype, bits):
    assert index_dtype(n) == dtype and index_bits_for(n) == bits
    assert torch.iinfo(dtype).max >= n - 1
