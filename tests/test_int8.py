"""int8 layers and the int8 pass, on tiny shapes and tiny models.

Tolerances (relative Frobenius error of the output):
* the stored numbers: every weight within half a step (scale / 2) of the fp32 weight (exact bound);
* a layer's output against fp32 arithmetic on its *dequantized* weights, i.e. the error of the
  backend's activation quantization only: bitsandbytes and intmm (8-bit per-row activations) 2e-2, torch
  (7-bit per-tensor activations, reduce_range) 4e-2;
* save/load: bit-identical outputs (same int8 numbers, same backend).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stackcomp.artifacts import export_model, load_model
from stackcomp.errors import PlanError
from stackcomp.kernels import pack_ds
from stackcomp.kernels.reference import ds_forward_reference
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.nn.lowrank import LowRankLinear
from stackcomp.nn.quantized import (
    Int8DSLinear,
    Int8Linear,
    Int8LowRankLinear,
    QuantizationError,
    dequantize_rows,
    get_backend,
    quantize_rows,
)
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.ds_factorize import DSFactorizePass
from stackcomp.passes.int8 import Int8Pass
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

from conftest import make_tiny_model

ACT_TOL = {"bitsandbytes": 2e-2, "intmm": 2e-2, "kernel": 2e-2, "torch": 4e-2}
BACKENDS = ["torch", "bitsandbytes", "intmm", "kernel"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_quantize_rows_half_step_bound_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(17, 40, generator=g) * torch.logspace(-3, 2, 17).unsqueeze(1)  # rows of very different size
    w[5] = 0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (17,)
    assert int(q.abs().max()) <= 127
    assert (q.abs().amax(1)[torch.arange(17) != 5] == 127).all()  # each row uses the full range
    err = (dequantize_rows(q, s) - w).abs()
    assert (err <= s.unsqueeze(1) / 2 * (1 + 1e-6)).all()
    assert (q[5] == 0).all() and s[5] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_linear_matches_dequantized_arithmetic(backend):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    layer = Int8Linear.from_linear(lin, backend)
    x = torch.randn(3, 11, 64)
    deq = F.linear(x, layer.to_dense(), layer.bias)
    y = layer(x)
    assert y.shape == (3, 11, 24) and y.dtype == x.dtype
    assert rel(y, deq) < ACT_TOL[backend]
    assert rel(y, lin(x).detach()) < ACT_TOL[backend] + 1e-2
    assert layer(x[:0]).shape == (0, 11, 24)
    st = layer.storage()
    assert st.bytes == 64 * 24 + 24 * 4 + 24 * 4 and st.dense_bytes == (64 * 24 + 24) * 4
    # the cached backend handle survives deepcopy (the engine copies models) and follows buffer changes
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), y)
    with torch.no_grad():
        twin.weight_scale.mul_(2)
    assert rel(twin(x) - twin.bias, 2 * (y - layer.bias)) < 1e-5


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(QuantizationError, match="unknown int8 backend 'fp4'"):
        get_backend("fp4")
    with pytest.raises(QuantizationError, match="unknown int8 backend"):
        Int8Linear(8, 8, backend="fp4")


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_lowrank(backend):
    torch.manual_seed(1)
    lr = LowRankLinear.from_linear(nn.Linear(48, 40), rank=8)
    layer = Int8LowRankLinear.from_lowrank(lr, backend)
    x = torch.randn(50, 48)
    U, V = dequantize_rows(layer.U, layer.U_scale), dequantize_rows(layer.V, layer.V_scale)
    deq = F.linear(F.linear(x, V), U, layer.bias)
    assert rel(layer(x), deq) < 2 * ACT_TOL[backend]
    assert torch.allclose(layer.to_dense(), U @ V)
    assert layer.storage().bytes == 40 * 8 + 8 * 48 + (40 + 8) * 4 + 40 * 4


def _ds(seed=0, out=40, inp=96, block=32, atoms=16, nnz=4):
    torch.manual_seed(seed)
    return DSLinear.from_linear(nn.Linear(inp, out), block, atoms, nnz, iters=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_ds_forward_and_layout_is_the_packed_int8_layout(backend):
    ds = _ds()
    layer = Int8DSLinear.from_ds(ds, backend)
    d, v, i, b = layer.dequantized()
    x = torch.randn(70, 96)
    assert rel(layer(x), ds_forward_reference(x, d, v, i, b)) < ACT_TOL[backend]
    assert rel(layer(x), ds(x).detach()) < ACT_TOL[backend] + 2e-2
    # the same int8 numbers as pack_ds(int8) of the fp32 layer: pack adds no rounding
    p_direct = pack_ds(ds.dictionary, ds.values, ds.indices, ds.bias, target="cpu", dtype="int8")
    p_from_q = pack_ds(d, v, i, b, target="cpu", dtype="int8")
    for name, t in p_direct.tensors.items():
        assert torch.equal(p_from_q.tensors[name], t), name
    nb, out, s, K, B = 3, 40, 4, 16, 32
    assert layer.storage().bytes == nb * K * B + nb * K * 4 + nb * out * s * 2 + out * 4 + out * 4
    assert layer.storage().bytes < ds.storage().bytes / 2.5


def test_int8_ds_refuses_a_layer_in_stf():
    ds = _ds().start_stf()
    with pytest.raises(QuantizationError, match="STF"):
        Int8DSLinear.from_ds(ds)


def _ctx(tmp_path):
    return PassContext(stage="t", work_dir=tmp_path)


def _factorize(model, tmp_path):
    p = DSFactorizePass({"block": 16, "atoms": 16, "nnz": 4, "iters": 2, "train": {"epochs": 0}})
    ctx = _ctx(tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    return p.finetune(p.transform(model, ctx), ctx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_pass_on_ds_round_trips_save_load(tmp_path, backend):
    model = _factorize(make_tiny_model("bert"), tmp_path)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    p = Int8Pass({"backend": backend})
    ctx = _ctx(tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    report = ctx.analysis.report
    model = p.transform(model, ctx)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Int8DSLinear" in kinds and "DSLinear" not in kinds
    assert len(report["layers"]) == 12 and report["backend"] == backend
    for row in report["layers"].values():
        assert 0 < row["weight_error"] < 0.02 and 0 < row["output_error"] < 0.1
        assert row["bytes_after"] < row["bytes_before"] / 2
    with torch.no_grad():
        y = model(input_ids=ids).logits
    assert rel(y, ref) < 0.1
    export_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert {type(m).__name__ for m in again.modules()} == kinds
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, y)


def test_int8_pass_plain_linears_and_error_ranking(tmp_path):
    """A planted outlier weight makes its layer's quantization error the worst."""
    model = make_tiny_model("distilbert")
    bad = "distilbert.transformer.layer.1.ffn.lin2"
    with torch.no_grad():
        w = model.get_submodule(bad).weight
        w[:, 3] = 0
        w[:, 3] = w.abs().max() * 60  # every row's scale is set by one huge column
    report = Int8Pass({"backend": "torch"}).analyze(model, _ctx(tmp_path)).report
    assert report["worst_layer"] == bad
    assert report["layers"][bad]["weight_error"] > 2 * sorted(r["weight_error"] for r in report["layers"].values())[-2]
    assert all(r["type"] == "Int8Linear" for r in report["layers"].values())


