"""The fused int8 FFN: kernel against its torch oracle, against the fp32 FFN, the module, and ``pack``'s fuse_ffn.

Bounds:
* kernel vs oracle (``fused_ffn_reference``, the same quantization in torch ops): the integer sums are
  exact in both and x's codes are made by the same float ops, so the only differences are the fp32
  epilogues' last bits (fused multiply-add, the kernel's polynomial erf/exp within 1.5e-7 of exact).
  Those move a scaled hidden value u = h * 127 / amax_row by less than 1e-5 (measured over 160 random
  shapes; the erf bound allows about 4e-5), so per output
  ``|y - ref| <= 2e-6 max|ref| + sh_row * ws2_o * sum_{j near a tie} |W2q[o, j]|``: float rounding, plus one
  step for each hidden value within 2.5e-4 of a rounding boundary (fraction of |u| in 0.5 +- 2.5e-4; about
  0.04% of them), the only codes the epilogue's rounding can change;
* kernel vs the fp32 FFN on the same (unquantized) weights: 5e-2 of max |y| (8-bit weights and two
  8-bit activation roundings; measured 1-2e-2), the same as tests/test_pack.py's int8 bound;
* ``pack``'s check: the fused model's relative logit error, against the exact arithmetic of the
  same int8 weights, at most fuse_ffn_tolerance (5e-2) above the unfused model's;
* save/load: identical logits.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stackcomp
from stackcomp.artifacts import export_model
from stackcomp.errors import PassError
from stackcomp.kernels import ds_cpu
from stackcomp.kernels.ffn import (AMX_MIN_TOKENS, AMX_MULTIPLE, ENV, ffn_forward_cpu, ffn_has_amx, ffn_operands,
                                   fused_ffn_reference)
from stackcomp.nn.fused import FusedFFNInput, FusedInt8FFN, find_ffns
from stackcomp.nn.quantized import Int8Linear, quantize_rows

from conftest import kernel_extension, make_tiny_model, run_int8, run_pack

TIE = 2.5e-4
REL = 2e-6
FP32_TOL = 5e-2
# (tokens, in, hidden, out): 1 row; rows not a multiple of the 32-row block, hidden not a multiple of 16;
# in not a multiple of 4; several blocks; the student's FFN at a few tokens
SHAPES = [(1, 24, 100, 21), (37, 24, 100, 21), (70, 33, 70, 17), (96, 48, 64, 32), (5, 384, 1536, 384)]


def _ext():
    return kernel_extension("ffn_forward")


def _ffn(inp, hid, out, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(hid, inp, generator=g) / inp ** 0.5, torch.randn(out, hid, generator=g) / hid ** 0.5
    b1 = torch.randn(hid, generator=g) * 0.1 if bias else None
    b2 = torch.randn(out, generator=g) * 0.1 if bias else None
    return w1, b1, w2, b2


def _quantized(w1, b1, w2, b2):
    q1, s1 = quantize_rows(w1)
    q2, s2 = quantize_rows(w2)
    return q1, s1, b1, q2, s2, b2


def check_against_oracle(y, x, qw, act):
    """Assert the bound of the module docstring; returns how many hidden values sat near a tie."""
    ref, u, sh = fused_ffn_reference(x, *qw, act=act, return_hidden=True)
    q2, s2 = qw[3], qw[4]
    near = ((u.abs() - u.abs().floor() - 0.5).abs() < TIE).double()            # (T, hidden)
    slack = (sh.double().unsqueeze(1) * (near @ q2.double().abs().t())) * s2.double()
    err = (y.double() - ref.double()).abs()
    bound = REL * float(ref.abs().max()) + slack
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}"
    return int(near.sum())


# (path, operand padding): VNNI and portable on the plain layout; "best" on the AMX layout (the AMX path
# where the CPU has it, VNNI elsewhere), and the portable loop on it (padding changes no number)
PATHS = [("vnni", 4), ("generic", 4), ("best", AMX_MULTIPLE), ("generic", AMX_MULTIPLE)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("path,multiple", PATHS)
def test_kernel_matches_oracle_and_fp32(shape, act, path, multiple):
    ext = _ext()
    T, inp, hid, out = shape
    w1, b1, w2, b2 = _ffn(inp, hid, out)
    qw = _quantized(w1, b1, w2, b2)
    x = torch.randn(T, inp, generator=torch.Generator().manual_seed(1))
    if T > 3:
        x[2] = 0.0  # a zero row: scale 0
    y = ffn_forward_cpu(x, ffn_operands(*qw, multiple=multiple), act, ext, path=path)
    check_against_oracle(y, x, qw, act)
    fp32 = F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh" if act == "gelu_tanh" else "none"), w2, b2)
    rel = float((y - fp32).abs().max() / fp32.abs().max())
    assert rel < FP32_TOL


def _on_threads(n: int, fn):
    """``fn()`` with torch's thread count set to ``n`` (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [7, 150])
