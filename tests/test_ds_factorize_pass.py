"""The ds_factorize pass on tiny BERT / ALBERT: replaces linears, keeps ALBERT sharing, STF trains."""

import pytest
import torch

from stackcomp.engine import Engine
from stackcomp.errors import PlanError
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.passes.base import PassContext
from stackcomp.passes.ds_factorize import DSFactorizePass
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict
from tests.conftest import make_tiny_model


def test_pass_replaces_encoder_linears_and_reports_vs_svd(tmp_path):
    model = make_tiny_model("bert")
    x = torch.randint(0, 1000, (2, 9))
    p = DSFactorizePass({"block": 16, "atoms": 16, "nnz": 4, "train": {"epochs": 0}})
    ctx = PassContext(stage="ds", work_dir=tmp_path)
    ctx.analysis = p.analyze(model, ctx)
    report = ctx.analysis.report
    assert len(report["layers"]) == 12
    row = report["layers"]["bert.encoder.layer.0.attention.self.query"]
    assert row["block"] == 16 and 0 < row["ds_error"] < 1 and row["svd_error"] > 0
    model = p.transform(model, ctx)
    model = p.finetune(model, ctx)
    ds = [n for n, m in model.named_modules() if isinstance(m, DSLinear)]
    assert len(ds) == 12 and not any("classifier" in n or "pooler" in n for n in ds)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.indices.dtype == torch.uint8
    assert torch.isfinite(model(input_ids=x).logits).all()


def test_albert_shared_layer_is_factorized_once(tmp_path):
    model = make_tiny_model("albert")
    p = DSFactorizePass({"block": 16, "atoms": 16, "nnz": 4, "train": {"epochs": 0}})
    ctx = PassContext(stage="ds", work_dir=tmp_path)
    ctx.analysis = p.analyze(model, ctx)
    model = p.transform(model, ctx)
    ds = [m for m in model.modules() if isinstance(m, DSLinear)]
    assert len(ds) == 6  # one shared ALBERT layer: q, k, v, dense, ffn, ffn_output
    assert len({id(m) for m in ds}) == 6
    # the encoder applies the same (shared) layer twice: one set of factors
    assert model.config.num_hidden_layers == 2


def test_ratio_search_meets_the_budget(tmp_path):
    model = make_tiny_model("bert")
    # 32-wide layers are tiny: a dictionary is a large share of them, so ask for 1.5x
    p = DSFactorizePass({"ratio": 1.5, "candidates": [[8, 8], [16, 16], [8, 16]], "train": {"epochs": 0}, "iters": 1})
    report = p.analyze(model, PassContext(stage="ds", work_dir=tmp_path)).report
    for name, row in report["layers"].items():
        assert row["ratio"] >= 1.5 - 1e-9, name
        assert row["block"] in (8, 16) and row["atoms"] >= 8  # K may grow to fill the budget left by s


@pytest.mark.parametrize("params,needle", [
    ({"block": 16}, "either ratio"),
    ({"ratio": 2.0, "block": 16}, "not both"),
    ({"block": 16, "atoms": 4, "nnz": 8}, "cannot exceed"),
])
def test_params_are_validated(params, needle):
    with pytest.raises(ValueError, match=needle):
        DSFactorizePass(params)


def test_block_must_divide_inputs(tmp_path):
    p = DSFactorizePass({"block": 24, "atoms": 8, "nnz": 2})
    with pytest.raises(PlanError, match="does not divide"):
        p.analyze(make_tiny_model("bert"), PassContext(stage="ds", work_dir=tmp_path))


def test_int8_before_ds_is_refused():
    # the real int8 pass (a fake registered under its name would replace it for later tests)
    r = recipe_from_dict({"name": "x", "model": "m", "task": "glue/sst2", "stages": {
        "q": {"pass": "int8"}, "ds": {"pass": "ds_factorize", "after": "q", "params": {"ratio": 2.0}}}})
    with pytest.raises(PlanError, match="factorize the fp32 weights first"):
        build_plan(r)


@pytest.mark.parametrize("stf", [True, False])
def test_stf_and_frozen_support_train_through_the_engine(tmp_path, tiny_model_dirs, data_env, stf):
    r = recipe_from_dict({
        "name": "ds", "model": str(tiny_model_dirs["bert"]), "task": "glue/sst2", "data": {"max_length": 32},
        "stages": {"ds": {"pass": "ds_factorize", "params": {
            "block": 16, "atoms": 16, "nnz": 4, "iters": 2, "stf": stf,
            "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "eval_every": 2}}}},
    })
    plan = build_plan(r)
    summary = Engine(plan, tmp_path / "run").run()
    ds = next(s for s in summary["stages"] if s["stage"] == "ds")
    assert ds["metrics"]["train_steps"] == 4
    ev = next(s for s in summary["stages"] if s["stage"] == "ds.eval")["metrics"]
    # the saved model is the one the loop evaluated and kept (STF: no final OMP solve after it)
    assert ev["eval_loss"] == pytest.approx(ds["metrics"]["eval_loss"], rel=1e-6, abs=1e-7)
    # exact accounting: the factorized layers' bytes from the pass + the dense pooler and classifier
    import json

    report = json.loads((tmp_path / "run" / "artifacts" / plan.stages["ds"].key / "report.json").read_text())
    ds_bytes = sum(r["bytes"] for r in report["analyze"]["layers"].values())
    dense_rest = (32 * 32 + 32 + 2 * 32 + 2) * 4  # pooler + classifier, fp32
    assert ev["linear_bytes"] == ds_bytes + dense_rest
    from stackcomp import load

    model = load(tmp_path / "run" / "artifacts" / plan.stages["ds"].key)
    layer = model.bert.encoder.layer[1].output.dense
    assert isinstance(layer, DSLinear) and not layer.stf and not hasattr(layer, "weight")
