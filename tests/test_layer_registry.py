"""Conversions keyed by layer type: the registry itself, and an out-of-tree layer through the engine.

The fixture plugin ``tests/fixtures/plugins/stackcomp-blockdiag`` defines a block-diagonal linear,
its int8 and packed forms and the ``blockdiag`` pass, and registers them the way an installed
plugin would; here it is imported from its folder (nothing installed) and its pass registered
with ``register_pass``. Then ``blockdiag -> int8 -> pack -> evaluate`` runs through the normal
engine.

Tolerances (max |logits - ref| / max |ref|): packed vs int8, the same int8 numbers through bmm
instead of einsum: 1e-5; int8 vs the fp32 block-diagonal model: 3e-2 (per-row int8 weights,
fp32 activations, two tiny encoder layers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

import stackcomp
from stackcomp.engine import Engine
from stackcomp.evaluate import linear_storage, size_report
from stackcomp.nn.base import CompressedLayer, LayerStorage
from stackcomp.nn.conversions import (
    Int8Config,
    Keep,
    convert,
    find_conversion,
    layer_storage,
    register_conversion,
    register_storage,
    unregister_conversion,
)
from stackcomp.nn.quantized import Int8Linear
from stackcomp.passes.base import PassContext, as_analysis, register_pass
from stackcomp.passes.int8 import Int8Pass
from stackcomp.passes.pack import PackPass
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

PLUGIN = Path(__file__).resolve().parent / "fixtures" / "plugins" / "stackcomp-blockdiag"


@pytest.fixture(scope="module")
def blockdiag():
    sys.path.insert(0, str(PLUGIN))
    try:
        import stackcomp_blockdiag
    finally:
        sys.path.remove(str(PLUGIN))
    register_pass(stackcomp_blockdiag.BlockDiagPass)
    return stackcomp_blockdiag


def rel_max(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


def _ctx(tmp_path):
    return PassContext(stage="t", work_dir=tmp_path)


# ----------------------------------------------------------------------------- the registry


def test_lookup_walks_the_mro(blockdiag):
    class MyLinear(nn.Linear):
        pass

    class WideBlocks(blockdiag.BlockDiagonalLinear):
        pass

    assert find_conversion("int8", MyLinear(4, 4)) is find_conversion("int8", nn.Linear)
    assert find_conversion("int8", WideBlocks) is find_conversion("int8", blockdiag.BlockDiagonalLinear)
    assert find_conversion("int8", blockdiag.BlockDiagonalLinear) is not None
    assert find_conversion("pack", blockdiag.Int8BlockDiagonalLinear) is not None
    assert find_conversion("int8", nn.LayerNorm(4)) is None
    assert find_conversion("no-such-kind", nn.Linear) is None
    # a subclass's own registration wins over its base's
    mine = register_conversion("int8", MyLinear)(lambda m, c: Keep("mine"))
    try:
        assert find_conversion("int8", MyLinear) is mine and convert("int8", MyLinear(4, 4), Int8Config()).reason == "mine"
    finally:
        assert unregister_conversion("int8", MyLinear) is mine
    with pytest.raises(TypeError):
        register_conversion("int8", int)


def test_a_plugin_can_register_a_conversion_for_a_class_it_does_not_own(tmp_path):
    """Overriding nn.Linear's int8 conversion changes what the int8 pass makes of plain linears."""
    calls = []
    builtin = find_conversion("int8", nn.Linear)

    @register_conversion("int8", nn.Linear)
    def _mine(linear, config):
        calls.append(config.backend)
        return builtin(linear, config)

    try:
        model = make_tiny_model("bert")
        p = Int8Pass({"backend": "torch"})
        ctx = _ctx(tmp_path)
        ctx.analysis = as_analysis(p.analyze(model, ctx))
        model = p.transform(model, ctx)
        assert calls == ["torch"] * 12
        assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 12
    finally:
        register_conversion("int8", nn.Linear)(builtin)
    assert find_conversion("int8", nn.Linear) is builtin


class _Unknown(CompressedLayer):
    """A compressed layer nobody registered a conversion for (default storage: its state at its widths)."""

    def __init__(self, inp: int, out: int):
        super().__init__()
        self.in_features, self.out_features = inp, out
        self.register_buffer("weight", torch.zeros(out, inp, dtype=torch.int8))
        self.bias = nn.Parameter(torch.zeros(out))

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float(), self.bias)


