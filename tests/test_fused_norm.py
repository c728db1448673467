"""The fused residual add + LayerNorm: kernel against torch's layer_norm, the module against the block
output it replaces, finding them by structure, and ``pack``'s fuse_norm (parity, save/load, sizes).

Bounds: the kernel sums in fp32 in another order than torch (16 lanes, then across), so outputs agree
to a few float steps of the normalized values: 1e-5 absolute on values of order 1 (measured ~1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stackcomp
from stackcomp.artifacts import export_model
from stackcomp.errors import PassError
from stackcomp.evaluate import size_report
from stackcomp.kernels import ds_cpu
from stackcomp.nn.dense import densify
from stackcomp.nn.fused import FusedInt8FFN
from stackcomp.nn.fused_norm import FusedResidualNorm, ResidualNorm, find_residual_norms
from stackcomp.nn.fused_qkv import FusedInt8QKV
from stackcomp.passes.pack import FUSE_NORM_TOLERANCE

from conftest import kernel_extension, make_tiny_model, run_int8, run_pack

TOL = 1e-5


def _ext():
    return kernel_extension("add_layernorm")


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 384), (2, 5, 100), (0, 16)])
def test_kernel_matches_torch_layer_norm(shape):
    ext = _ext()
    g = torch.Generator().manual_seed(sum(shape))
    h, res = torch.randn(*shape, generator=g) * 3 + 1, torch.randn(*shape, generator=g)
    n = shape[-1]
    gamma, beta = torch.randn(n, generator=g), torch.randn(n, generator=g)
    out = ext.add_layernorm(h, res, gamma, beta, 1e-12)
    ref = F.layer_norm(h + res, (n,), gamma, beta, 1e-12)
    assert out.shape == ref.shape
    if n == 1:  # one value: normalized to 0, out = beta
        assert torch.allclose(out, beta.expand_as(out))
    assert torch.allclose(out, ref, atol=TOL, rtol=0)


def test_kernel_takes_strided_inputs_and_refuses_mismatches():
    ext = _ext()
    h = torch.randn(8, 64).t()  # not contiguous
    res = torch.randn(64, 8)
    gamma, beta = torch.ones(8), torch.zeros(8)
    assert torch.allclose(ext.add_layernorm(h, res, gamma, beta, 1e-5), F.layer_norm(h + res, (8,), eps=1e-5),
                          atol=TOL)
    with pytest.raises(RuntimeError, match="one shape"):
        ext.add_layernorm(torch.randn(4, 8), torch.randn(4, 9), gamma, beta, 1e-5)
    with pytest.raises(RuntimeError, match="gamma, beta"):
        ext.add_layernorm(torch.randn(4, 8), torch.randn(4, 8), torch.ones(7), beta, 1e-5)


def test_module_computes_the_block_output_and_keeps_its_keys():
    _ext()
    model = make_tiny_model("bert")
    out = model.bert.encoder.layer[0].output  # BertOutput: LayerNorm(dropout(dense(h)) + input)
    fused = FusedResidualNorm.from_module(out)
    assert fused.dense is out.dense and fused.LayerNorm is out.LayerNorm
    assert set(fused.state_dict()) == set(out.state_dict())
    h = torch.randn(2, 9, out.dense.in_features)
    x = torch.randn(2, 9, out.dense.out_features)
    with torch.inference_mode():
        assert torch.allclose(fused(h, x), out(h, x), atol=TOL)
    # with gradients: torch ops, the same numbers as the original, and a backward
    y = fused(h.clone().requires_grad_(), x)
    assert y.grad_fn is not None and torch.equal(y.detach(), out(h, x).detach())
    again = FusedResidualNorm.from_manifest(fused.manifest())
    assert (again.in_features, again.out_features, again.dense_bias, again.eps) == (
        out.dense.in_features, out.dense.out_features, True, out.LayerNorm.eps)
    st = fused.storage()
    assert st.params == 2 * out.dense.out_features and st.bytes == 8 * out.dense.out_features


@pytest.mark.parametrize("kind,per_layer", [("bert", 2), ("roberta", 2), ("electra", 2), ("deberta-v2", 2),
                                            ("distilbert", 0), ("albert", 0)])
def test_found_by_structure(kind, per_layer):
    model = make_tiny_model(kind)
    sites = find_residual_norms(model)
    layers = model.config.num_hidden_layers
    assert len(sites) == per_layer * layers and all(s.reason is None for s in sites)


@pytest.mark.parametrize("others", [False, True])
def test_pack_fuses_norms_checks_parity_and_round_trips(tmp_path, others):
    """fuse_norm alone on an int8 model, and after fuse_ffn + fuse_qkv (its dense is then the fused FFN);
    logits as before, sizes unchanged, the saved model loads with the same modules and logits, and
    densify gives a plain model that computes the same."""
    ext = _ext()
    model = run_int8(make_tiny_model("bert"), tmp_path / "i")
    ids = torch.randint(0, 1000, (3, 11))
    fusions = {"fuse_ffn": True, "fuse_qkv": True} if others and ext.ffn_has_vnni() else {}
    unfused, _ = run_pack(run_int8(make_tiny_model("bert"), tmp_path / "j"), tmp_path / "u", **fusions)
    model, ctx = run_pack(model, tmp_path / "p", fuse_norm=True, **fusions)
    report = ctx.analysis.report
    assert report["norm_fused"] == 4 and not report["fuse_norm"]["unfused"]
    norms = [m for m in model.modules() if isinstance(m, FusedResidualNorm)]
    assert len(norms) == 4
    if fusions:
        assert sum(isinstance(m.dense, FusedInt8FFN) for m in norms) == 2
        assert any(isinstance(m, FusedInt8QKV) for m in model.modules())
    parity = ctx.report["fuse_norm_parity"]
    assert parity["fused_vs_unfused"] <= FUSE_NORM_TOLERANCE
    with torch.inference_mode():
        after, before = model(input_ids=ids).logits, unfused(input_ids=ids).logits
    assert float((after - before).abs().max() / before.abs().max()) < FUSE_NORM_TOLERANCE
    assert size_report(model) == size_report(unfused)
    again = stackcomp.load(export_model(model, tmp_path / "fused"))
    assert sum(isinstance(m, FusedResidualNorm) for m in again.modules()) == 4
    with torch.inference_mode():
        assert torch.equal(again(input_ids=ids).logits, after)
        plain = densify(again)
        assert not any(isinstance(m, FusedResidualNorm) for m in plain.modules())
        assert sum(isinstance(m, ResidualNorm) for m in plain.modules()) == 4
        dense_logits = plain(input_ids=ids).logits
    assert float((dense_logits - after).abs().max() / after.abs().max()) < 0.1  # int8 activations vs fp32


def test_fuse_norm_off_by_default_unfit_modules_say_why_and_parity_failures_raise(tmp_path):
    _ext()
    model, ctx = run_pack(make_tiny_model("bert"), tmp_path)
    assert "norm_fused" not in ctx.analysis.report
    model = make_tiny_model("bert")
    model.bert.encoder.layer[0].output.LayerNorm = nn.LayerNorm(model.config.hidden_size, elementwise_affine=False)
    model, ctx = run_pack(model, tmp_path, fuse_norm=True)
    report = ctx.analysis.report
    assert report["norm_fused"] == 3 and "affine" in report["fuse_norm"]["unfused"]["bert.encoder.layer.0.output"]
    real = FusedResidualNorm.forward
    try:
        FusedResidualNorm.forward = lambda self, h, x: real(self, h, x) + 1.0  # not LayerNorm(dense(h) + x)
        with pytest.raises(PassError, match="fused residual LayerNorm"):
            run_pack(make_tiny_model("bert"), tmp_path, fuse_norm=True)
    finally:
        FusedResidualNorm.forward = real


def test_without_the_kernel_the_module_uses_torch_ops(monkeypatch):
    model = make_tiny_model("bert")
    out = model.bert.encoder.layer[1].attention.output
    fused = FusedResidualNorm.from_module(out)
    h = torch.randn(4, out.dense.in_features)
    x = torch.randn(4, out.dense.out_features)
    monkeypatch.setenv("STACKCOMP_KERNELS", "torch")
    ds_cpu.reset()
    try:
        with torch.inference_mode():
            y = fused(h, x)
    finally:
        monkeypatch.delenv("STACKCOMP_KERNELS")
        ds_cpu.reset()
    with torch.inference_mode():
        assert torch.equal(y, out.LayerNorm(out.dense(h) + x))
