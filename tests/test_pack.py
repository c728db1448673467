"""PackedDSLinear / Sparse24Linear and the pack pass: kernels against the reference, save/load,
plan-time refusal, ONNX parity, and the ALBERT recipe end to end on a tiny ALBERT.

Tolerances (max |y - ref| / max |ref|, as in tests/test_kernels.py):
* fp32 packs: 2e-5 against the float64 reference on the same factors;
* int8 packs: 2e-3 against the reference run on the *dequantized* packed tensors (the q15
  kernel's own rounding: int16 activations, Q15 values), 5e-2 against the unquantized fp32 layer;
  where the vnni8 kernel runs (8-bit activations), 1e-5 against its oracle
  (``ds_forward_act8_reference``, the same rounding in torch);
* the standard-ops (ONNX) path: 2e-5 against the reference on the dequantized tensors;
* ONNX Runtime vs torch logits: 1e-3 of max |logit| (the pack pass's default check).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import stackcomp
from stackcomp.artifacts import export_model
from stackcomp.errors import ArtifactError, PlanError
from stackcomp.kernels import KernelError, ds_cpu
from stackcomp.kernels.reference import ds_forward_act8_reference, ds_forward_reference
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.nn.packed import PackedDSLinear, Sparse24Linear
from stackcomp.nn.quantized import Int4Embedding, Int8DSLinear, Int8Embedding
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.ds_factorize import DSFactorizePass
from stackcomp.passes.int8 import Int8Pass
from stackcomp.passes.pack import PackPass
from stackcomp.plan import build_plan
from stackcomp.recipe import load_recipe, recipe_from_dict

from conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
FP32_TOL, INT8_KERNEL_TOL, INT8_PACK_TOL = 2e-5, 2e-3, 5e-2
# (in, out, block, atoms, nnz): one block / several, out not a multiple of 8, K > 256 (int16 indices)
SHAPES = [(24, 21, 24, 16, 3), (64, 32, 16, 40, 4), (16, 13, 8, 300, 5)]


def rel_err(y, r):
    y, r = y.detach().double(), r.detach().double()
    return float((y - r).abs().max() / r.abs().max().clamp_min(1e-30))


def make_ds_layer(inp, out, block, atoms, nnz, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    nb = inp // block
    d = torch.randn(nb, atoms, block, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    v = torch.randn(nb, out, nnz, generator=g)
    idx = torch.stack([torch.stack([torch.randperm(atoms, generator=g)[:nnz] for _ in range(out)]) for _ in range(nb)])
    b = torch.randn(out, generator=g) if bias else None
    return DSLinear.from_factors(d, v, idx, b)


def cpu_kernel_available() -> bool:
    if os.environ.get("STACKCOMP_SKIP_KERNEL_BUILD"):
        return False
    return ds_cpu.get_extension() is not None


def int8_oracle(layer, x, kernel="auto"):
    """(reference, tolerance) an int8 packed layer answers to: the 8-bit-activation oracle where the
    vnni8 kernel runs it (compiled CPU kernel, more than SMALL_MAX_TOKENS tokens, a CPU with AVX-512
    VBMI + VNNI), else the exact reference on the dequantized tensors."""
    p = layer.packed()
    T = x.numel() // x.shape[-1]
    if (kernel in ("cpu", "auto") and p.target == "cpu" and cpu_kernel_available() and T > ds_cpu.SMALL_MAX_TOKENS
            and ds_cpu.int8_kernel(p, ds_cpu.get_extension()) == "vnni8"):
        return ds_forward_act8_reference(x, *p.unpack_int8()), 1e-5
    return ds_forward_reference(x, *p.unpack()), INT8_KERNEL_TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("kernel", ["cpu", "torch", "reference", "auto"])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_forward_matches_reference(shape, dtype, kernel, bias):
    if kernel == "cpu" and not cpu_kernel_available():
        pytest.skip("the C++ kernel is not built here")
    ds = make_ds_layer(*shape, bias=bias)
    layer = PackedDSLinear.from_ds(ds, target="cpu", dtype=dtype, kernel=kernel)
    d, v, i, b = layer.packed().unpack()
    for T in (1, 3, 131):
        x = torch.randn(T, shape[0])
        with torch.no_grad():
            y = layer(x)
        ref, tol = (ds_forward_reference(x, d, v, i, b), FP32_TOL) if dtype == "fp32" else int8_oracle(layer, x, kernel)
        assert rel_err(y, ref) < tol, (T, kernel)
        exact = ds_forward_reference(x, ds.dictionary, ds.values, ds.indices, ds.bias)
        assert rel_err(y, exact) < (FP32_TOL if dtype == "fp32" else INT8_PACK_TOL)
    # leading dims and dtype are kept
    x = torch.randn(2, 5, shape[0], dtype=torch.float64)
    with torch.no_grad():
        assert layer(x).shape == (2, 5, shape[1]) and layer(x).dtype == torch.float64


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("layout", ["cpu", "cuda"])
def test_standard_ops_path_and_cuda_layout_on_cpu(dtype, layout):
    """The ONNX path (matmul + gather + mul + sum) and CUDA-layout packs run on the torch path here."""
    ds = make_ds_layer(*SHAPES[1])
    layer = PackedDSLinear.from_ds(ds, target=layout, dtype=dtype)
    d, v, i, b = layer.packed().unpack()
    x = torch.randn(37, SHAPES[1][0])
    ref = ds_forward_reference(x, d, v, i, b)
    assert rel_err(layer.forward_standard_ops(x), ref) < FP32_TOL
    kref, tol = (ref, FP32_TOL) if dtype == "fp32" else int8_oracle(layer, x)
    with torch.no_grad():
        assert rel_err(layer(x), kref) < tol
    assert rel_err(layer.to_dense(), ds.to_dense() if dtype == "fp32" else Int8DSLinear.from_ds(ds).to_dense()) < 1e-5


TRITON_SCRIPT = """
import torch, json
from stackcomp.kernels.reference import ds_forward_act8_reference, ds_forward_reference
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.nn.packed import PackedDSLinear
torch.manual_seed(0)
d = torch.nn.functional.normalize(torch.randn(2, 16, 16), dim=-1)
idx = torch.stack([torch.stack([torch.randperm(16)[:4] for _ in range(24)]) for _ in range(2)])
ds = DSLinear.from_factors(d, torch.randn(2, 24, 4), idx, torch.randn(24))
out = {}
for dtype in ("fp32", "int8"):
    layer = PackedDSLinear.from_ds(ds, target="cuda", dtype=dtype, kernel="triton")
    x = torch.randn(19, 32)
    ref = ds_forward_reference(x, *layer.packed().unpack())
    with torch.no_grad():
        y = layer(x)
    out[dtype] = float((y - ref).abs().max() / ref.abs().max())