def test_a_layer_without_a_conversion_is_listed_skipped_and_kept(tmp_path):
    model = make_tiny_model("bert")
    name = "bert.encoder.layer.0.output.dense"
    model.bert.encoder.layer[0].output.dense = _Unknown(64, 32)
    p = Int8Pass({"backend": "torch"})
    ctx = _ctx(tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    report = ctx.analysis.report
    assert report["skipped"] == [f"{name} (_Unknown: no int8 form)"] and len(report["layers"]) == 11
    model = p.transform(model, ctx)
    assert type(model.get_submodule(name)) is _Unknown
    pk = PackPass({"target": "cpu"})
    ctx = _ctx(tmp_path)
    ctx.analysis = as_analysis(pk.analyze(model, ctx))
    assert ctx.analysis.report["layers"][name]["kept"].startswith("already an inference form")
    # default storage: int8 weight 1 byte an entry, fp32 bias; the dense reference an fp32 nn.Linear
    st = layer_storage(model.get_submodule(name))
    assert st == LayerStorage(params=32, bytes=64 * 32 + 32 * 4, dense_params=64 * 32 + 32, dense_bytes=(64 * 32 + 32) * 4)


def test_register_storage_for_a_module_that_is_not_a_compressed_layer():
    class Halved(nn.Module):  # e.g. a library's layer holding fp16 weights behind its own API
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(8, 16, dtype=torch.float16))

    assert linear_storage(Halved()) is None

    @register_storage(Halved)
    def _halved(m):
        return LayerStorage.measure([m.w], params=m.w.numel(), dense_params=m.w.numel())

    st = linear_storage(Halved())
    assert st.bytes == 8 * 16 * 2 and st.dense_bytes == 8 * 16 * 4
    report = size_report(nn.Sequential(Halved()))
    assert report["linear_layers"] == 1 and report["linear_bytes"] == 256 and report["model_bytes"] == 256


# ----------------------------------------------------------------------------- the plugin layer


def test_blockdiag_layers_numbers_and_bytes(blockdiag):
    torch.manual_seed(0)
    lin = nn.Linear(48, 32)
    bd = blockdiag.BlockDiagonalLinear.from_linear(lin, 4)
    w = lin.weight.detach().clone()
    mask = torch.block_diag(*[torch.ones(8, 12)] * 4).bool()
    assert torch.equal(bd.to_dense(), torch.where(mask, w, torch.zeros_like(w)))
    x = torch.randn(3, 5, 48)
    assert torch.allclose(bd(x), nn.functional.linear(x, bd.to_dense(), lin.bias), atol=1e-6)
    q = convert("int8", bd, Int8Config())
    packed = convert("pack", q, None)
    assert type(q).__name__ == "Int8BlockDiagonalLinear" and type(packed).__name__ == "PackedBlockDiagonalLinear"
    assert rel_max(q(x), bd(x).detach()) < 2e-2
    assert rel_max(packed(x), q(x)) < 1e-6 and torch.equal(packed.to_dense(), q.to_dense())
    dense = (48 * 32 + 32) * 4
    assert bd.storage() == LayerStorage(params=4 * 8 * 12 + 32, bytes=(4 * 8 * 12 + 32) * 4, dense_params=48 * 32 + 32,
                                        dense_bytes=dense)
    int8_bytes = 4 * 8 * 12 + 32 * 4 + 32 * 4  # int8 blocks, a scale per row, fp32 bias
    assert q.storage().bytes == int8_bytes and packed.storage().bytes == int8_bytes
    assert linear_storage(packed).bytes == int8_bytes


