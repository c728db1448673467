"""The factorizer passes (lowrank, blocklr, losparse, dsf) on tiny BERT, and their shared machinery.

The numerics themselves (Eckart-Young, FWSVD/DRONE optima, DSF monotone objective, LoSparse
schedule and importance) are tested in test_lowrank.py, test_blocklr.py, test_dsf.py and
test_losparse.py; here: the equal-budget solver, calibration statistics, the passes' wiring,
staged mode, reports and artifacts.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from stackcomp.artifacts import export_model, load_model
from stackcomp.errors import FactorizeError, PlanError
from stackcomp.evaluate import linear_storage
from stackcomp.factorize.allocate import Knob, allocate
from stackcomp.nn.lowrank import BlockLowRankLinear, DoubleSparseLinear, LowRankLinear, SparseLowRankLinear
from stackcomp.passes.base import PassContext, run_pass
from stackcomp.passes.blocklr import BlockLRPass
from stackcomp.factorize.budget import dsf_bytes as dsf_cost
from stackcomp.passes.dsf import DSFPass
from stackcomp.passes.factorizer_common import (
    collect_fisher,
    collect_grams,
    forward_order,
    group_layers,
    relative_errors,
    select_targets,
)
from stackcomp.passes.losparse import LoSparsePass
from stackcomp.passes.lowrank import LowRankPass
from tests.conftest import make_tiny_model

NO_TRAIN = {"train": {"epochs": 0}}

# (pass class, params, layer type); small grids keep knob steps under 2% of the tiny budget
CAL = {"calibration_samples": 32, "calibration_batch_size": 16}
METHODS = {
    "svd": (LowRankPass, {"method": "svd", **CAL}, LowRankLinear),
    "fwsvd": (LowRankPass, {"method": "fwsvd", "fisher_batches": 2, "fisher_batch_size": 8, **CAL}, LowRankLinear),
    "drone": (LowRankPass, {"method": "drone", **CAL}, LowRankLinear),
    "blocklr": (BlockLRPass, {"grid": [2, 2], **CAL}, BlockLowRankLinear),
    "monarch": (BlockLRPass, {"monarch": True, "nblocks": 2, **CAL}, BlockLowRankLinear),
    "losparse": (LoSparsePass, CAL, SparseLowRankLinear),
    "dsf": (DSFPass, {"iters": 4, **CAL}, DoubleSparseLinear),
}


@pytest.fixture(scope="module")
def task_data(tiny_glue, minilm_tokenizer_dir):
    from transformers import AutoTokenizer

    from stackcomp.data import TaskData

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    return TaskData("glue/sst2", tok, {"max_length": 32, "data_dir": str(tiny_glue)})


@pytest.fixture
def make_ctx(task_data, tmp_path):
    def make(data: bool = True) -> PassContext:
        if not data:
            return PassContext(stage="f", work_dir=tmp_path)
        return PassContext(stage="f", work_dir=tmp_path, task=task_data.task, tokenizer=task_data.tokenizer,
                           data=task_data)

    return make


def _run(pass_, model, ctx):
    model = run_pass(pass_, model, ctx)
    return model, ctx.analysis.report


def _analyze(pass_, model, ctx):
    """(report, work): what analyze reports and hands to transform."""
    found = pass_.analyze(model, ctx)
    return found.report, found.state["work"]


def _bytes(model, names):
    return sum(linear_storage(model.get_submodule(n)).bytes for n in names)


# ----------------------------------------------------------------------------- the budget solver


def test_allocate_spends_the_budget_to_within_one_step():
    rng = random.Random(0)
    for trial in range(50):
        knobs = []
        for i in range(rng.randint(1, 12)):
            a, b = rng.randint(0, 500), rng.randint(1, 300)
            hi = rng.randint(1, 60)
            dense = rng.randint(2 * (a + b), 4 * (a + b * hi) + 10)
            knobs.append((f"l{i}", a, b, hi, dense))
        ratio = rng.uniform(1.2, 4.0)
        ks = [Knob(n, lambda k, a=a, b=b: a + b * k, 1, hi, d / ratio) for n, a, b, hi, d in knobs]
        budget = sum(d for *_, d in knobs) / ratio
        try:
            got = allocate(ks, budget)
        except FactorizeError:
            assert sum(a + b for _, a, b, _, _ in knobs) > budget  # refused only when even k=1 does not fit
            continue
        spent = sum(a + b * got[n] for n, a, b, _, _ in knobs)
        assert spent <= budget + 1e-9
        left = budget - spent
        # no layer below its cap could still take a step
        for n, a, b, hi, _ in knobs:
            assert 1 <= got[n] <= hi
            if got[n] < hi:
                assert b > left, (trial, n)


def test_allocate_stays_near_each_layers_share():
    ks = [Knob(f"l{i}", lambda k: 10 * k, 1, 1000, 1000.0) for i in range(4)]
    got = allocate(ks, 4000.0)
    assert got == {f"l{i}": 100 for i in range(4)}
    ks = [Knob(f"l{i}", lambda k: 30 * k, 1, 1000, 100.0) for i in range(4)]  # 100/30: 3 each, 40 left
    got = allocate(ks, 400.0)
    assert sorted(got.values()) == [3, 3, 3, 4]


def test_allocate_refuses_an_impossible_budget():
    with pytest.raises(FactorizeError, match="smallest factorization.*over the budget.*l0"):
        allocate([Knob("l0", lambda k: 100 * k, 1, 5, 50.0)], 50.0)


@pytest.mark.parametrize("out_f,in_f", [(300, 600), (600, 300), (260, 260)])
def test_dsf_cost_is_the_layers_storage_with_wide_indices(out_f, in_f):
    """The solver's cost model equals DoubleSparseLinear.storage() (int16 column indices here)."""
    m = min(out_f, in_f)
    a = 0.16 if out_f == in_f else 0.25
    nza, total = int(m * m * a), int(0.3 * out_f * in_f)
    nzb = total - nza

    def sparse(rows, cols, nnz):
        M = torch.zeros(rows * cols)
        M[torch.randperm(rows * cols)[:nnz]] = torch.rand(nnz) + 0.5
        return M.view(rows, cols)

    if out_f >= in_f:  # the work ran on W^T: P = B^T (out x m), Q = A^T (m x in)
        P, Q = sparse(out_f, m, nzb), sparse(m, in_f, nza)
    else:
        P, Q = sparse(out_f, m, nza), sparse(m, in_f, nzb)
    layer = DoubleSparseLinear.from_factors(P, Q, torch.zeros(out_f))
    assert layer.p_col.dtype == torch.int16 and layer.q_col.dtype == torch.int16
    assert layer.storage().bytes == dsf_cost(out_f, in_f, total, None, True)


