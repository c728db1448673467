"""The fused int8 QKV projection: the module against the three Int8Linear it replaces, ``pack``'s
fuse_qkv on BERT, DistilBERT and ALBERT, save/load, densify and the fallbacks (transformers'
``from_pretrained`` of a fused model: tests/test_hf_loading.py, kind ``int8_fused_qkv``).

Bound: the fused GEMM quantizes the same input the same way (per tensor on the torch backend, per row
on intmm) and sums the same int8 products exactly, so its outputs equal the separate linears' up to
the fp32 epilogue's summation order: 1e-5 of max |y| here (pack's own check is 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stackcomp
from stackcomp.artifacts import export_model
from stackcomp.errors import PassError
from stackcomp.kernels.reference import KernelError
from stackcomp.nn.dense import densify
from stackcomp.nn.fused_qkv import FusedInt8QKV, FusedQKVPart, find_qkvs, fused_qkv_modules, link_fused_qkv
from stackcomp.nn.quantized import Int8Linear, get_backend
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.int8 import Int8Pass
from stackcomp.passes.pack import PackPass

from conftest import make_tiny_model

REL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= REL * float(b.abs().max())


def _backends() -> list[str]:
    return [b for b in ("torch", "intmm", "kernel") if get_backend(b).available(torch.device("cpu"))[0]]


def _ctx(tmp_path):
    return PassContext(stage="pack", work_dir=tmp_path)


def _int8(model, tmp_path, backend="torch"):
    q = Int8Pass({"backend": backend})
    ctx = _ctx(tmp_path)
    ctx.analysis = as_analysis(q.analyze(model, ctx))
    return q.transform(model, ctx)


def _pack(model, tmp_path, **params):
    p = PackPass({"target": "cpu", **params})
    ctx = _ctx(tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    return p.transform(model, ctx), ctx


@pytest.mark.parametrize("backend", _backends())
def test_fused_layer_equals_the_three_int8_linears(backend):
    torch.manual_seed(0)
    q, k, v = (Int8Linear.from_linear(nn.Linear(48, n), backend) for n in (32, 32, 24))
    fused = FusedInt8QKV.from_linears(q, k, v)
    key, value = FusedQKVPart("key", 32), FusedQKVPart("value", 24)
    key.link(fused)
    value.link(fused)
    assert (fused.out_features, fused.query_features, fused.key_features, fused.value_features) == (88, 32, 32, 24)
    x = torch.randn(3, 7, 48) * 3
    with torch.inference_mode():
        got = (fused(x), key(x), value(x))
        want = (q(x), k(x), v(x))
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and _close(g, w)
        assert not fused._saved  # the value part used the kept activations up
        # a part called on another input (not the one the fused layer last saw) computes its own slice
        other = torch.randn(2, 5, 48)
        fused(x)
        assert _close(value(other), v(other)) and _close(key(other), k(other))
    # what it stores and stands for: the three int8 weights; the parts hold nothing
    st = fused.storage()
    assert st.dense_params == 48 * 88 + 88 and st.bytes == 48 * 88 + 4 * (88 + 88)
    assert key.storage().bytes == 0 and key.storage().dense_params == 0
    again = FusedInt8QKV.from_manifest(fused.manifest())
    assert (again.query_features, again.key_features, again.backend) == (32, 32, backend)


def test_bad_stacks_and_unlinked_parts_are_refused():
    a, b = Int8Linear.from_linear(nn.Linear(16, 8)), Int8Linear.from_linear(nn.Linear(12, 8))
    with pytest.raises(KernelError, match="in_features"):
        FusedInt8QKV.from_linears(a, a, b)
    c = Int8Linear.from_linear(nn.Linear(16, 8, bias=False))
    with pytest.raises(KernelError, match="bias"):
        FusedInt8QKV.from_linears(a, a, c)
    with pytest.raises(KernelError, match="no value features"):
        FusedInt8QKV(16, 16, query_features=8, key_features=8)
    with pytest.raises(KernelError, match="not linked"):
        FusedQKVPart("key", 8)(torch.randn(2, 16))
    fused = FusedInt8QKV.from_linears(a, a, a)
    with pytest.raises(KernelError, match="outputs"):
        FusedQKVPart("value", 9).link(fused)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "albert"])
def test_pack_fuses_qkv_matches_and_round_trips(tmp_path, kind):
    model = _int8(make_tiny_model(kind), tmp_path)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model, ctx = _pack(model, tmp_path, fuse_qkv=True)
    report = ctx.analysis.report
    n = {"bert": 2, "distilbert": 2, "albert": 1}[kind]  # ALBERT shares one layer
    assert report["qkv_fused"] == n and not report["fuse_qkv"]["unfused"]
    assert sum(isinstance(m, FusedInt8QKV) for m in model.modules()) == n
    assert sum(isinstance(m, FusedQKVPart) for m in model.modules()) == 2 * n
    assert ctx.report["fuse_qkv_parity"]["fused_vs_unfused"] <= REL
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert _close(after, before)
    folder = export_model(model, tmp_path / "fused")
    again = stackcomp.load(folder)  # the parts are linked again on load
    assert sum(isinstance(m, FusedQKVPart) and m._fused is not None for m in again.modules()) == 2 * n
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, after)
    # densify: each part becomes its own fp32 linear again, and the model computes what the fp32 int8 weights do
    dense = densify(again)
    assert not any(isinstance(m, (FusedInt8QKV, FusedQKVPart)) for m in dense.modules())
    with torch.no_grad():
        assert float((dense(input_ids=ids).logits - after).abs().max()) < 5e-2 * float(after.abs().max())


def test_pack_leaves_fp32_projections_unfused_and_says_why(tmp_path):
    model, ctx = _pack(make_tiny_model("bert"), tmp_path, fuse_qkv=True)
    report = ctx.analysis.report
    assert report["qkv_fused"] == 0 and len(report["fuse_qkv"]["unfused"]) == 2
    assert all("Linear projections stay unfused" in why for why in report["fuse_qkv"]["unfused"].values())
    model = _int8(make_tiny_model("bert"), tmp_path)
    assert "qkv_fused" not in _pack(model, tmp_path)[1].analysis.report  # off by default


def test_parity_failure_raises_and_link_checks_the_pattern(tmp_path):
    real = FusedInt8QKV.forward
    try:
        FusedInt8QKV.forward = lambda self, x: 2 * real(self, x)
        with pytest.raises(PassError, match="fused QKV"):
            _pack(_int8(make_tiny_model("bert"), tmp_path), tmp_path, fuse_qkv=True)
    finally:
        FusedInt8QKV.forward = real
    model = _int8(make_tiny_model("bert"), tmp_path)
    site = find_qkvs(model)[0]
    modules = fused_qkv_modules(model, site)
    model.get_submodule(site.key.rsplit(".", 1)[0]).key = modules[site.key]  # a part beside an unfused query
    with pytest.raises(KernelError, match="not the FusedInt8QKV"):
        link_fused_qkv(model)


def test_pruned_heads_fused_load_with_their_head_count(tmp_path):
    """A pruned model (fewer heads per block) with fused projections loads again: the head count
    comes from the fused layer's query_features, not from the stacked weight's rows."""
    from transformers import AutoModelForSequenceClassification

    from stackcomp.nn.pruning import blocks, remove_units

    model = make_tiny_model("bert")
    found = blocks(model, "test")
    remove_units(model, [[1], [0, 1]], [list(range(b.neurons)) for b in found])  # 2 heads each before
    model, _ = _pack(_int8(model, tmp_path), tmp_path, fuse_qkv=True)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    folder = export_model(model, tmp_path / "pruned-fused")
    for again in (stackcomp.load(folder), AutoModelForSequenceClassification.from_pretrained(folder)):
        heads = [b.attention.self.num_attention_heads for b in again.bert.encoder.layer]
        assert heads == [1, 2]
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, ref)