def test_int8_stacks_after_ds_and_is_refused_twice_or_before_ds():
    def plan(stages):
        return build_plan(recipe_from_dict({"name": "r", "model": "m", "stages": stages}))

    ds = {"pass": "ds_factorize", "params": {"block": 16, "atoms": 8, "nnz": 2}}
    plan({"ds": ds, "q": {"pass": "int8", "after": "ds"}})
    with pytest.raises(PlanError, match="already int8"):
        plan({"q": {"pass": "int8"}, "q2": {"pass": "int8", "after": "q"}})
    with pytest.raises(PlanError, match="cannot come after"):
        plan({"q": {"pass": "int8"}, "ds": {**ds, "after": "q"}})
    with pytest.raises(PlanError, match="backend"):
        plan({"q": {"pass": "int8", "params": {"backend": "fp4"}}})


def test_bitsandbytes_adapter_agrees_with_linear8bitlt():
    """Same layout as bitsandbytes' own Linear8bitLt (no outlier split): its int8 weights and SCB
    match ours (SCB = 127 * scale; rounding may differ by one step at near-ties), and its output
    (computed with fp16 activations) matches the adapter's within 1e-2."""
    import logging

    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    ref = bnb.nn.Linear8bitLt(64, 24, bias=True, has_fp16_weights=False, threshold=0.0)
    ref.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    ref.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    ref = ref.to("cpu").eval()
    ours = Int8Linear.from_linear(lin, "bitsandbytes")
    assert int((ref.weight.data.int() - ours.weight.int()).abs().max()) <= 1
    assert torch.allclose(ref.weight.SCB / 127, ours.weight_scale, rtol=1e-3)  # bnb rounds SCB coarser
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        assert rel(ours(x), ref(x).float()) < 1e-2