# ----------------------------------------------------------------------------- calibration helpers


def test_collect_grams_skips_padding_and_shares_qkv(task_data):
    model = make_tiny_model("bert")
    names = [n for n, _ in select_targets(model, None, None, "t")]
    batches = task_data.calibration_batches(12, 5, seed=0)
    grams = collect_grams(model, names, batches)
    q, k, v = (f"bert.encoder.layer.0.attention.self.{x}" for x in ("query", "key", "value"))
    assert grams[q] is grams[k] is grams[v]
    # reference: the layer's inputs, real tokens only
    target = "bert.encoder.layer.1.attention.output.dense"
    xs = []
    h = model.get_submodule(target).register_forward_hook(lambda m, i, o: xs.append(i[0].detach()))
    with torch.no_grad():
        for b in batches:
            xs_before = len(xs)
            model(**{k: v for k, v in b.items() if k != "labels"})
            xs[xs_before] = xs[xs_before][b["attention_mask"].bool()]
    h.remove()
    X = torch.cat(xs).double()
    assert X.shape[0] == int(sum(b["attention_mask"].sum() for b in batches))
    torch.testing.assert_close(grams[target], X.T @ X, rtol=1e-5, atol=1e-5)


def test_forward_order_groups_shared_inputs():
    model = make_tiny_model("bert")
    names = [n for n, _ in select_targets(model, None, None, "t")]
    order, repeated = forward_order(model, names, {"input_ids": torch.randint(0, 1000, (2, 7))})
    assert not repeated
    short = [[n.split("layer.")[1] for n in g] for g in order]
    assert short[:4] == [["0.attention.self.query", "0.attention.self.key", "0.attention.self.value"],
                         ["0.attention.output.dense"], ["0.intermediate.dense"], ["0.output.dense"]]
    assert sum(len(g) for g in order) == len(names) == 12
    albert = make_tiny_model("albert")
    names = [n for n, _ in select_targets(albert, None, None, "t")]
    _, repeated = forward_order(albert, names, {"input_ids": torch.randint(0, 1000, (2, 7))})
    assert repeated  # ALBERT calls its one shared layer twice