print(json.dumps(out))
"""


def test_packed_layer_triton_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    errs = json.loads(r.stdout.strip().splitlines()[-1])
    assert errs["fp32"] < FP32_TOL and errs["int8"] < INT8_KERNEL_TOL, errs


def _ctx(tmp_path, stage="t"):
    return PassContext(stage=stage, work_dir=tmp_path)


def _stack(tmp_path, int8: bool, kind: str = "bert", embeddings: bool | str = False):
    model = make_tiny_model(kind)
    ctx = _ctx(tmp_path)
    p = DSFactorizePass({"block": 16, "atoms": 16, "nnz": 4, "iters": 2, "train": {"epochs": 0}})
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    model = p.finetune(p.transform(model, ctx), ctx)
    if int8:
        q = Int8Pass({"backend": "torch", "embeddings": embeddings, "embedding_group_size": 16})
        ctx = _ctx(tmp_path)
        ctx.analysis = as_analysis(q.analyze(model, ctx))
        model = q.transform(model, ctx)
    return model


@pytest.mark.parametrize("int8", [False, True])
def test_pack_pass_save_load_and_exact_storage(tmp_path, int8):
    model = _stack(tmp_path, int8)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    p = PackPass({"target": "cpu"})
    ctx = _ctx(tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    report = ctx.analysis.report
    model = p.transform(model, ctx)
    assert report["packed_ds"] == 12 and report["layout"] == "cpu"
    assert report["ds_kernel"] == ("cpu" if cpu_kernel_available() else "torch") and report["ds_kernel_reason"]
    packed = [m for m in model.modules() if isinstance(m, PackedDSLinear)]
    assert len(packed) == 12 and all(m.meta["dtype"] == ("int8" if int8 else "fp32") for m in packed)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    # the packed model computes what the unpacked one did (int8: packed kernel vs int8 backend arithmetic)
    assert rel_err(after, before) < (1e-4 if not int8 else 5e-2)
    folder = export_model(model, tmp_path / "packed")
    again = stackcomp.load(folder)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, after)
    # storage() counts exactly the bytes of the layer's tensors in the safetensors file
    name = "bert.encoder.layer.0.intermediate.dense"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        on_disk = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                      if k.startswith(name + "."))
    assert again.get_submodule(name).storage().bytes == on_disk


def test_packed_manifest_errors_are_clear():
    with pytest.raises(ArtifactError, match="meta"):
        PackedDSLinear.from_manifest({"layout_version": 1})
    with pytest.raises(ArtifactError, match="format"):
        PackedDSLinear.from_manifest({"meta": {"format": "other"}})
    with pytest.raises(KernelError, match="kernel"):
        PackedDSLinear.from_ds(make_ds_layer(*SHAPES[0]), kernel="fast")


def _pruned_24(out=32, inp=64, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        g = lin.weight.view(out, inp // 4, 4)
        drop = torch.rand(out, inp // 4, 4).argsort(-1)[..., :2]  # 2 random positions per group
        g.scatter_(-1, drop, 0.0)
        g[0, 0] = 0  # a group with fewer than 2 nonzeros
    return lin


def test_sparse24_linear_exact_and_compact(tmp_path):
    lin = _pruned_24()
    layer = Sparse24Linear.from_linear(lin)
    assert torch.equal(layer.to_dense(), lin.weight.detach())
    x = torch.randn(3, 5, 64)
    assert torch.allclose(layer(x), lin(x), atol=1e-6)
    assert layer.last_path == "dense"  # no CUDA here
    st = layer.storage()
    assert st.bytes == 32 * 32 * 4 + 32 * 16 + 32 * 4 and st.dense_bytes == (32 * 64 + 32) * 4
    with pytest.raises(KernelError, match="not 2:4"):
        Sparse24Linear.from_linear(nn.Linear(64, 8))


def test_pack_keeps_24_layers_dense_on_cpu_and_says_so(tmp_path):
    model = make_tiny_model("bert")
    name = "bert.encoder.layer.1.output.dense"
    src = _pruned_24(32, 64)
    model.get_submodule(name).weight.data.copy_(src.weight.data)
    p = PackPass({"target": "cpu"})
    ctx = _ctx(tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    report = ctx.analysis.report
    model = p.transform(model, ctx)
    assert report["layers"][name]["to"] == "Linear" and "CUDA" in report["layers"][name]["kept_dense"]
    assert report["sparse24_kept_dense"] == 1 and "kept dense" in report["sparse24_note"]
    assert type(model.get_submodule(name)) is nn.Linear
    assert list(report["layers"]) == [name]  # dense layers without 2:4 zeros are not listed


def test_pack_must_be_last_at_plan_time():
    def plan(stages):
        return build_plan(recipe_from_dict({"name": "r", "model": "m", "stages": stages}))

    with pytest.raises(PlanError, match=r"stage 'q' \(int8\) comes after 'pk' \(pack\), but pack must be the last"):
        plan({"pk": {"pass": "pack"}, "q": {"pass": "int8", "after": "pk"}})
    with pytest.raises(PlanError, match="must be the last"):  # further down the chain too
        plan({"pk": {"pass": "pack"}, "e": {"pass": "evaluate", "after": "pk"},
              "q": {"pass": "int8", "after": "pk"}, "x": {"pass": "pack", "after": "q"}})
    # measuring and exporting a packed model is fine
    ok = plan({"pk": {"pass": "pack", "params": {"target": "cpu"}}, "e": {"pass": "evaluate", "after": "pk"},
               "out": {"pass": "export", "after": "pk", "params": {"path": "/tmp/x"}}})
    assert set(ok.stages) >= {"pk", "e", "out"}
    with pytest.raises(PlanError, match="target"):
        plan({"pk": {"pass": "pack", "params": {"target": "tpu"}}})


def test_pack_onnx_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    model = _stack(tmp_path, int8=True)
    ctx = _ctx(tmp_path)
    p = PackPass({"target": "onnx", "onnx_int8": True})
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    model = p.transform(model, ctx)
    rep = ctx.report["onnx"]
    assert rep["parity"]["max_rel_diff"] < 1e-3 and rep["parity"]["argmax_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / rep["path"])).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMul" in ops, ops  # DS layers as standard ops (the weight rebuilt from the factors, one GEMM)
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    # ORT's own int8 on top: weights quantized, logits close
    assert rep["int8"]["parity"]["max_rel_diff"] < 0.1
    assert (tmp_path / rep["int8"]["path"]).exists()


@pytest.mark.parametrize("embeddings", ["int8", "int4"])
def test_pack_onnx_parity_quantized_embeddings(tmp_path, embeddings):
    """DS + int8 with int8 / 4-bit embedding tables: exported with the tables still packed, parity in ORT."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    model = _stack(tmp_path, int8=True, embeddings=embeddings)
    kind = Int8Embedding if embeddings == "int8" else Int4Embedding
    word = model.bert.embeddings.word_embeddings
    assert type(word) is kind and (embeddings == "int8" or word.weight_scale.shape[1] == 2)  # 2 groups a row
    ctx = _ctx(tmp_path)
    p = PackPass({"target": "onnx", "onnx_int8": True})
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    model = p.transform(model, ctx)
    assert type(model.bert.embeddings.word_embeddings) is kind
    rep = ctx.report["onnx"]
    assert rep["parity"]["max_rel_diff"] < 1e-3 and rep["parity"]["argmax_agreement"] == 1.0
    proto = onnx.load(str(tmp_path / rep["path"]))
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert "BitShift" not in {n.op_type for n in proto.graph.node}
    table = next(t for t in proto.graph.initializer if t.name.endswith("word_embeddings.weight"))
    # the table is exported as stored (int8 rows, or two 4-bit codes a byte), not dequantized to fp32
    want = onnx.TensorProto.INT8 if embeddings == "int8" else onnx.TensorProto.UINT8
    assert table.data_type == want and list(table.dims) == list(word.weight.shape)
    assert rep["int8"]["parity"]["max_rel_diff"] < 0.1  # ORT's int8 model loads and runs too


