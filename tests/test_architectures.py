"""The architecture matrix: passes find their targets by module type and structure, so the stack
``finetune -> ds_factorize -> int8 -> pack -> evaluate`` and a cut-student ``distill`` run on tiny
config-only BERT, RoBERTa, DistilBERT, ALBERT, DeBERTa-v2, ELECTRA, XLM-RoBERTa and ModernBERT
classifiers; what cannot apply to one is a clear StackcompError, not a traceback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stackcomp import load
from stackcomp.api import run
from stackcomp.artifacts import export_model, load_model
from stackcomp.distill.students import cut_student, layer_list
from stackcomp.errors import ModelError, PlanError
from stackcomp.evaluate import size_report
from stackcomp.nn.conversions import layer_storage
from stackcomp.nn.packed import PackedDSLinear
from stackcomp.nn.quantized import Int4Embedding, Int8DSLinear, Int8Embedding
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.factorizer_common import select_targets
from stackcomp.passes.int8 import Int8Pass
from stackcomp.targets import select_modules
from tests.conftest import ARCHITECTURES, _tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = {"max_steps": 2, "batch_size": 16, "eval_every": None}


def _recipe(model_dir, **stages) -> dict:
    return {"name": "arch", "model": str(model_dir), "task": "glue/sst2", "data": {"max_length": 32},
            "stages": {"ft": {"pass": "finetune", "params": {**STEPS, "lr": 1.0e-3}}, **stages}}


STACK = {
    "ds": {"pass": "ds_factorize", "after": "ft",
           "params": {"block": 16, "atoms": 8, "nnz": 2, "iters": 1, "train": dict(STEPS)}},
    "int8": {"pass": "int8", "after": "ds", "params": {"backend": "torch", "embeddings": True}},
    "pack": {"pass": "pack", "after": "int8", "params": {"target": "cpu"}},
    "eval": {"pass": "evaluate", "after": "pack", "params": {"latency_batches": 1, "latency_repeats": 1}},
    "student": {"pass": "distill", "after": "ft",
                "params": {"teacher": "ft", "student": {"cut": {"num_layers": 1}},
                           "weights": {"soft": 0.5, "hard": 0.5, "hidden": 1.0, "attention": 1.0}, **STEPS}},
}


def _model(kind: str, layers: int = 2) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    cfg = _tiny_config(kind)
    # rebuilt rather than set: ModernBERT derives one attention type per layer from the depth
    cfg = type(cfg)(**{**cfg.to_diff_dict(), "num_hidden_layers": layers, "layer_types": None})
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def _inputs(n: int = 3, length: int = 11) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _report(result, stage: str) -> dict:
    """The stage's report.json (``analyze``: what the pass found; other keys: what it did)."""
    import json

    return json.loads((result.artifact(stage) / "report.json").read_text())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stack_and_cut_student_run_on_every_architecture(arch, tiny_arch_dir, data_env, tmp_path):
    result = run(_recipe(tiny_arch_dir(arch), **STACK), out=tmp_path / "run")
    assert result.ok, [(s.stage, s.error) for s in result.failed]
    assert {s.stage for s in result.stages if s.status == "ran"} >= {"ft", "ds", "int8", "pack", "eval", "student"}
    assert result.stage("ft").metrics["train_steps"] == 2
    ev = result.stage("eval").metrics
    assert ev["main_metric"] == "accuracy" and 0.0 <= ev["accuracy"] <= 1.0 and ev["latency_ms_per_batch"] > 0

    models = {s: load(result.artifact(s)).eval() for s in ("ft", "ds", "int8", "pack", "student")}
    ds = [m for m in models["int8"].modules() if isinstance(m, Int8DSLinear)]
    packed = [m for m in models["pack"].modules() if isinstance(m, PackedDSLinear)]
    dense_block_linears = [n for n, _ in select_modules(models["ft"])]
    assert len(ds) == len(packed) == len(dense_block_linears) > 0  # every block linear, found by structure
    assert any(isinstance(m, Int8Embedding) for m in models["pack"].modules())
    x = _inputs()
    with torch.no_grad():
        ref, got = models["int8"](**x).logits, models["pack"](**x).logits
    assert torch.allclose(got, ref, atol=2e-3 * max(1.0, float(ref.abs().max()))), (got - ref).abs().max()

    sizes = {s: size_report(m)["model_bytes"] for s, m in models.items()}
    assert sizes["ft"] > sizes["ds"] > sizes["int8"] >= sizes["pack"] == ev["model_bytes"]

    student = models["student"]
    assert student.config.num_hidden_layers == 1 and sizes["student"] <= sizes["ft"]
    assert _report(result, "student")["student"]["layers"] == 1
    if arch != "albert":  # ALBERT's cut applies its one shared layer once: the same weights, fewer passes
        assert len(layer_list(student)[1]) == 1 and sizes["student"] < sizes["ft"]
    assert student(**x).logits.shape == (3, 2)