def test_collect_fisher_is_mean_squared_batch_gradient(task_data):
    model = make_tiny_model("bert")
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    batches = list(task_data.train_loader(8, seed=1))[:3]
    got = collect_fisher(model, names, batches, n_batches=2)
    assert all(model.get_submodule(n).weight.grad is None for n in names)  # no gradient left behind
    ref = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}
    for b in batches[:2]:
        model.zero_grad()
        model(**b).loss.backward()
        for n in names:
            ref[n] += (model.get_submodule(n).weight.grad.double() ** 2).sum(1) / 2
    for n in names:
        torch.testing.assert_close(got[n], ref[n])
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_group_layers_by_block():
    names = ["m.encoder.layer.0.a", "m.encoder.layer.0.b", "m.encoder.layer.1.a", "m.other"]
    assert group_layers(names, "block") == [names[:2], [names[2]], [names[3]]]
    assert group_layers(names, "layer") == [[n] for n in names]


# ----------------------------------------------------------------------------- every pass


@pytest.mark.parametrize("ratio", [2.0, 2.8])
@pytest.mark.parametrize("method", list(METHODS))
def test_ratio_is_hit_within_2_percent_and_layers_replaced(method, ratio, make_ctx):
    cls, params, layer_type = METHODS[method]
    model = make_tiny_model("bert")
    names = [n for n, _ in select_targets(model, None, None, "t")]
    dense = _bytes(model, names)
    p = cls({**params, "ratio": ratio, **NO_TRAIN})
    model, report = _run(p, model, make_ctx())
    got = dense / _bytes(model, names)
    assert ratio <= got <= 1.02 * ratio, got
    assert all(type(model.get_submodule(n)) is layer_type for n in names)
    assert isinstance(model.classifier, nn.Linear) and isinstance(model.bert.pooler.dense, nn.Linear)
    assert report["targeted_ratio"] == pytest.approx(got)  # LoSparse untrained: the same magnitude selection
    assert report["asked_ratio"] == ratio and report["calibrated"]
    for row in report["layers"].values():
        assert 0 <= row["output_error"] < 1 and 0 < row["weight_error"] < math.inf
        if method in ("svd", "blocklr", "monarch", "losparse"):  # best fits of W itself (per block / at init)
            assert row["weight_error"] < 1  # data-aware ones may trade weight error for output error
    x = torch.randint(0, 1000, (2, 9))
    assert torch.isfinite(model(input_ids=x).logits).all()