def test_generic_and_vnni_paths_agree_and_zero_tokens(threads, tokens):
    """Few tokens on several threads split each GEMM over output channels (a join between them);
    many tokens go in row blocks: both orders, both paths, against the oracle."""
    ext = _ext()
    w1, b1, w2, b2 = _ffn(64, 200, 48, bias=False)
    qw = _quantized(w1, b1, w2, b2)
    ops = ffn_operands(*qw)
    x = torch.randn(tokens, 64).reshape(-1, 1, 64)  # leading dims kept
    fast, slow = _on_threads(threads, lambda: [ffn_forward_cpu(x, ops, "gelu", ext, path=p) for p in ("vnni", "generic")])
    assert fast.shape == (tokens, 1, 48)
    check_against_oracle(fast.reshape(-1, 48), x.reshape(-1, 64), qw, "gelu")
    check_against_oracle(slow.reshape(-1, 48), x.reshape(-1, 64), qw, "gelu")
    assert ffn_forward_cpu(torch.zeros(0, 64), ops, "gelu", ext).shape == (0, 48)
    with pytest.raises(Exception, match="features"):
        ffn_forward_cpu(torch.zeros(2, 60), ops, "gelu", ext)


def _amx_ext():
    ext = _ext()
    if not ffn_has_amx(ext):
        pytest.skip("this CPU (or its OS, or the build) has no AMX: the AMX path cannot run here")
    return ext


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 64, 64, 16), (31, 128, 320, 40), (33, 384, 1536, 384), (150, 100, 300, 70)])
def test_amx_path_gives_the_vnni_paths_numbers(threads, shape):
    """Same integer sums, same epilogue code: the AMX and VNNI paths agree bit for bit on the AMX
    layout, for short blocks (rows padded to 32), a lone 16-channel group, and in/hidden padded to 64."""
    ext = _amx_ext()
    T, inp, hid, out = shape
    qw = _quantized(*_ffn(inp, hid, out, seed=T))
    ops = ffn_operands(*qw, multiple=AMX_MULTIPLE)
    assert ops.w1p.shape[1] * 4 % AMX_MULTIPLE == 0 and ops.w2p.shape[1] * 4 % AMX_MULTIPLE == 0
    x = torch.randn(T, inp, generator=torch.Generator().manual_seed(3))
    amx, vnni = _on_threads(threads, lambda: [ffn_forward_cpu(x, ops, "gelu", ext, path=p) for p in ("best", "vnni")])
    assert torch.equal(amx, vnni)
    check_against_oracle(amx, x, qw, "gelu")


@pytest.mark.parametrize("hid", [200, 256])
def test_module_takes_amx_for_long_calls_only(monkeypatch, hid):
    """Calls of AMX_MIN_TOKENS tokens or more run on AMX operands (a second, 64-padded copy packed on the
    first such call where the sizes need it; the same operands where they are multiples of 64); short calls
    and STACKCOMP_FFN_KERNEL=vnni keep the VNNI path; every route gives the same numbers."""
    _amx_ext()
    monkeypatch.delenv(ENV, raising=False)
    torch.manual_seed(0)
    layer = FusedInt8FFN.from_layers(nn.Linear(64, hid), "gelu", nn.Linear(hid, 32)).eval()
    short, long = torch.randn(AMX_MIN_TOKENS - 1, 64), torch.randn(2, AMX_MIN_TOKENS, 64)
    with torch.no_grad():
        y_short = layer(short)
        run = layer._kernel()
        assert run.amx and run.amx_ops is None
        y_long = layer(long)
        assert (run.amx_ops is run.ops) == (hid % AMX_MULTIPLE == 0)
        assert run.amx_ops.w2p.shape[1] * 4 % AMX_MULTIPLE == 0
        monkeypatch.setenv(ENV, "vnni")
        layer._cache = None
        assert not layer._kernel().amx
        assert torch.equal(layer(long), y_long) and torch.equal(layer(short), y_short)


