"""HalfLinear (float16 weights) against nn.Linear with the rounded weight, its bytes, save/load, and
the int8 pass's ``fp16_targets`` (the pooler of a tiny BERT), with the errors it raises."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stackcomp
from stackcomp.artifacts import export_model
from stackcomp.errors import PlanError
from stackcomp.evaluate import size_report
from stackcomp.nn.half import HalfLinear
from stackcomp.nn.lowrank import LayerInputError
from stackcomp.nn.quantized import Int8Linear
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.int8 import Int8Params, Int8Pass

from conftest import make_tiny_model


@pytest.mark.parametrize("bias", [True, False])
def test_it_computes_the_linear_with_its_weight_rounded_to_fp16(bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 10, bias=bias)
    half = HalfLinear.from_linear(linear)
    x = torch.randn(3, 5, 24)
    ref = F.linear(x, linear.weight.detach().half().float(), linear.bias)
    assert torch.equal(half(x), ref)
    w = linear.weight.detach()
    rel = float((half.to_dense() - w).norm() / w.norm())
    assert 0 < rel < 2 ** -11  # 11 significant bits
    st = half.storage()
    assert st.bytes == 24 * 10 * 2 + (10 * 4 if bias else 0)
    assert st.dense_bytes == (24 * 10 + (10 if bias else 0)) * 4
    assert half(x.double()).dtype == torch.float64  # computes in the input's dtype


def test_out_of_range_weights_and_bad_sizes_are_refused():
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight[0, 0] = 1e6
    with pytest.raises(LayerInputError, match="float16's range"):
        HalfLinear.from_linear(linear)
    with pytest.raises(LayerInputError, match=">= 1"):
        HalfLinear(0, 3)


def _int8(model, tmp_path, **params):
    p = Int8Pass({"backend": "torch", **params})
    ctx = PassContext(stage="int8", work_dir=tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    return p.transform(model, ctx), ctx


def test_int8_pass_fp16_targets_store_the_pooler_in_fp16_and_round_trip(tmp_path):
    model, ctx = _int8(make_tiny_model("bert"), tmp_path / "a", fp16_targets=["bert.pooler.dense"])
    plain, _ = _int8(make_tiny_model("bert"), tmp_path / "b")
    assert isinstance(model.bert.pooler.dense, HalfLinear) and isinstance(plain.bert.pooler.dense, nn.Linear)
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, Int8Linear)
    row = ctx.analysis.report["fp16_layers"]["bert.pooler.dense"]
    assert row["bytes_after"] < row["bytes_before"] / 1.9 and row["weight_error"] < 2 ** -11
    hidden = model.config.hidden_size
    assert size_report(plain)["model_bytes"] - size_report(model)["model_bytes"] == hidden * hidden * 2
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        assert torch.allclose(logits, plain(input_ids=ids).logits, atol=1e-3)
        again = stackcomp.load(export_model(model, tmp_path / "saved"))
        assert isinstance(again.bert.pooler.dense, HalfLinear)
        assert torch.equal(again(input_ids=ids).logits, logits)


def test_fp16_targets_errors_name_the_patterns_and_layers(tmp_path):
    with pytest.raises(PlanError, match="match no nn.Linear"):
        _int8(make_tiny_model("bert"), tmp_path, fp16_targets=["bert.nothing"])
    with pytest.raises(PlanError, match="both an int8 target and an fp16 target"):
        _int8(make_tiny_model("bert"), tmp_path, fp16_targets=["*.intermediate.dense"])
    # tables and an fp16 pooler only: no int8 linear
    model, _ = _int8(make_tiny_model("bert"), tmp_path / "c", targets=[], embeddings="int4",
                     fp16_targets=["bert.pooler.dense"])
    assert isinstance(model.bert.pooler.dense, HalfLinear)


def test_fp16_targets_stay_out_of_the_stage_key_when_unset():
    """int8 stages made before fp16_targets existed keep their keys (and cached artifacts)."""
    from stackcomp.plan import params_for_key

    assert "fp16_targets" not in params_for_key(Int8Params(backend="torch"))
    assert params_for_key(Int8Params(backend="torch", fp16_targets=["a"]))["fp16_targets"] == ["a"]