def test_report_errors_match_direct_computation(make_ctx, task_data):
    model = make_tiny_model("bert")
    target = "bert.encoder.layer.1.attention.output.dense"
    W = model.get_submodule(target).weight.detach().double().clone()
    batches = task_data.calibration_batches(128, 32, seed=0)  # what the pass uses by default (ctx.seed = 0)
    xs = []
    h = model.get_submodule(target).register_forward_hook(lambda m, i, o: xs.append(i[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**{k: v for k, v in b.items() if k != "labels"})
            xs[-1] = xs[-1][b["attention_mask"].bool()]
    h.remove()
    X = torch.cat(xs).double()
    p = LowRankPass({"method": "svd", "rank": 5, **NO_TRAIN})
    report, work = _analyze(p, model, make_ctx())
    row = report["layers"][target]
    s = torch.linalg.svdvals(W)
    assert row["rank"] == 5
    assert row["weight_error"] == pytest.approx(float((s[5:] ** 2).sum().sqrt() / s.norm()), rel=1e-5)  # Eckart-Young
    What = work.built[target].layer.to_dense().detach().double()
    out = float(((W - What) @ X.T).norm() / (W @ X.T).norm())
    assert row["output_error"] == pytest.approx(out, rel=1e-5)


def test_data_aware_methods_beat_svd_on_their_own_objective(make_ctx):
    """Same ranks, same calibration: DRONE's output error and FWSVD's Fisher-weighted error are
    at most SVD's, layer by layer (each is the optimum of its objective)."""
    base = make_tiny_model("bert")
    ctx = make_ctx()
    reports = {}
    for method in ("svd", "drone", "fwsvd"):
        p = LowRankPass({"method": method, "rank": 6, "fisher_batches": 2, "fisher_batch_size": 8, **CAL, **NO_TRAIN})
        report, work = _analyze(p, base, ctx)
        reports[method] = (p, report, work)
    for name, row in reports["drone"][1]["layers"].items():
        assert row["output_error"] <= reports["svd"][1]["layers"][name]["output_error"] + 1e-9, name
    fisher = reports["fwsvd"][0]._fisher(base, list(reports["svd"][1]["layers"]), ctx)
    for name in fisher:
        W = base.get_submodule(name).weight.detach().double()
        d = (fisher[name] + 1e-5).sqrt().unsqueeze(1)
        err = {m: float((d * (W - reports[m][2].built[name].layer.to_dense().detach().double())).norm())
               for m in ("svd", "fwsvd")}
        assert err["fwsvd"] <= err["svd"] * (1 + 1e-6), name
    assert any(reports["drone"][1]["layers"][n]["output_error"] < 0.99 * reports["svd"][1]["layers"][n]["output_error"]
               for n in fisher)


def test_native_knobs():
    model = make_tiny_model("bert")
    ctx = PassContext(stage="f", work_dir=".")
    m1, _ = _run(LowRankPass({"rank": 3, **NO_TRAIN}), make_tiny_model("bert"), ctx)
    assert {m.rank for m in m1.modules() if isinstance(m, LowRankLinear)} == {3}
    m2, _ = _run(BlockLRPass({"monarch": True, **NO_TRAIN}), make_tiny_model("bert"), ctx)
    blocks = [m for m in m2.modules() if isinstance(m, BlockLowRankLinear)]
    assert {(m.grid, m.rank, m.interleave_out) for m in blocks} == {((4, 4), 1, True)}
    m3, r3 = _run(DSFPass({"density": 0.3, "iters": 3, **NO_TRAIN}), make_tiny_model("bert"), ctx)
    for n, row in r3["layers"].items():
        o, i = row["shape"]
        assert row["nnz"] <= int(0.3 * o * i) and row["bytes"] == dsf_cost(o, i, row["nnz"], None, True)
    m4, _ = _run(LoSparsePass({"low_rank_ratio": 0.1, "sparse_ratio": 0.25, "scope": "layer", **NO_TRAIN}), model,
                 ctx)
    for m in m4.modules():
        if isinstance(m, SparseLowRankLinear):
            assert m.n_rows == m.out_features - math.floor(0.75 * m.out_features)
            assert m.rank == math.ceil(0.1 * m.out_features * m.in_features / (m.out_features + m.in_features))


@pytest.mark.parametrize("params,needle", [
    ({"method": "svd"}, "either ratio"),
    ({"method": "svd", "ratio": 2.0, "rank": 4}, "not both"),
    ({"method": "qr", "rank": 4}, "method"),
])
def test_lowrank_params_are_validated(params, needle):
    with pytest.raises(ValueError, match=needle):
        LowRankPass(params)


@pytest.mark.parametrize("cls,params,needle", [
    (BlockLRPass, {"monarch": True, "grid": [2, 2]}, "nblocks"),
    (BlockLRPass, {"grid": [2, 2]}, "either ratio"),
    (LoSparsePass, {"low_rank_ratio": 0.1}, "both"),
    (LoSparsePass, {"ratio": 2.0, "prune_warmup": 0.5, "prune_final": 0.5}, "< 1"),
    (DSFPass, {"ratio": 2.0, "density": 0.4}, "not both"),
])
def test_other_params_are_validated(cls, params, needle):
    with pytest.raises(ValueError, match=needle):
        cls(params)


def test_user_mistakes_name_what_is_wrong(make_ctx):
    model = make_tiny_model("bert")
    with pytest.raises(PlanError, match="no linear layer matches"):
        LowRankPass({"rank": 2, "targets": ["*nothing*"]}).analyze(model, make_ctx(False))
    with pytest.raises(PlanError, match="drone.*calibration"):
        LowRankPass({"method": "drone", "rank": 2}).analyze(model, make_ctx(False))
    with pytest.raises(PlanError, match="Fisher"):
        LowRankPass({"method": "fwsvd", "rank": 2}).analyze(model, make_ctx(False))
    with pytest.raises(PlanError, match="grid 3x2 does not divide"):
        BlockLRPass({"grid": [3, 2], "rank": 1}).analyze(model, make_ctx(False))
    with pytest.raises(PlanError, match="rank 40 exceeds"):
        LowRankPass({"rank": 40}).analyze(model, make_ctx(False))
    with pytest.raises(FactorizeError, match="over the budget"):
        LowRankPass({"ratio": 20.0}).analyze(model, make_ctx(False))


# ----------------------------------------------------------------------------- staged, sequential


def test_staged_factorizes_group_by_group_from_fine_tuned_weights(make_ctx):
    model = make_tiny_model("bert")
    p = LowRankPass({"ratio": 2.0, "staged": True, "stage_train": {"max_steps": 2, "batch_size": 8, "lr": 1e-2},
                     **CAL, **NO_TRAIN})
    ctx = make_ctx()
    ctx.analysis = p.analyze(model, ctx)
    report = ctx.analysis.report
    one_shot = {n: (b.layer.rank, b.layer.to_dense().detach().clone())
                for n, b in ctx.analysis.state["work"].built.items()}
    names = list(report["layers"])
    dense = _bytes(model, names)
    model = p.transform(model, ctx)
    staged = ctx.report["staged"]
    assert [len(s["group"]) for s in staged] == [6, 6]
    assert staged[0]["train_steps"] == 2 and "train_steps" not in staged[1]  # the pass's train follows the last
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, LowRankLinear) and layer.rank == one_shot[n][0]
        same = torch.equal(layer.to_dense().detach(), one_shot[n][1])
        # block 0 is the one-shot factorization, trained since; block 1 was factorized after that training
        assert not same
    assert 2.0 <= dense / _bytes(model, names) <= 2.04


def test_dsf_sequential_feeds_compressed_outputs_forward(make_ctx):
    base = make_tiny_model("bert")
    built = {}
    for seq in (True, False):
        p = DSFPass({"ratio": 2.0, "iters": 3, "sequential": seq, **CAL, **NO_TRAIN})
        _, work = _analyze(p, base, make_ctx())
        built[seq] = {n: b.layer.to_dense().detach() for n, b in work.built.items()}
    first = [f"bert.encoder.layer.0.attention.self.{x}" for x in ("query", "key", "value")]
    for n in built[True]:
        same = torch.equal(built[True][n], built[False][n])
        # the first group reads the embeddings either way; every later layer sees compressed inputs
        assert same == (n in first), n
    assert isinstance(base.bert.encoder.layer[0].attention.self.query, nn.Linear)  # analyze changed nothing


def test_staged_dsf_sequential_runs(make_ctx):
    model = make_tiny_model("bert")
    p = DSFPass({"ratio": 2.8, "iters": 2, "staged": True, "stage_train": {"max_steps": 1, "batch_size": 8},
                 **CAL, **NO_TRAIN})
    ctx = make_ctx()
    model, report = _run(p, model, ctx)
    assert [len(s["group"]) for s in ctx.report["staged"]] == [6, 6]
    names = list(report["layers"])
    assert all(isinstance(model.get_submodule(n), DoubleSparseLinear) for n in names)


# ----------------------------------------------------------------------------- training, artifacts


def test_losparse_prunes_rows_by_importance_during_training(make_ctx):
    model = make_tiny_model("bert")
    names = [n for n, _ in select_targets(model, None, None, "t")]
    dense = _bytes(model, names)
    p = LoSparsePass({"ratio": 2.0, "delta_t": 2, "prune_warmup": 0.1, "prune_final": 0.3, **CAL,
                      "train": {"max_steps": 12, "batch_size": 8, "lr": 1e-3, "keep_best": False}})
    ctx = make_ctx()
    model, report = _run(p, model, ctx)
    assert ctx.report["row_selection"] == "PLATON importance"
    assert ctx.report["losparse"]["masking_steps"] >= 4  # final phase (steps 9..12) masks every step
    assert 2.0 <= dense / _bytes(model, names) <= 2.04
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, SparseLowRankLinear) and layer.n_rows == ctx.report["rows_kept"][n]
        assert layer.n_rows < layer.out_features
    assert ctx.metrics["train_steps"] == 12 and "accuracy" in ctx.metrics
    assert "metrics_before_final_prune" in ctx.report


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip(method, make_ctx, tmp_path):
    cls, params, layer_type = METHODS[method]
    model, _ = _run(cls({**params, "ratio": 2.0, "train": {"max_steps": 1, "batch_size": 8}}),
                    make_tiny_model("bert"), make_ctx())
    model.eval()
    export_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    x = torch.randint(0, 1000, (2, 9))
    torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    assert type(again.bert.encoder.layer[1].output.dense) is layer_type


