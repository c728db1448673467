"""LoSparse numerics (init, cubic schedule, PLATON importance, row selection) and SparseLowRankLinear."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stackcomp.errors import StackcompError
from stackcomp.factorize.losparse import (
    Importance,
    KeepSchedule,
    losparse_init,
    losparse_rank,
    row_scores,
    select_rows,
)
from stackcomp.nn.base import LAYER_TYPES
from stackcomp.nn.lowrank import SparseLowRankLinear


def test_init_is_svd_plus_residual():
    torch.manual_seed(0)
    W = torch.randn(20, 14, dtype=torch.float64)
    U, V, S = losparse_init(W, 4)
    torch.testing.assert_close(U @ V + S, W)
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    assert float(torch.linalg.norm(S)) == pytest.approx(float(np.sqrt(np.sum(s[4:] ** 2))), rel=1e-10)
    torch.testing.assert_close(U.norm(dim=0), V.norm(dim=1))  # singular values split evenly


def test_rank_formula():
    # ceil(ratio * H*W / (H+W)), the authors' low_rank_parameter_ratio
    assert losparse_rank(768, 768, 0.05) == 20  # 0.05 * 589824 / 1536 = 19.2
    assert losparse_rank(3072, 768, 0.05) == 31  # 0.05 * 2359296 / 3840 = 30.72
    assert losparse_rank(768, 768, 0.1) == math.ceil(0.1 * 768 / 2)
    assert losparse_rank(4, 4, 1.0) == 2


def test_cubic_schedule_values():
    sch = KeepSchedule(total_steps=100, initial_warmup_steps=10, final_warmup_steps=20, final_keep=0.15, delta_t=10)
    hand = {
        0: (1.0, False), 10: (1.0, False),
        11: (0.15 + 0.85 * (69 / 70) ** 3, False),
        20: (0.15 + 0.85 * (60 / 70) ** 3, True),
        45: (0.15 + 0.85 * 0.5**3, False),  # 0.25625
        80: (0.15, True),  # T - t_f: the ramp ends exactly at the final value
        81: (0.15, True), 83: (0.15, True), 100: (0.15, True),
    }
    for step, (keep, mask) in hand.items():
        k, m = sch(step)
        assert k == pytest.approx(keep, abs=1e-12) and m == mask, step
    ks = [sch.keep_fraction(t) for t in range(101)]
    assert all(a >= b for a, b in zip(ks, ks[1:]))  # never grows back
    with pytest.raises(StackcompError, match="total_steps"):
        KeepSchedule(100, 50, 50, 0.1)
    with pytest.raises(StackcompError, match="final_keep"):
        KeepSchedule(100, 10, 10, 0.0)


def _reference_platon(ws, gs, beta1, beta2, delta_t):
    """The importance written out window by window, as the formula reads."""
    sens = [np.abs(w * g) for w, g in zip(ws, gs)]
    ema = np.zeros_like(sens[0])
    unc = np.zeros_like(sens[0])
    n = len(sens)
    starts = list(range(0, n, delta_t))
    window = np.zeros_like(sens[0])  # the window before step 0 is empty (zeros)
    for s0 in starts:
        ema = beta1 * ema + (1 - beta1) * window
        unc = beta2 * unc + (1 - beta2) * np.abs(window - ema)
        window = np.mean(sens[s0:min(s0 + delta_t, n)], axis=0)
    return (ema * unc) if beta2 < 1 else ema


@pytest.mark.parametrize("beta2", [1.0, 0.7])
def test_importance_matches_windowed_ema(beta2):
    rng = np.random.default_rng(1)
    steps, delta_t = 23, 4
    ws = [rng.standard_normal((5, 3)) for _ in range(steps)]
    gs = [rng.standard_normal((5, 3)) for _ in range(steps)]
    imp = Importance(beta1=0.85, beta2=beta2, delta_t=delta_t)
    for t in range(steps):
        imp.update(t, torch.tensor(ws[t]), torch.tensor(gs[t]))
    # windows enter the EMA when the next one starts: the last window start (step `last`) closes
    # every earlier window, and the steps after it are still pending in the open window
    last = (steps - 1) // delta_t * delta_t
    ref = _reference_platon(ws[:last + 1], gs[:last + 1], 0.85, beta2, delta_t)
    np.testing.assert_allclose(imp.score().double().numpy(), ref, rtol=1e-6)


def test_importance_ranks_sensitive_rows_first():
    torch.manual_seed(2)
    imp = Importance(delta_t=2)
    scale = torch.tensor([0.1, 5.0, 1.0, 0.01]).unsqueeze(1)  # row 1 matters most, row 3 least
    for t in range(20):
        imp.update(t, torch.randn(4, 6) * scale, torch.randn(4, 6))
    keep = select_rows({"s": row_scores(imp.score())}, 0.5)["s"]
    assert keep.tolist() == [False, True, True, False]


def test_select_rows_keeps_exactly_the_scheduled_count():
    torch.manual_seed(3)
    scores = {"a": torch.rand(40), "b": torch.rand(40), "c": torch.rand(40)}
    for keep in (1.0, 0.5, 0.15, 0.155, 0.29, 0.0):
        want = math.ceil(keep * 120 - 1e-9)
        masks = select_rows(scores, keep)
        assert sum(int(m.sum()) for m in masks.values()) == want
        kept = torch.cat([scores[n][masks[n]] for n in scores])
        dropped = torch.cat([scores[n][~masks[n]] for n in scores])
        if kept.numel() and dropped.numel():
            assert dropped.max() <= kept.min()
        for n, m in select_rows(scores, keep, scope="layer").items():
            assert int(m.sum()) == math.ceil(keep * 40 - 1e-9)
            assert np.max(scores[n][~m].numpy(), initial=-1) <= np.min(scores[n][m].numpy(), initial=2)


def test_select_rows_global_with_mixed_widths():
    torch.manual_seed(4)
    scores = {"q": torch.rand(16), "fc2": torch.rand(8)}
    widths = {"q": 16, "fc2": 64}
    total = 16 * 16 + 8 * 64
    for keep in (0.2, 0.5, 0.8):
        masks = select_rows(scores, keep, widths=widths)
        removed = int((~masks["q"]).sum()) * 16 + int((~masks["fc2"]).sum()) * 64
        budget = math.floor(total * (1 - keep))
        assert removed <= budget
        # the lowest-scoring kept row would not have fitted
        kept = [(float(scores[n][i]), widths[n]) for n in scores for i in torch.nonzero(masks[n]).flatten().tolist()]
        assert removed + min(kept)[1] > budget
        dropped = [float(scores[n][i]) for n in scores for i in torch.nonzero(~masks[n]).flatten().tolist()]
        assert not dropped or max(dropped) <= min(kept)[0]


def test_ties_are_deterministic():
    scores = {"a": torch.zeros(5), "b": torch.zeros(5)}
    m = select_rows(scores, 0.5)
    assert m["a"].tolist() == [False] * 5 and m["b"].tolist() == [True] * 5


# ----------------------------------------------------------------------------- layer


def _roundtrip(layer, tmp_path):
    entry = json.loads(json.dumps({"type": type(layer).__name__, **layer.manifest()}))
    save_file(dict(layer.state_dict()), str(tmp_path / "w.safetensors"))
    new = LAYER_TYPES[entry.pop("type")].from_manifest(entry)
    new.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    return new


def test_sparse_lowrank_linear_training_masking_then_pruning(tmp_path):
    torch.manual_seed(5)
    lin = torch.nn.Linear(10, 12)
    layer = SparseLowRankLinear.from_linear(lin, 3)
    x = torch.randn(2, 4, 10)
    # at init the layer IS the dense layer (UV + S = W)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    keep = select_rows({"s": torch.rand(12)}, 0.25)["s"]  # ceil(3) rows
    layer.zero_rows_(keep)
    masked_dense = layer.to_dense()
    small = layer.prune_rows(keep)
    assert small.n_rows == 3 and small.row_index.tolist() == torch.nonzero(keep).flatten().tolist()
    assert small.row_index.dtype == torch.uint8
    torch.testing.assert_close(small.to_dense(), masked_dense)
    torch.testing.assert_close(small(x), x @ small.to_dense().T + small.bias)
    torch.testing.assert_close(small(x), layer(x))
    # prune_rows() without a mask drops exactly the zeroed rows
    assert layer.prune_rows().row_index.tolist() == small.row_index.tolist()
    # storage by hand: U 12x3, V 3x10, 3 rows of 10, bias 12 (fp32) + 3 uint8 indices
    st = small.storage()
    assert st.params == 36 + 30 + 30 + 12
    assert st.bytes == 4 * st.params + 3
    assert st.dense_params == 120 + 12
    new = _roundtrip(small, tmp_path)
    torch.testing.assert_close(new(x), small(x), rtol=0, atol=0)
    assert new.row_index.tolist() == small.row_index.tolist()


def test_sparse_lowrank_linear_wide_index_and_errors():
    layer = SparseLowRankLinear(8, 300, 2, 300, bias=False)
    assert layer.row_index.dtype == torch.int16
    assert layer.storage().bytes == 4 * (600 + 16 + 2400) + 2 * 300
    with pytest.raises(StackcompError, match="row indices"):
        layer.prune_rows(torch.tensor([5, 300]))
    with pytest.raises(StackcompError, match="boolean"):
        layer.zero_rows_(torch.ones(299, dtype=torch.bool))
