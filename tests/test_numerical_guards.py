"""Numerical guards: factorizers stay finite (and exact where the answer is known) on degenerate
matrices; NaN/Inf in a weight or a gradient stops the stage with the stage and the tensor named."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.errors import StackcompError
from stackcomp.factorize import blocklr, dictionary, dsf, losparse, lowrank, omp
from stackcomp.passes.base import Pass, register_pass
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

OUT, IN = 16, 32


def degenerate(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if kind == "zero":
        return torch.zeros(OUT, IN)
    if kind == "rank1":
        return torch.randn(OUT, 1, generator=g) @ torch.randn(1, IN, generator=g)
    if kind == "dup_columns":
        return torch.randn(OUT, IN // 2, generator=g).repeat(1, 2)
    if kind == "dup_rows":
        return torch.randn(OUT // 2, IN, generator=g).repeat(2, 1)
    if kind == "one_entry":
        W = torch.zeros(OUT, IN)
        W[3, 5] = 2.5
        return W
    if kind == "constant":
        return torch.full((OUT, IN), 0.5)
    raise ValueError(kind)


KINDS = ["zero", "rank1", "dup_columns", "dup_rows", "one_entry", "constant"]
#: kinds whose every block is rank <= 1, so a rank->=1 / one-atom factorization is exact
EXACT = {"zero", "rank1", "one_entry", "constant"}


def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def rel(err: torch.Tensor, W: torch.Tensor) -> float:
    n = float(W.norm())
    return float(err.norm()) / n if n else float(err.norm())


def _svd(W):
    U, V = lowrank.svd_factors(W, 4)
    return (U, V), U @ V


def _fwsvd(W):
    U, V = lowrank.fwsvd_factors(W, 4, torch.linspace(0, 1, OUT))  # one row with zero Fisher information
    return (U, V), U @ V


def _drone(W):
    X = torch.randn(48, IN, generator=torch.Generator().manual_seed(1))
    U, V = lowrank.drone_factors(W, 4, X)
    return (U, V), U @ V


def _blocklr(W):
    U, V = blocklr.blocklr_factors(W, (2, 2), 1)
    return (U, V), blocklr.blocklr_to_dense(U, V)


def _monarch(W):
    U, V = blocklr.monarch_factors(W, 4)
    return (U, V), blocklr.blocklr_to_dense(U, V, interleave_out=True)


def _losparse(W):
    U, V, S = losparse.losparse_init(W, 4)
    assert torch.allclose(U @ V + S, W, atol=1e-5)
    return (U, V, S), U @ V


def _ds(W):
    f = dictionary.factorize_ds(W, 8, 8, 2, iters=3)
    assert math.isfinite(f.error)
    return (f.dictionary, f.values), dictionary.ds_reconstruct(f.dictionary, f.values, f.indices)


def _ds_ksvd(W):
    f = dictionary.factorize_ds(W, 8, 8, 2, iters=3, method="ksvd")
    return (f.dictionary, f.values), dictionary.ds_reconstruct(f.dictionary, f.values, f.indices)


def _dsf(W):
    r = dsf.dsf_factors(W, density=0.5, iters=5)
    return (r.P, r.Q), r.to_dense()


def _dsf_calibrated(W):
    X = torch.randn(48, IN, generator=torch.Generator().manual_seed(1))
    r = dsf.dsf_factors(W, density=0.5, X=X, iters=5)
    return (r.P, r.Q), r.to_dense()


FACTORIZERS = {"svd": _svd, "fwsvd": _fwsvd, "drone": _drone, "blocklr": _blocklr, "monarch": _monarch,
               "losparse": _losparse, "ds_mod": _ds, "ds_ksvd": _ds_ksvd, "dsf": _dsf,
               "dsf_calibrated": _dsf_calibrated}
#: these are exact minimisers of a rank-constrained problem: a rank-<=1 input comes back exactly
EXACT_FACTORIZERS = {"svd", "fwsvd", "drone", "blocklr", "monarch", "losparse", "ds_mod", "ds_ksvd"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fname", sorted(FACTORIZERS))
def test_factorizers_are_finite_on_degenerate_matrices(fname, kind):
    W = degenerate(kind)
    factors, approx = FACTORIZERS[fname](W)
    assert finite(*factors, approx), f"{fname} on {kind}: NaN/Inf"
    assert approx.shape == W.shape
    err = rel(W - approx, W)
    assert err <= 1.0 + 1e-5, f"{fname} on {kind}: relative error {err} is worse than the zero matrix"
    if kind in EXACT and fname in EXACT_FACTORIZERS:
        assert err < 1e-4, f"{fname} on {kind}: {err}"


@pytest.mark.parametrize("kind", KINDS)
def test_svd_error_is_eckart_young_on_degenerate_matrices(kind):
    W = degenerate(kind)
    _, approx = _svd(W)
    s = torch.linalg.svdvals(W.double())
    assert float((W - approx).norm()) == pytest.approx(float(s[4:].norm()), abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_omp_on_degenerate_dictionaries_and_signals(kind):
    D = degenerate(kind)  # 16 atoms of width 32: zero, parallel, duplicated atoms...
    X = D[:5].clone()  # signals that are atoms: one atom explains each exactly
    values, indices = omp.sparse_code(X, D, 3)
    assert finite(values)
    assert indices.shape == (5, 3) and all(len(set(r.tolist())) == 3 for r in indices)  # distinct, in range
    assert int(indices.min()) >= 0 and int(indices.max()) < D.shape[0]
    recon = omp.codes_to_dense(values, indices, D.shape[0]) @ D
    assert float((recon - X).norm()) <= 1e-4 * max(1.0, float(X.norm()))
    zeros = torch.zeros(4, IN)  # zero signals on a random dictionary: zero codes
    v0, _ = omp.sparse_code(zeros, torch.randn(8, IN), 2)
    assert finite(v0) and float(v0.abs().max()) == 0.0


NAN_CALLS = {
    "svd": lambda W: lowrank.svd_factors(W, 4, name="enc.0.q"),
    "fwsvd": lambda W: lowrank.fwsvd_factors(W, 4, torch.rand(OUT), name="enc.0.q"),
    "drone": lambda W: lowrank.drone_factors(W, 4, torch.randn(40, IN), name="enc.0.q"),
    "drone_X": lambda W: lowrank.drone_factors(torch.randn(OUT, IN), 4, W.repeat(3, 1), name="enc.0.q"),
    "blocklr": lambda W: blocklr.blocklr_factors(W, (2, 2), 2, name="enc.0.q"),
    "losparse": lambda W: losparse.losparse_init(W, 4, name="enc.0.q"),
    "ds": lambda W: dictionary.factorize_ds(W, 8, 8, 2, name="enc.0.q"),
    "dsf": lambda W: dsf.dsf_factors(W, density=0.5, name="enc.0.q"),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("fname", sorted(NAN_CALLS))
def test_factorizers_refuse_nan_naming_the_layer(fname, value):
    W = torch.randn(OUT, IN)
    W[2, 3] = value
    with pytest.raises(StackcompError, match=r"enc\.0\.q: .*NaN or Inf"):
        NAN_CALLS[fname](W)


# ----------------------------------------------------------------------------- through the engine


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = [{"input_ids": torch.randint(5, 1000, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.randint(0, 2, (), generator=g)} for _ in range(n * 4)]
    return DataLoader(data, batch_size=4)


NAN_LAYER = "bert.encoder.layer.1.output.dense.weight"


@register_pass
class _NaNGradPass(Pass):
    """Test pass: trains with a loss whose gradient is NaN in one weight (its value stays finite)."""

    name = "_nan_grad"

    def finetune(self, model, ctx):
        from stackcomp.train import TrainConfig, train

        def loss_fn(m, batch):
            w = getattr(m, "module", m).bert.encoder.layer[1].output.dense.weight
            kink = torch.sqrt((w[0, 0] - w[0, 0].detach()).abs())  # value 0, gradient NaN
            return m(**batch).loss + kink

        train(model, _batches(), TrainConfig(max_steps=3, log_every=1), loss_fn=loss_fn, log=ctx.log)
        return model


@register_pass
class _PoisonPass(Pass):
    """Test pass: writes Inf into one weight, as a diverged update would."""

    name = "_poison"

    def transform(self, model, ctx):
        with torch.no_grad():
            model.bert.encoder.layer[0].attention.self.query.weight[1, 2] = float("inf")
        return model


@register_pass
class _Noop(Pass):
    """Test pass: changes nothing."""

    name = "_noop"


def _engine(model_dir, stages, tmp_path):
    plan = build_plan(recipe_from_dict({"name": "n", "model": str(model_dir), "stages": stages,
                                        "evaluate_leaves": False}))
    return Engine(plan, tmp_path / "run"), plan


def _no_artifact(plan, tmp_path, stage):
    arts = tmp_path / "run" / "artifacts"
    return not (arts / plan.stages[stage].key).exists() and not [p for p in arts.iterdir() if p.name.startswith(".tmp")]


def test_nan_gradient_stops_the_stage_naming_stage_step_and_parameter(tmp_path, tiny_model_dirs):
    e, plan = _engine(tiny_model_dirs["bert"], {"a": {"pass": "_noop"}, "b": {"pass": "_nan_grad", "after": "a"}},
                      tmp_path)
    failed = e.run()["failed"]  # the stage fails; the run goes on with what does not need it
    assert [f["stage"] for f in failed] == ["b"]
    msg = failed[0]["error"]
    assert msg.startswith("NumericalError: training step 1") and NAN_LAYER in msg, msg
    assert _no_artifact(plan, tmp_path, "b") and e.store.verify(plan.stages["a"].key) is None  # a is kept


def test_inf_weight_after_transform_is_refused_before_saving(tmp_path, tiny_model_dirs):
    e, plan = _engine(tiny_model_dirs["bert"], {"a": {"pass": "_poison"}}, tmp_path)
    failed = e.run()["failed"]
    assert len(failed) == 1 and failed[0]["stage"] == "a", failed
    assert re.match(r"NumericalError: .*bert\.encoder\.layer\.0\.attention\.self\.query\.weight holds NaN or Inf",
                    failed[0]["error"]), failed
    assert _no_artifact(plan, tmp_path, "a")


def test_nan_in_the_base_model_stops_the_first_stage_via_cli(tmp_path, tiny_model_dirs):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs["bert"])
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    d = tmp_path / "nan-model"
    model.save_pretrained(d)
    for f in tiny_model_dirs["bert"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            (d / f.name).write_bytes(f.read_bytes())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: n\nmodel: {d}\nstages: {{a: {{pass: _noop}}}}\n")
    r = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run")])
    assert r.exit_code == 1, r.output  # a stage failed
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert "stage 'a'" in line and "bert.encoder.layer.1.intermediate.dense.weight" in line and "NaN/Inf" in line
    assert "Traceback" not in r.output