def test_albert_layer_stays_shared_through_the_stack(tiny_arch_dir, data_env, tmp_path):
    """ALBERT applies one shared layer at every depth: it is factorized, quantized and packed once,
    every depth runs that one packed module, and its bytes count once."""
    result = run(_recipe(tiny_arch_dir("albert"), **{k: STACK[k] for k in ("ds", "int8", "pack")}),
                 out=tmp_path / "run")
    assert result.ok, [(s.stage, s.error) for s in result.failed]
    ft, packed = load(result.artifact("ft")), load(result.artifact("pack")).eval()
    depth = packed.config.num_hidden_layers
    assert depth == 2
    shared = [m for m in packed.modules() if isinstance(m, PackedDSLinear)]
    assert len(shared) == len(list(select_modules(ft))) == 6  # q, k, v, attention out, ffn, ffn out: once each
    calls = {id(m): 0 for m in shared}
    hooks = [m.register_forward_hook(lambda mod, *_: calls.__setitem__(id(mod), calls[id(mod)] + 1)) for m in shared]
    with torch.no_grad():
        packed(**_inputs())
    for h in hooks:
        h.remove()
    assert set(calls.values()) == {depth}  # one module object, run at every depth
    rep = size_report(packed)
    assert rep["linear_layers"] == 6 + 3  # the shared six, counted once, + embedding projection, pooler, classifier
    dense = [m for m in packed.modules() if isinstance(m, nn.Linear)]
    assert len(dense) == 3
    once = sum(layer_storage(m).bytes for m in shared + dense)
    assert rep["linear_bytes"] == round(once)


def test_deberta_relative_position_table_is_left_fp32_and_reported(tiny_arch_dir, data_env, tmp_path):
    """DeBERTa reads its relative position table as ``.weight`` (no lookup by id): an int8 table there
    would be read as raw codes, so the int8 pass keeps it and says why; the lookup tables become int8."""
    stages = {"int8": {"pass": "int8", "after": "ft", "params": {"backend": "torch", "embeddings": True}}}
    result = run(_recipe(tiny_arch_dir("deberta-v2"), **stages), out=tmp_path / "run")
    assert result.ok, [(s.stage, s.error) for s in result.failed]
    rep = _report(result, "int8")["analyze"]
    assert any(s.startswith("deberta.encoder.rel_embeddings") and "read directly" in s for s in rep["skipped"])
    assert set(rep["embeddings"]) == {f"deberta.embeddings.{t}_embeddings" for t in ("word", "position", "token_type")}
    q = load(result.artifact("int8")).eval()
    assert type(q.deberta.encoder.rel_embeddings) is nn.Embedding
    ft = load(result.artifact("ft")).eval()
    with torch.no_grad():
        a, b = q(**_inputs()).logits, ft(**_inputs()).logits
    assert torch.allclose(a, b, atol=0.05 * max(1.0, float(b.abs().max())))