def test_int4_embedding_onnx_export_is_exact(tmp_path):
    """The export-time unpacking gives the eager codes for every byte, and ORT's lookups equal eager ones."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from stackcomp.nn.quantized import _unpack_nibbles_float, unpack_nibbles
    from stackcomp.onnx_export import ort_session

    every = torch.arange(256, dtype=torch.uint8).reshape(8, 32)
    assert torch.equal(_unpack_nibbles_float(every, 64), unpack_nibbles(every, 64).float())
    assert torch.equal(_unpack_nibbles_float(every, 63), unpack_nibbles(every, 63).float())  # odd rows
    g = torch.Generator().manual_seed(0)
    for dim, group in ((24, 8), (7, 7)):  # three groups a row; an odd row length (last byte half used)
        emb = nn.Embedding(50, dim, padding_idx=0)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(50, dim, generator=g) * 3 + 1)
            emb.weight[0] = 0
        layer = Int4Embedding.from_embedding(emb, group_size=group).eval()
        ids = torch.randint(0, 50, (3, 5), generator=g)
        ids[0, 0] = 0
        path = tmp_path / f"emb{dim}.onnx"
        dyn = torch.export.Dim.DYNAMIC
        torch.onnx.export(layer, (ids,), str(path), dynamo=True, input_names=["ids"], output_names=["rows"],
                          dynamic_shapes=({0: dyn, 1: dyn},), external_data=False, verbose=False)
        sess = ort_session(path)
        for x in (ids, torch.randint(0, 50, (2, 9), generator=g)):
            got = torch.from_numpy(sess.run(["rows"], {"ids": x.numpy()})[0])
            with torch.no_grad():
                ref = layer(x)
            assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6), float((got - ref).abs().max())
            assert torch.equal(ref, layer.to_dense()[x])
            if x is ids:  # holds the padding id: its rows stay zero
                assert torch.equal(got[0, 0], torch.zeros(dim))


def test_albert_recipe_offline_on_tiny_albert(tmp_path, tiny_model_dirs, data_env):
    from stackcomp.engine import Engine

    caps = [
        f"model={tiny_model_dirs['albert']}", "data.max_length=32",
        "stages.ft.params.max_steps=4", "stages.ft.params.batch_size=16", "stages.ft.params.eval_every=null",
        "stages.ds.params.ratio=1.5",  # 2.8x has no (B, K, s) on 32-wide layers
        "stages.ds.params.train.max_steps=3", "stages.ds.params.train.batch_size=16",
        "stages.ds.params.train.eval_every=null",
    ] + [f"stages.{e}.params.{k}" for e in ("eval", "eval_stack", "eval_int8")
         for k in ("latency_batches=1", "latency_repeats=1", "latency_batch_size=8")]
    recipe = load_recipe(REPO / "recipes" / "albert_ds_int8.yaml", caps)
    plan = build_plan(recipe)
    summary = Engine(plan, tmp_path / "run").run()
    stages = {s["stage"]: s for s in summary["stages"]}
    assert set(summary["ran"]) == set(plan.order)
    fp32, q, stack = (stages[n]["metrics"] for n in ("eval", "eval_int8", "eval_stack"))
    for m in (fp32, q, stack):
        assert 0.0 <= m["accuracy"] <= 1.0 and m["latency_ms_per_batch"] > 0
    assert stack["linear_bytes"] < q["linear_bytes"] < fp32["linear_bytes"]
    report = json.loads((tmp_path / "run" / "artifacts" / plan.stages["pack"].key / "report.json").read_text())
    assert report["analyze"]["packed_ds"] == 6  # ALBERT's one shared layer: 6 linears, packed once
    model = stackcomp.load(tmp_path / "run" / "artifacts" / plan.stages["pack"].key)
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("PackedDSLinear") == 6
    ids = torch.randint(0, 1000, (2, 11))
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 2)
