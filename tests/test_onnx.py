"""ONNX export: int8 layers as integer ops with their backend's arithmetic, DS layers as a weight
ONNX Runtime folds at load, the optimum folder layout, and ORT latency in ``evaluate``.

Tolerances: the int8 ops against their backends 1e-5 of max |y| (float rounding of the rescale;
the integers are exact); ONNX Runtime against torch 1e-3 of max |logit| (the pack pass's default).
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from stackcomp.nn.packed import PackedDSLinear
from stackcomp.nn.quantized import (
    BitsAndBytesInt8,
    IntMMInt8,
    Int8Linear,
    Int8LowRankLinear,
    KernelInt8,
    TorchDynamicInt8,
    quantize_rows,
)
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.int8 import Int8Pass
from stackcomp.passes.pack import PackPass

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx

from stackcomp.onnx_export import ort_session, run_session
from stackcomp.onnx_ops import int8_linear


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _run_pack(model, tmp_path, tokenizer=None, **params):
    ctx = PassContext(stage="pk", work_dir=tmp_path, tokenizer=tokenizer)
    p = PackPass({"target": "onnx", **params})
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    return p.transform(model, ctx), ctx.report["onnx"]


def _int8(model, tmp_path, backend):
    ctx = PassContext(stage="q", work_dir=tmp_path)
    q = Int8Pass({"backend": backend})
    ctx.analysis = as_analysis(q.analyze(model, ctx))
    return q.transform(model, ctx)


# ----------------------------------------------------------------------------- int8 ops


@pytest.mark.parametrize("backend", [TorchDynamicInt8, BitsAndBytesInt8, IntMMInt8, KernelInt8])
def test_int8_ops_compute_what_the_backend_computes(backend):
    """The recorded op is the backend's arithmetic, not the dequantized GEMM (which differs by the
    activation rounding): inputs with and without negatives, all zeros, a zero row."""
    be = backend()
    if not be.available(torch.device("cpu"))[0]:
        pytest.skip(be.available(torch.device("cpu"))[1])
    g = torch.Generator().manual_seed(0)
    q, s = quantize_rows(torch.randn(48, 384, generator=g))
    b = torch.randn(48, generator=g)
    h = be.prepare(q, s, b)
    # 2,000 tokens: enough entries that x / s and fbgemm's fma(x, 1/s, zp) round some differently
    xs = [torch.randn(7, 384, generator=g) * 3 + 1, torch.rand(5, 384, generator=g), torch.zeros(3, 384),
          torch.randn(2000, 384, generator=g)]
    xs[0][2] = 0
    for x in xs:
        with torch.no_grad():
            ref = be.run(x, h)
            got = int8_linear(x, q, s, b, be.name)
        assert rel(got, ref) < 1e-5, rel(got, ref)
    deq = xs[0] @ (q.float() * s[:, None]).t() + b
    assert rel(int8_linear(xs[0], q, s, b, be.name), deq) > 1e-4  # the rounding is really there


@pytest.mark.parametrize("backend", ["torch", "bitsandbytes", "intmm", "kernel"])
def test_int8_pack_onnx_passes_default_parity_with_integer_matmuls(tmp_path, backend):
    if backend == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    model = _int8(make_tiny_model("bert"), tmp_path, backend)
    # and one int8 low-rank layer (two chained integer GEMMs)
    ffn = model.bert.encoder.layer[0].intermediate
    ffn.dense = Int8LowRankLinear.from_lowrank(_lowrank(ffn.dense.to_dense(), ffn.dense.bias), backend)
    n_int8 = sum(isinstance(m, Int8Linear) for m in model.modules()) + 2
    model, rep = _run_pack(model, tmp_path)  # default onnx_tolerance
    assert rep["parity"]["max_rel_diff"] < 1e-3 and rep["parity"]["argmax_agreement"] == 1.0
    assert rep["int8_matmuls"] == n_int8 == _ops(tmp_path / rep["path"]).count("MatMulInteger")
    weights = {t.name: t for t in onnx.load(str(tmp_path / rep["path"])).graph.initializer}
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in weights.values()) >= n_int8  # weights stay int8
    # on other inputs too (longer, another batch size): torch's int8 arithmetic, to float rounding
    sess = ort_session(tmp_path / rep["path"])
    ids = torch.randint(0, 30000, (5, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert rel(run_session(sess, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}), ref) < 1e-4


def _lowrank(w, bias, rank=8):
    from stackcomp.nn.lowrank import LowRankLinear

    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    layer = LowRankLinear(w.shape[1], w.shape[0], rank, bias=bias is not None)
    with torch.no_grad():
        layer.U.copy_(u[:, :rank] * s[:rank])
        layer.V.copy_(vh[:rank])
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


# ----------------------------------------------------------------------------- DS


def _packed_ds(inp, out, block, atoms, nnz, dtype="fp32", seed=0):
    from stackcomp.nn.ds_linear import DSLinear

    g = torch.Generator().manual_seed(seed)
    nb = inp // block
    d = torch.randn(nb, atoms, block, generator=g)
    v = torch.randn(nb, out, nnz, generator=g)
    idx = torch.stack([torch.stack([torch.randperm(atoms, generator=g)[:nnz] for _ in range(out)])
                       for _ in range(nb)])
    return PackedDSLinear.from_ds(DSLinear.from_factors(d, v, idx, torch.randn(out, generator=g)), dtype=dtype)


class _Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_ds_export_forms_agree_with_the_reference(dtype):
    from stackcomp.kernels.reference import ds_forward_reference

    layer = _packed_ds(64, 40, 16, 24, 3, dtype)
    x = torch.randn(2, 9, 64)
    ref = ds_forward_reference(x, *layer.packed().unpack())
    for form in PackedDSLinear.EXPORT_FORMS:
        assert rel(layer.forward_standard_ops(x, form), ref) < 2e-5, form


def test_ds_weight_form_keeps_factors_in_the_file_and_folds_at_load(tmp_path):
    """Large enough that the exporter keeps the factors (it folds tiny ones): the file holds them,
    ONNX Runtime rebuilds the weight once at load (its optimized graph has no Gather), output exact."""
    import onnxruntime as ort

    layer = _packed_ds(256, 384, 16, 48, 4)
    path = tmp_path / "ds.onnx"
    dyn = torch.export.Dim.DYNAMIC
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        torch.onnx.export(_Wrap(layer).eval(), (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                          dynamic_shapes=({0: dyn, 1: dyn},), external_data=False, verbose=False)
    proto = onnx.load(str(path))
    proto.ir_version = 9
    onnx.save(proto, str(path))
    assert path.stat().st_size < 0.6 * 256 * 384 * 4  # factors, not the dense fp32 weight
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "ds.opt.onnx")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert "Gather" in _ops(path) and "Gather" not in _ops(tmp_path / "ds.opt.onnx")
    xs = torch.randn(3, 11, 256)
    got = torch.from_numpy(sess.run(["y"], {"x": xs.numpy()})[0])
    with torch.no_grad():
        assert rel(got, layer(xs)) < 1e-5


def test_ds_int8_pack_onnx_matches_torch(tmp_path):
    from stackcomp.passes.ds_factorize import DSFactorizePass

    model = make_tiny_model("bert")
    ctx = PassContext(stage="ds", work_dir=tmp_path)
    p = DSFactorizePass({"block": 16, "atoms": 16, "nnz": 4, "iters": 2, "train": {"epochs": 0}})
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    model = _int8(p.finetune(p.transform(model, ctx), ctx), tmp_path, "torch")
    model, rep = _run_pack(model, tmp_path)
    assert sum(isinstance(m, PackedDSLinear) for m in model.modules()) > 0
    assert rep["parity"]["max_rel_diff"] < 1e-3 and rep["parity"]["argmax_agreement"] == 1.0


# ----------------------------------------------------------------------------- folder, evaluate


def test_onnx_folder_is_what_optimum_reads(tmp_path, minilm_tokenizer_dir):
    """model.onnx + a plain config.json (no stackcomp quantization_config: the graph needs no
    stackcomp) + tokenizer files; tokenized text through the session gives the torch logits.
    (optimum's ORTModel classes live in optimum-onnx, which needs transformers < 4.58: not
    installable here, so the layout is checked with transformers and ONNX Runtime directly.)"""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    model = _int8(make_tiny_model("bert"), tmp_path, "torch")
    model, _ = _run_pack(model, tmp_path / "art", tokenizer=tok)
    folder = tmp_path / "art" / "onnx"
    assert (folder / "model.onnx").is_file() and (folder / "tokenizer.json").is_file()
    raw = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in raw and raw["architectures"] == ["BertForSequenceClassification"]
    assert AutoConfig.from_pretrained(folder).num_labels == 2
    batch = AutoTokenizer.from_pretrained(folder)(["a fine film", "dull and far too long"], padding=True,
                                                  return_tensors="pt")
    got = run_session(ort_session(folder / "model.onnx"), dict(batch))
    with torch.no_grad():
        ref = model(**batch).logits
    assert rel(got, ref) < 1e-3


def test_evaluate_after_onnx_pack_reports_ort_latency(tmp_path, tiny_model_dirs, data_env):
    from stackcomp.engine import Engine
    from stackcomp.plan import build_plan
    from stackcomp.recipe import load_recipe
    from stackcomp.render import leaderboard_columns
    from stackcomp.report import compare

    rec = tmp_path / "r.yaml"
    rec.write_text(textwrap.dedent(f"""
        name: tiny-onnx
        model: {tiny_model_dirs['bert']}
        task: glue/sst2
        data: {{max_length: 32}}
        stages:
          q: {{pass: int8}}
          pk: {{pass: pack, after: q, params: {{target: onnx, onnx_int8: true}}}}
          ev: {{pass: evaluate, after: pk, params: {{latency_batches: 2, latency_batch_size: 4, threads: 1}}}}
    """))
    summary = Engine(build_plan(load_recipe(rec)), tmp_path / "run").run()
    ev = next(s for s in summary["stages"] if s["stage"] == "ev")["metrics"]
    assert ev["ort_latency_ms_per_batch"] > 0 and ev["ort_latency_threads"] == 1
    assert ev["ort_int8_latency_ms_per_batch"] > 0 and ev["ort_int8_latency_threads"] == 1
    assert ev["latency_ms_per_batch"] > 0  # the torch timing stays beside it
    # each graph scored on dev in ONNX Runtime: the fp32 graph computes the torch model's int8 arithmetic
    # (parity 1e-3), so it answers as the torch model does; ONNX Runtime's own int8 rounds differently
    assert abs(ev["ort_accuracy"] - ev["accuracy"]) <= 0.02 and 0 <= ev["ort_int8_accuracy"] <= 1
    cmp = compare([tmp_path / "run"], load_sizes=False)
    row = next(r for r in cmp.rows if r.leaf == "pk")  # the packed model, measured by ev
    assert row.ort_latency_ms == pytest.approx(ev["ort_latency_ms_per_batch"])
    assert "ORT ms" in [h for h, _ in leaderboard_columns(cmp)]


def test_fused_qkv_exports_as_one_integer_matmul_per_block(tmp_path):
    model = _int8(make_tiny_model("bert"), tmp_path, "torch")
    n_int8 = sum(isinstance(m, Int8Linear) for m in model.modules())
    model, rep = _run_pack(model, tmp_path, fuse_qkv=True)
    assert rep["parity"]["max_rel_diff"] < 1e-3 and rep["parity"]["argmax_agreement"] == 1.0
    assert rep["int8_matmuls"] == n_int8 - 2 * 2 == _ops(tmp_path / rep["path"]).count("MatMulInteger")  # 2 blocks


def test_sessions_timed_beside_torch_can_stop_spinning(tmp_path):
    _, rep = _run_pack(_int8(make_tiny_model("bert"), tmp_path, "torch"), tmp_path)
    key = "session.intra_op.allow_spinning"
    quiet = ort_session(tmp_path / rep["path"], 2, spinning=False).get_session_options()
    assert quiet.get_session_config_entry(key) == "0"
    default = ort_session(tmp_path / rep["path"], 2).get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: unset
        default.get_session_config_entry(key)