def test_the_portable_build_runs_the_fused_ffn():
    _ext()
    generic, why = ds_cpu.import_built("generic")
    if generic is None:
        pytest.skip(f"the generic build is not installed ({why})")
    assert not generic.ffn_has_vnni() and not generic.ffn_has_amx()
    w1, b1, w2, b2 = _ffn(40, 80, 24)
    qw = _quantized(w1, b1, w2, b2)
    x = torch.randn(45, 40)
    check_against_oracle(ffn_forward_cpu(x, ffn_operands(*qw), "gelu", generic), x, qw, "gelu")


@pytest.mark.parametrize("int8", [False, True])
def test_module_from_linears_and_int8_linears(int8):
    _ext()
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(32, 70), nn.Linear(70, 32)
    first, second = (Int8Linear.from_linear(lin1), Int8Linear.from_linear(lin2)) if int8 else (lin1, lin2)
    layer = FusedInt8FFN.from_layers(first, "gelu", second)
    if int8:  # the int8 numbers are taken as stored
        assert torch.equal(layer.weight1, first.weight) and torch.equal(layer.weight2_scale, second.weight_scale)
    x = torch.randn(2, 9, 32)
    with torch.inference_mode():
        y = layer(x)
    qw = (layer.weight1, layer.weight1_scale, layer.bias1, layer.weight2, layer.weight2_scale, layer.bias2)
    check_against_oracle(y.reshape(-1, 32), x.reshape(-1, 32), qw, "gelu")
    # the torch-ops form (export, no kernel, x needing a gradient): fp32 sums, exact below 2^24 (70 x 127^2 here)
    ref32 = layer.forward_reference(x, exact=False)
    assert torch.equal(ref32, layer.forward_reference(x))
    yg = layer(x.clone().requires_grad_())
    assert yg.grad_fn is not None and torch.equal(yg.detach(), ref32)
    st = layer.storage()
    assert st.dense_params == 2 * 32 * 70 + 70 + 32 and st.bytes == 2 * 32 * 70 + 4 * (70 + 70 + 32 + 32)
    assert isinstance(FusedInt8FFN.from_manifest(layer.manifest()), FusedInt8FFN)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "albert"])
@pytest.mark.parametrize("int8", [False, True])
def test_pack_fuses_ffns_checks_parity_and_round_trips(tmp_path, kind, int8):
    _ext()
    model = make_tiny_model(kind)
    if int8:
        model = run_int8(model, tmp_path)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model, ctx = run_pack(model, tmp_path, fuse_ffn=True)
    report = ctx.analysis.report
    n = {"bert": 2, "distilbert": 2, "albert": 1}[kind]  # ALBERT shares one layer
    if not _ext().ffn_has_vnni():  # a build without the VNNI path (STACKCOMP_CPU_ISA=avx2): pack declines
        assert report["ffn_fused"] == 0 and len(report["fuse_ffn"]["unfused"]) == n
        assert all("VNNI" in why for why in report["fuse_ffn"]["unfused"].values())
        return
    assert report["ffn_fused"] == n and len(report["fuse_ffn"]["fused"]) == n and not report["fuse_ffn"]["unfused"]
    fused = [m for m in model.modules() if isinstance(m, FusedInt8FFN)]
    assert len(fused) == n and sum(isinstance(m, FusedFFNInput) for m in model.modules()) == 2 * n
    assert fused[0].activation == ("gelu_tanh" if kind == "albert" else "gelu")
    parity = ctx.report["fuse_ffn_parity"]
    assert parity["error_fused"] <= parity["error_unfused"] + parity["tolerance"] and parity["ffn_fused"] == n
    assert 0 < parity["error_fused"] < FP32_TOL  # the activation rounding is there, and small
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max() / before.abs().max()) < FP32_TOL
    folder = export_model(model, tmp_path / "fused")
    again = stackcomp.load(folder)
    assert sum(isinstance(m, FusedInt8FFN) for m in again.modules()) == n
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, after)