def test_blockdiag_int8_pack_evaluate_through_the_engine(tmp_path, tiny_model_dirs, blockdiag):
    stages = {
        "bd": {"pass": "blockdiag", "params": {"blocks": 2}},
        "q": {"pass": "int8", "after": "bd", "params": {"backend": "torch"}},
        "pk": {"pass": "pack", "after": "q", "params": {"target": "cpu"}},
        "ev": {"pass": "evaluate", "after": "pk"},
    }
    plan = build_plan(recipe_from_dict({"name": "bd", "model": str(tiny_model_dirs["bert"]), "stages": stages,
                                        "evaluate_leaves": False}))
    summary = Engine(plan, tmp_path / "run").run()
    assert set(summary["ran"]) == set(plan.order)
    art = tmp_path / "run" / "artifacts"
    models = {s: stackcomp.load(art / plan.stages[s].key) for s in ("bd", "q", "pk")}
    kinds = {s: [type(m).__name__ for m in mdl.modules()] for s, mdl in models.items()}
    assert kinds["bd"].count("BlockDiagonalLinear") == 12
    assert kinds["q"].count("Int8BlockDiagonalLinear") == 12 and "BlockDiagonalLinear" not in kinds["q"]
    assert kinds["pk"].count("PackedBlockDiagonalLinear") == 12 and "Int8BlockDiagonalLinear" not in kinds["pk"]

    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        logits = {s: m.eval()(input_ids=ids).logits for s, m in models.items()}
    assert rel_max(logits["pk"], logits["q"]) < 1e-5
    assert rel_max(logits["q"], logits["bd"]) < 3e-2

    q_report = json.loads((art / plan.stages["q"].key / "report.json").read_text())["analyze"]
    assert q_report["skipped"] == [] and {r["type"] for r in q_report["layers"].values()} == {"Int8BlockDiagonalLinear"}
    pk_report = json.loads((art / plan.stages["pk"].key / "report.json").read_text())["analyze"]
    rows = pk_report["layers"]
    assert len(rows) == 12 and all(r == {"from": "Int8BlockDiagonalLinear", "to": "PackedBlockDiagonalLinear"}
                                   for r in rows.values())

    # sizes count the blocks as stored, not the dense fp32 layer: 12 encoder linears of 2 blocks
    # (32x32 -> 2 of 16x16; 64x32 and 32x64 -> 2 of 32x16), plus the dense pooler and classifier
    shapes = [(32, 32)] * 8 + [(64, 32), (32, 64)] * 2
    blocks = sum(o * i // 2 for o, i in shapes)
    outs = sum(o for o, _ in shapes)
    heads = (32 * 32 + 32) * 4 + (2 * 32 + 2) * 4
    fp32 = size_report(models["bd"])
    assert fp32["linear_layers"] == 14 and fp32["linear_bytes"] == (blocks + outs) * 4 + heads
    dense = sum(o * i + o for o, i in shapes) * 4 + heads
    assert fp32["linear_dense_bytes"] == dense
    ev = next(s for s in summary["stages"] if s["stage"] == "ev")["metrics"]
    assert ev["linear_bytes"] == blocks + outs * 4 + outs * 4 + heads  # int8 blocks, fp32 scales and biases
    assert ev["linear_bytes"] == size_report(models["pk"])["linear_bytes"]


def test_blockdiag_trains_with_a_callback_before_int8_and_pack(tmp_path, tiny_model_dirs, blockdiag, data_env):
    stages = {
        "bd": {"pass": "blockdiag", "params": {"blocks": 2, "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3}}},
        "q": {"pass": "int8", "after": "bd", "params": {"backend": "torch"}},
        "pk": {"pass": "pack", "after": "q", "params": {"target": "cpu"}},
    }
    plan = build_plan(recipe_from_dict({"name": "bdt", "model": str(tiny_model_dirs["bert"]), "task": "glue/sst2",
                                        "data": {"max_length": 32}, "stages": stages}))
    summary = Engine(plan, tmp_path / "run").run()
    art = tmp_path / "run" / "artifacts"
    report = json.loads((art / plan.stages["bd"].key / "report.json").read_text())
    norms = report["block_norm_per_step"]
    assert len(norms) == 3 and len(set(norms)) == 3  # the callback ran after each step, and the blocks moved
    bd = next(s for s in summary["stages"] if s["stage"] == "bd")["metrics"]
    assert bd["train_steps"] == 3 and "accuracy" in bd
    ev = next(s for s in summary["stages"] if s["stage"] == "pk.eval")["metrics"]
    assert "accuracy" in ev and ev["linear_layers"] == 14
    packed = stackcomp.load(art / plan.stages["pk"].key)
    assert sum(type(m).__name__ == "PackedBlockDiagonalLinear" for m in packed.modules()) == 12


def test_the_plugin_installs_with_pip_and_is_listed(tmp_path):
    """A real install of the fixture package (a wheel built by pip into a target folder, so the
    test environment is left as it is): its entry point is found and its pass listed."""
    import os
    import subprocess

    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(PLUGIN)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    listed = subprocess.run([sys.executable, "-m", "stackcomp.cli", "passes", "list"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "blockdiag" in listed.stdout and "stackcomp_blockdiag" in listed.stdout
    described = subprocess.run([sys.executable, "-m", "stackcomp.cli", "passes", "describe", "blockdiag"],
                               capture_output=True, text=True, env=env, timeout=300)
    assert described.returncode == 0 and "train" in described.stdout, described.stdout + described.stderr