def _onednn_engine() -> bool:
    return "onednn" in torch.backends.quantized.supported_engines


@pytest.mark.skipif(not _onednn_engine(), reason="this PyTorch build has no oneDNN quantized engine")
@pytest.mark.parametrize("tokens", [3, 400])
def test_torch_backend_large_calls_on_onednn_compute_the_same(monkeypatch, tokens):
    """The torch backend's oneDNN copy (AMX kernels) computes fbgemm's arithmetic: forced on for every
    call, a layer's outputs agree with the fbgemm-only layer's to fp32 rounding, bar an activation
    rounded one step apart; the global engine setting is left as it was."""
    import stackcomp.nn.quantized as Q

    torch.manual_seed(0)
    lin = nn.Linear(96, 160)
    x = torch.randn(tokens, 96) * 3
    engine = torch.backends.quantized.engine
    outputs = {}
    for env in ("0", "1"):
        monkeypatch.setenv(Q.ONEDNN_ENV, env)
        Q.onednn_for_large_calls.cache_clear()
        monkeypatch.setattr(Q, "ONEDNN_MIN_WORK", 0)  # every call is "large"
        layer = Int8Linear.from_linear(lin, backend="torch")
        with torch.no_grad():
            outputs[env] = layer(x)
        _, (_, handle) = layer._prepared  # (key, (runner, handle))
        many, out_features = handle.onednn, handle.out_features
        assert (many is not None) == (env == "1") and out_features == 160
        assert torch.backends.quantized.engine == engine
    Q.onednn_for_large_calls.cache_clear()
    fbgemm, onednn = outputs["0"], outputs["1"]
    step = fbgemm.abs().max()
    assert (onednn - fbgemm).abs().max() <= 2e-3 * step
    assert ((onednn - fbgemm).abs() > 1e-5 * step).float().mean() < 0.01  # nearly all to fp32 rounding


def test_torch_backend_switches_engine_by_work(monkeypatch):
    """Below ONEDNN_MIN_WORK (tokens x outputs) a call runs the default engine's weight, from it oneDNN's."""
    import stackcomp.nn.quantized as Q

    calls = []

    class Spy:
        def __init__(self, name):
            self.name = name

    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic", lambda x, packed, rr: calls.append(packed.name) or x,
                        raising=False)
    backend = Q.TorchDynamicInt8()
    handle = Q.TorchInt8Handle(Spy("default"), 64, onednn_source=(None, None), onednn=Spy("onednn"))
    limit = Q.ONEDNN_MIN_WORK // 64
    backend.run(torch.zeros(limit - 1, 8), handle)
    backend.run(torch.zeros(limit, 8), handle)
    backend.run(torch.zeros(limit, 8), Q.TorchInt8Handle(Spy("default"), 64))  # no oneDNN copy: the default
    assert calls == ["default", "onednn", "default"]