def test_without_the_kernel_the_layer_computes_the_same_with_torch_ops(monkeypatch):
    torch.manual_seed(0)
    layer = FusedInt8FFN.from_layers(nn.Linear(24, 40), "gelu_tanh", nn.Linear(40, 8))
    x = torch.randn(5, 24)
    monkeypatch.setenv("STACKCOMP_KERNELS", "torch")
    ds_cpu.reset()
    try:
        with torch.inference_mode():
            y = layer(x)
    finally:
        monkeypatch.delenv("STACKCOMP_KERNELS")
        ds_cpu.reset()
    assert torch.equal(y, layer.forward_reference(x, exact=False))


def test_pack_leaves_other_ffns_unfused_and_says_why(tmp_path):
    model = make_tiny_model("bert")
    model.bert.encoder.layer[0].intermediate.intermediate_act_fn = nn.ReLU()
    model.bert.encoder.layer[1].output.dense = nn.Identity()  # not a linear: no FFN found there
    sites = {s.second: s for s in find_ffns(model)}
    assert len(sites) == 1 and "not GELU" in sites["bert.encoder.layer.0.output.dense"].reason
    model, ctx = run_pack(model, tmp_path, fuse_ffn=True)
    report = ctx.analysis.report
    assert report["ffn_fused"] == 0 and "not GELU" in report["fuse_ffn"]["unfused"]["bert.encoder.layer.0.output.dense"]
    assert not any(isinstance(m, FusedInt8FFN) for m in model.modules())


def test_fuse_ffn_is_off_by_default_and_parity_failures_raise(tmp_path):
    _ext()
    model, ctx = run_pack(make_tiny_model("bert"), tmp_path)
    assert "ffn_fused" not in ctx.analysis.report
    assert not any(isinstance(m, FusedInt8FFN) for m in model.modules())
    if not _ext().ffn_has_vnni():
        pytest.skip("this build has no VNNI path: pack fuses nothing, so there is no parity to fail")
    # the tiny random model's logits hardly depend on its FFNs (negating them moves the logits by
    # ~2%), so a tight tolerance: the kernel passes it (~1e-4), a kernel computing wrongly does not
    run_pack(make_tiny_model("bert"), tmp_path, fuse_ffn=True, fuse_ffn_tolerance=1e-3)
    real = FusedInt8FFN.forward
    try:
        FusedInt8FFN.forward = lambda self, x: -real(self, x)
        with pytest.raises(PassError, match="fuse_ffn_tolerance"):
            run_pack(make_tiny_model("bert"), tmp_path, fuse_ffn=True, fuse_ffn_tolerance=1e-3)
    finally:
        FusedInt8FFN.forward = real


def test_a_jit_trace_of_the_fused_int8_stack_records_its_arithmetic(tmp_path):
    """A compiled kernel call is opaque to torch.jit.trace (it would be baked in as a constant): while
    tracing, the int8 and fused layers record their arithmetic as ops, so the graph answers new inputs."""
    if not _ext().ffn_has_vnni():
        pytest.skip("this build has no VNNI path: pack fuses no FFN")
    model = run_int8(make_tiny_model("bert"), tmp_path / "i", backend="kernel")
    model, _ = run_pack(model, tmp_path / "p", fuse_ffn=True, fuse_qkv=True, fuse_norm=True)
    g = torch.Generator().manual_seed(0)
    ids, other = (torch.randint(1000, 2000, (3, 11), generator=g) for _ in range(2))
    mask = torch.ones_like(ids)
    mask[1:, 7:] = 0
    with torch.no_grad():
        traced = torch.jit.trace(model, (ids, mask), strict=False)
    with torch.inference_mode():
        for x in (ids, other):
            eager = model(input_ids=x, attention_mask=mask).logits
            assert torch.allclose(traced(x, mask)["logits"], eager, atol=1e-5 * float(eager.abs().max()))