# ----------------------------------------------------------------------------- structure, no engine


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_targets_are_the_block_linears(arch):
    model = _model(arch)
    stack, mods = layer_list(model)
    assert len(mods) == (1 if arch == "albert" else model.config.num_hidden_layers)
    chosen = [n for n, _ in select_modules(model)]
    inside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(stack + ".")]
    assert chosen == inside and chosen
    outside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]
    assert outside  # heads and embedding projections stay dense by default
    # ModernBERT's fused projections (Wqkv three wide, GLU Wi two wide) are plain linears like any other
    if arch == "modernbert":
        assert any(n.endswith("attn.Wqkv") for n in chosen) and any(n.endswith("mlp.Wi") for n in chosen)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_int8_pass_with_int4_tables_on_every_architecture(arch, tmp_path):
    """Without a task (the looked-up tables found with random ids): block linears become int8, every
    table looked up by id becomes int4, a table read as ``.weight`` stays; the logits stay close."""
    model = _model(arch)
    with torch.no_grad():
        ref = model(**_inputs()).logits
    p = Int8Pass({"backend": "torch", "embeddings": "int4", "embedding_group_size": 16})
    ctx = PassContext(stage="t", work_dir=tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    tables = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    blocks = [n for n, _ in select_modules(model)]
    q = p.transform(model, ctx).eval()
    report = ctx.analysis.report
    kept = [n for n in tables if n.endswith("rel_embeddings")]  # DeBERTa-v2 reads it as .weight
    assert sorted(report["embeddings"]) == sorted(set(tables) - set(kept))
    assert all(any(s.startswith(n) and "read directly" in s for s in report["skipped"]) for n in kept)
    assert sorted(report["layers"]) == sorted(blocks)
    assert all(isinstance(q.get_submodule(n), Int4Embedding) for n in report["embeddings"])
    with torch.no_grad():
        got = q(**_inputs()).logits
    assert torch.allclose(got, ref, atol=0.05 * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "albert"])
def test_cut_student_keeps_layers_and_reloads(arch, tmp_path):
    teacher = _model(arch, layers=4)
    student, note = cut_student(teacher, count=2)
    assert note["kept"] == [0, 2] and student.config.num_hidden_layers == 2
    assert len(layer_list(student)[1]) == 2 and len(layer_list(teacher)[1]) == 4
    export_model(student, tmp_path / "m")
    back = load_model(tmp_path / "m")
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(back(**x).logits, student.eval()(**x).logits, atol=1e-5)


def test_modernbert_cut_must_keep_its_first_layer():
    """ModernBERT's first layer has no attention norm: it cannot take another layer's place."""
    teacher = _model("modernbert", layers=4)
    with pytest.raises(ModelError, match=r"modernbert: layer 1 differs in structure from layer 0"):
        cut_student(teacher, [1, 3])
    cut_student(teacher, [0, 3])


def test_albert_cut_refuses_picked_layers_and_too_few_groups():
    teacher = _model("albert", layers=4)
    with pytest.raises(ModelError, match=r"albert: student.cut.layers \[0, 3\] cannot be picked.*num_layers: 2"):
        cut_student(teacher, [0, 3])
    student, note = cut_student(teacher, count=2)
    assert student.config.num_hidden_layers == 2 and "shares" in note["albert"]
    grouped = _model("albert", layers=4)
    grouped.config.num_hidden_groups = 2
    grouped.albert.encoder.albert_layer_groups.append(type(grouped.albert.encoder.albert_layer_groups[0])(grouped.config))
    with pytest.raises(ModelError, match="2 layer groups cannot be cut to 1"):
        cut_student(grouped, count=1)


def test_albert_cut_with_picked_layers_fails_its_stage_cleanly(tiny_arch_dir, data_env, tmp_path):
    stages = {"student": {"pass": "distill", "after": "ft",
                          "params": {"teacher": "ft", "student": {"cut": {"layers": [1]}}, **STEPS}}}
    result = run(_recipe(tiny_arch_dir("albert"), **stages), out=tmp_path / "run")
    (failed,) = result.failed
    assert failed.stage == "student" and failed.error.startswith("ModelError: albert: student.cut.layers [1]")
    assert "Traceback" not in failed.error and "\n" not in failed.error


class _NoBlocks(nn.Module):
    """A model whose layers sit in an nn.Sequential: no list of repeated blocks to find."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_a_model_without_block_stacks_gets_clear_errors():
    model = _NoBlocks()
    with pytest.raises(PlanError, match="_NoBlocks has no nn.ModuleList of repeated transformer blocks.*targets"):
        select_targets(model, None, None, "ds_factorize")
    assert [n for n, _ in select_targets(model, ["body.*"], None, "ds_factorize")] == ["body.0", "body.2"]
    with pytest.raises(ModelError, match="_NoBlocks: found no nn.ModuleList of repeated transformer blocks"):
        layer_list(model)