def test_factorizers_through_the_engine(tmp_path, tiny_model_dirs, data_env):
    import json

    from stackcomp.engine import Engine
    from stackcomp.plan import build_plan
    from stackcomp.recipe import recipe_from_dict

    train = {"max_steps": 2, "batch_size": 8, "lr": 1e-3}
    r = recipe_from_dict({
        "name": "f", "model": str(tiny_model_dirs["bert"]), "task": "glue/sst2", "data": {"max_length": 32},
        "stages": {"svd": {"pass": "lowrank", "params": {"ratio": 2.0, "train": train}},
                   "dsf": {"pass": "dsf", "params": {"ratio": 2.0, "iters": 2, "train": train}}},
    })
    plan = build_plan(r)
    summary = Engine(plan, tmp_path / "run").run()
    for stage in ("svd", "dsf"):
        ev = next(s for s in summary["stages"] if s["stage"] == f"{stage}.eval")["metrics"]
        report = json.loads((tmp_path / "run" / "artifacts" / plan.stages[stage].key / "report.json").read_text())
        fact = report["analyze"]["targeted_bytes"]
        dense_rest = (32 * 32 + 32 + 2 * 32 + 2) * 4  # pooler + classifier
        assert ev["linear_bytes"] == fact + dense_rest
        assert report["analyze"]["targeted_ratio"] >= 2.0


def test_relative_errors_without_gram():
    W = torch.randn(5, 4)
    out = relative_errors(W, torch.zeros(5, 4), None)
    assert out == {"weight_error": pytest.approx(1.0), "output_error": None}


def test_factorizers_recipe_validates_and_plans():
    from pathlib import Path

    from stackcomp.plan import build_plan
    from stackcomp.recipe import load_recipe

    path = Path(__file__).resolve().parents[1] / "recipes" / "minilm_sst2_factorizers.yaml"
    plan = build_plan(load_recipe(path))
    passes = {name: s.pass_name for name, s in plan.stages.items()}
    factorizers = {n for n, p in passes.items() if p in ("lowrank", "blocklr", "losparse", "dsf", "ds_factorize")}
    assert len(factorizers) == 14
    ratios = sorted(plan.stages[n].params.ratio for n in factorizers)
    assert ratios == [2.0] * 7 + [2.8] * 7
    trains = {plan.stages[n].params.train.max_steps for n in factorizers}
    assert len(trains) == 1  # the same fine-tune budget everywhere
    assert all(plan.stages[n].parents == ["ft"] for n in factorizers)