@pytest.mark.skipif(not _onednn_engine(), reason="this PyTorch build has no oneDNN quantized engine")
def test_onednn_copy_is_packed_on_the_first_large_call_only(monkeypatch):
    import stackcomp.nn.quantized as Q

    monkeypatch.setenv(Q.ONEDNN_ENV, "1")
    Q.onednn_for_large_calls.cache_clear()
    try:
        layer = Int8Linear.from_linear(nn.Linear(16, 32), backend="torch")
        with torch.no_grad():
            layer(torch.randn(2, 16))  # 64 of 2^17: small
            handle = layer._prepared[1][1]
            assert handle.onednn_source is not None and handle.onednn is None
            layer(torch.randn(Q.ONEDNN_MIN_WORK // 32, 16))
            assert handle.onednn is not None
    finally:
        Q.onednn_for_large_calls.cache_clear()


# ----------------------------------------------------------------------------- the kernel backend


def _kernel_backend():
    be = get_backend("kernel")
    ok, why = be.available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    return be


@pytest.mark.parametrize("shape", [(1, 64, 16), (7, 100, 70), (33, 384, 384), (300, 96, 200)])
def test_kernel_backend_is_intmm_arithmetic_in_one_call(shape):
    """The kernel backend's outputs are intmm's per-row arithmetic (its exact-sum torch form) to float
    rounding, on every path it has here; the AMX and VNNI paths agree bit for bit."""
    from stackcomp.kernels import ds_cpu
    from stackcomp.kernels.ffn import AMX_MULTIPLE, ffn_has_amx, linear_forward_cpu, linear_operands, linear_reference

    _kernel_backend()
    T, i, o = shape
    g = torch.Generator().manual_seed(T)
    q, s = quantize_rows(torch.randn(o, i, generator=g))
    b = torch.randn(o, generator=g)
    x = torch.randn(T, i, generator=g)
    x[0] = 0.0  # a zero row: scale 0
    ref = linear_reference(x, q, s, b)
    ext = ds_cpu.get_extension()
    outs = {}
    for multiple in (4, AMX_MULTIPLE):
        ops = linear_operands(q, s, b, multiple)
        for path in ("best", "vnni", "generic"):
            outs[multiple, path] = y = linear_forward_cpu(x, ops, ext, path)
            assert rel(y, ref) < 1e-6, (multiple, path, rel(y, ref))
    if ffn_has_amx(ext):
        assert torch.equal(outs[AMX_MULTIPLE, "best"], outs[AMX_MULTIPLE, "vnni"])
    intmm = Int8Linear(i, o, backend="intmm")
    intmm.weight.copy_(q)
    intmm.weight_scale.copy_(s)
    intmm.bias.copy_(b)
    assert rel(intmm(x), ref) < 1e-5  # the same arithmetic as torch._int_mm's backend


def test_kernel_backend_takes_amx_for_long_calls(monkeypatch):
    """Calls of AMX_MIN_TOKENS rows or more run on AMX operands (a 64-padded copy made on the first such
    call where the input size needs it); STACKCOMP_FFN_KERNEL=vnni keeps the VNNI path; same numbers."""
    from stackcomp.kernels import ds_cpu
    from stackcomp.kernels.ffn import ffn_has_amx
    from stackcomp.kernels.ffn import AMX_MIN_TOKENS, ENV

    _kernel_backend()
    if not ffn_has_amx(ds_cpu.get_extension()):
        pytest.skip("no AMX here (CPU, OS or build)")
    monkeypatch.delenv(ENV, raising=False)
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(96, 40), "kernel")
    short, long = torch.randn(AMX_MIN_TOKENS - 1, 96), torch.randn(AMX_MIN_TOKENS, 96)
    with torch.no_grad():
        y_short = layer(short)
        _, handle = layer._prepared[1]
        assert handle.amx and handle.amx_ops is None
        y_long = layer(long)
        assert handle.amx_ops is not handle.ops and handle.amx_ops.wp.shape[1] * 4 == 128
        monkeypatch.setenv(ENV, "vnni")
        layer._prepared = None
        assert torch.equal(layer(long), y_long) and torch.equal(layer(short), y_short)
        assert not layer._prepared[1][1].amx

