"""prune_structured: mask-gradient importance, the FLOPs target, exact removal, artifacts, the stack."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from pydantic import ValidationError
from torch import nn

from stackcomp.artifacts import load_model, save_model
from stackcomp.errors import PassError, StackcompError
from stackcomp.factorize.flops import encoder_flops, head_flops, neuron_flops
from stackcomp.nn.pruning import blocks, masked
from stackcomp.passes.base import PassContext, available_passes, register_pass, run_pass
from stackcomp.passes.prune_structured import PruneStructuredPass

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RandomData:
    """Labelled batches of random token ids: all importance needs (``ctx.data.train_loader``)."""

    def train_loader(self, batch_size: int, seed: int | None = None, **_):
        g = torch.Generator().manual_seed(seed or 0)
        out = []
        for _ in range(4):
            ids = torch.randint(1000, 5000, (batch_size, 12), generator=g)
            ids[:, 0], ids[:, -1] = 101, 102
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.randint(0, 2, (batch_size,), generator=g)})
        return out


def _ctx(tmp_path) -> PassContext:
    return PassContext(stage="prune", work_dir=tmp_path, data=RandomData())


def _prune(model, tmp_path, **params):
    params = {"importance_batch_size": 8, "train": {"epochs": 0}, **params}
    ctx = _ctx(tmp_path)
    pruned = run_pass(PruneStructuredPass(params), model, ctx)
    return pruned, ctx


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 5000, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _flops(model) -> tuple[int, int, int]:
    """(linear FLOPs per token now, cost of one head, cost of one neuron) from the model's shapes."""
    found = blocks(model)
    hidden, d = found[0].linears["query"].in_features, found[0].head_size
    return (encoder_flops(hidden, d, [b.heads for b in found], [b.neurons for b in found]),
            head_flops(hidden, d), neuron_flops(hidden))


def test_planted_irrelevant_heads_and_neurons_go_first(tmp_path):
    model = make_tiny_model("bert")  # 2 blocks, 2 heads of 16, 64 neurons, hidden 32
    enc = model.bert.encoder.layer
    with torch.no_grad():
        enc[0].attention.self.value.weight[16:32] = 0  # head 1 of block 0 outputs only its bias...
        enc[0].attention.self.value.bias[16:32] = 0  # ...which is zero too: it contributes nothing
        enc[1].output.dense.weight[:, :16] = 0  # neurons 0-15 of block 1 reach nothing
    total, hc, nc = _flops(model)
    target = (total - hc - 16 * nc) / total  # exactly the planted units' cost removed
    ref = model(**_inputs()).logits.detach()
    pruned, ctx = _prune(model, tmp_path, target_flops=target)
    report = ctx.analysis.report
    assert report["blocks"]["bert.encoder.layer.0"]["pruned_heads"] == [1]
    assert report["blocks"]["bert.encoder.layer.1"]["pruned_heads"] == []
    assert [b.heads for b in blocks(pruned)] == [1, 2]
    assert [b.neurons for b in blocks(pruned)] == [64, 48]
    # what was removed did nothing: the pruned model computes what the original did
    assert torch.allclose(pruned(**_inputs()).logits, ref, atol=1e-5)


@pytest.mark.parametrize(("target", "multiple"), [(0.3, 1), (0.5, 1), (0.77, 1), (0.5, 8), (1.0, 1)])
def test_flops_target_met_within_one_unit(tmp_path, target, multiple):
    model = make_tiny_model("bert")
    total, hc, nc = _flops(model)
    pruned, ctx = _prune(model, tmp_path, target_flops=target, neuron_multiple=multiple)
    kept, _, _ = _flops(pruned)
    assert kept <= target * total
    assert target * total - kept < max(hc, nc * multiple)
    assert all(b.heads >= 1 and b.neurons % multiple == 0 for b in blocks(pruned))
    assert ctx.analysis.report["flops_per_token"]["after"] == kept
    assert all(type(m) is nn.Linear for b in blocks(pruned) for m in b.linears.values())


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "electra"])
def test_removal_equals_the_masked_model(tmp_path, kind):
    model = make_tiny_model(kind)
    analysis = PruneStructuredPass({"target_flops": 0.45, "importance_batch_size": 8}).analyze(model, _ctx(tmp_path))
    kept = analysis.state["kept"]
    found = blocks(model)
    assert sum(b.heads - len(h) for b, h in zip(found, kept.heads)) > 0  # some heads go, and neurons
    assert sum(b.neurons - len(n) for b, n in zip(found, kept.neurons)) > 0
    heads = [torch.zeros(b.heads).index_fill_(0, torch.tensor(h), 1.0) for b, h in zip(found, kept.heads)]
    neurons = [torch.zeros(b.neurons).index_fill_(0, torch.tensor(n), 1.0) for b, n in zip(found, kept.neurons)]
    with torch.no_grad(), masked(found, heads, neurons):
        want = model(**_inputs()).logits
    ctx = _ctx(tmp_path)
    ctx.analysis = analysis
    pruned = PruneStructuredPass({"target_flops": 0.45}).transform(model, ctx)
    with torch.no_grad():
        got = pruned(**_inputs()).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("keep", ["heads", "neurons"])
def test_one_kind_of_unit_can_be_left_alone(tmp_path, keep):
    pruned, _ = _prune(make_tiny_model("bert"), tmp_path, target_flops=0.8, **{keep: False})
    found = blocks(pruned)
    if keep == "heads":
        assert [b.heads for b in found] == [2, 2] and sum(b.neurons for b in found) < 128
    else:
        assert [b.neurons for b in found] == [64, 64] and sum(b.heads for b in found) < 4


def test_save_and_load_round_trip(tmp_path):
    pruned, _ = _prune(make_tiny_model("bert"), tmp_path, target_flops=0.4)
    save_model(pruned, tmp_path / "m")
    back = load_model(tmp_path / "m", verify=False)
    assert [b.heads for b in blocks(back)] == [b.heads for b in blocks(pruned)]
    assert [b.neurons for b in blocks(back)] == [b.neurons for b in blocks(pruned)]
    with torch.no_grad():
        assert torch.equal(back(**_inputs()).logits, pruned(**_inputs()).logits)


def test_a_student_cut_from_a_pruned_model_loads(tmp_path):
    from stackcomp.distill.students import cut_student

    pruned, _ = _prune(make_tiny_model("bert"), tmp_path, target_flops=0.4)
    assert blocks(pruned)[1].neurons < 64  # 0.4 of the FLOPs cannot leave a block whole
    student, _ = cut_student(pruned, [1])
    save_model(student, tmp_path / "s")
    back = load_model(tmp_path / "s", verify=False)
    assert [b.heads for b in blocks(back)] == [blocks(pruned)[1].heads]
    assert [b.neurons for b in blocks(back)] == [blocks(pruned)[1].neurons]
    with torch.no_grad():
        assert torch.equal(back(**_inputs()).logits, student(**_inputs()).logits)


@pytest.mark.parametrize(("params", "needle"), [({"target_flops": 0}, "greater than 0"),
                                                ({"target_flops": 1.5}, "less than or equal to 1"),
                                                ({}, "target_flops")])
def test_target_out_of_range_is_refused(params, needle):
    with pytest.raises(ValidationError, match=needle):
        PruneStructuredPass(params)


def test_target_below_the_minimum_is_a_clear_error(tmp_path):
    with pytest.raises(PassError, match="below the least this pruning can keep"):
        _prune(make_tiny_model("bert"), tmp_path, target_flops=0.01)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(PassError, match="model type 'albert' has no head/neuron pruning support"):
        _prune(make_tiny_model("albert"), tmp_path, target_flops=0.5)


def test_compressed_layer_is_named_in_the_error(tmp_path):
    from stackcomp.passes.int8 import Int8Pass

    model = run_pass(Int8Pass({"backend": "torch"}), make_tiny_model("bert"), PassContext(stage="q", work_dir=tmp_path))
    with pytest.raises(PassError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query is a \w+, not a plain"):
        _prune(model, tmp_path, target_flops=0.5)


def test_pruning_after_int8_is_refused_by_the_plan():
    from stackcomp.errors import PlanError
    from stackcomp.plan import build_plan
    from stackcomp.recipe import recipe_from_dict

    if "prune_structured" not in available_passes():
        register_pass(PruneStructuredPass)
    r = recipe_from_dict({"name": "x", "model": "m", "task": "glue/sst2", "stages": {
        "q": {"pass": "int8"}, "p": {"pass": "prune_structured", "after": "q", "params": {"target_flops": 0.5}}}})
    with pytest.raises(PlanError, match="prune the fp32 nn.Linear layers first"):
        build_plan(r)


def test_prune_ds_int8_pack_stack_through_the_engine(tmp_path, tiny_model_dirs, data_env):
    import stackcomp

    if "prune_structured" not in available_passes():  # an install whose entry points predate the pass
        register_pass(PruneStructuredPass)
    steps = {"max_steps": 2, "batch_size": 8, "eval_every": None}
    recipe = {"name": "prune", "model": str(tiny_model_dirs["bert"]), "task": "glue/sst2", "evaluate_leaves": False,
              "data": {"max_length": 32},
              "stages": {
                  "ft": {"pass": "finetune", "params": {**steps, "lr": 1e-3}},
                  "prune": {"pass": "prune_structured", "after": "ft",
                            "params": {"target_flops": 0.5, "neuron_multiple": 16, "importance_batches": 2,
                                       "importance_batch_size": 8, "teacher": "ft", "train": steps}},
                  "ds": {"pass": "ds_factorize", "after": "prune",
                         "params": {"block": 16, "atoms": 8, "nnz": 2, "iters": 1, "train": {"epochs": 0}}},
                  "int8": {"pass": "int8", "after": "ds", "params": {"backend": "torch"}},
                  "pack": {"pass": "pack", "after": "int8", "params": {"target": "cpu"}},
                  # the recipe's short branch: no DS, int8 linears and 4-bit tables packed
                  "int8_only": {"pass": "int8", "after": "prune",
                                "params": {"backend": "torch", "embeddings": "int4", "embedding_group_size": 16}},
                  "pack_only": {"pass": "pack", "after": "int8_only", "params": {"target": "cpu"}},
                  "eval": {"pass": "evaluate", "after": "pack", "params": {"latency_batches": 1,
                                                                          "latency_repeats": 1}}}}
    result = stackcomp.run(recipe, out=tmp_path / "run")
    assert result.ok, [(s.stage, s.error) for s in result.failed]
    prune = result.stage("prune").metrics
    assert prune["train_steps"] == 2  # the KD recovery ran
    pruned = stackcomp.load(result.artifact("prune"))
    found = blocks(pruned)
    assert sum(b.heads for b in found) < 4 or sum(b.neurons for b in found) < 128
    kept, _, _ = _flops(pruned)
    assert kept <= 0.5 * _flops(make_tiny_model("bert"))[0]
    ev = result.stage("eval").metrics
    assert 0.0 <= ev["accuracy"] <= 1.0
    packed = stackcomp.load(result.artifact("pack"))
    x = _inputs()
    with torch.no_grad():
        ref = stackcomp.load(result.artifact("int8"))(**x).logits
        got = packed(**x).logits
    assert torch.allclose(got, ref, atol=2e-3 * max(1.0, float(ref.abs().max())))
    # DS went into the pruned shapes: the pruned FFN output linear of block 0 is factorized at its width
    from stackcomp.nn.ds_linear import DSLinear

    ds_out = stackcomp.load(result.artifact("ds")).bert.encoder.layer[0].output.dense
    assert isinstance(ds_out, DSLinear) and ds_out.in_features == found[0].neurons
    assert result.stage("pack_only").status in ("ran", "cached")


def test_engine_reports_target_errors_as_stackcomp_errors(tmp_path, tiny_model_dirs, data_env):
    import stackcomp

    if "prune_structured" not in available_passes():
        register_pass(PruneStructuredPass)
    recipe = {"name": "bad", "model": str(tiny_model_dirs["bert"]), "task": "glue/sst2",
              "stages": {"prune": {"pass": "prune_structured", "params": {"target_flops": 2}}}}
    with pytest.raises(StackcompError, match="target_flops"):
        stackcomp.run(recipe, out=tmp_path / "run")


def _three_block_bert():
    from transformers import AutoModelForSequenceClassification
    from conftest import _tiny_config

    config = _tiny_config("bert")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def _silence_block(block: nn.Module) -> None:
    """Make a BERT block the identity on LayerNorm outputs: its heads' values, its neurons' outputs
    and the biases added to the residual are zero, so it computes LN(LN(x)) = x (unit LN weights)."""
    with torch.no_grad():
        for lin in (block.attention.self.value, block.attention.output.dense, block.output.dense):
            lin.weight.zero_()
            lin.bias.zero_()


def test_planted_empty_block_is_dropped_and_its_budget_goes_to_the_others(tmp_path):
    """Block 1 does nothing; the target pays for blocks 0 and 2 whole plus block 1's minimum. The
    first choice leaves block 1 one head and one neuron, under drop_layers_below, so it is dropped
    and the choice over blocks 0 and 2 keeps them whole: the model computes what it did."""
    model = _three_block_bert()
    _silence_block(model.bert.encoder.layer[1])
    ref = model(**_inputs()).logits.detach()
    total, hc, nc = _flops(model)
    target = (2 * total / 3 + hc + nc) / total
    pruned, ctx = _prune(model, tmp_path, target_flops=target, drop_layers_below=0.3)
    report = ctx.analysis.report
    assert report["dropped_layers"] == [1]
    assert report["blocks"]["bert.encoder.layer.1"]["dropped"] is True
    assert pruned.config.num_hidden_layers == 2 and len(pruned.bert.encoder.layer) == 2
    assert [b.heads for b in blocks(pruned)] == [2, 2] and [b.neurons for b in blocks(pruned)] == [64, 64]
    assert pruned.config.stackcomp_pruned["dropped_layers"] == [1]
    assert report["flops_per_token"]["after"] == _flops(pruned)[0] == 2 * total // 3
    with torch.no_grad():
        assert torch.allclose(pruned(**_inputs()).logits, ref, atol=1e-4)


def test_without_drop_layers_below_no_block_is_dropped(tmp_path):
    model = _three_block_bert()
    _silence_block(model.bert.encoder.layer[1])
    total, hc, nc = _flops(model)
    pruned, ctx = _prune(model, tmp_path, target_flops=(2 * total / 3 + hc + nc) / total)
    assert "dropped_layers" not in ctx.analysis.report
    assert [b.heads for b in blocks(pruned)] == [2, 1, 2] and [b.neurons for b in blocks(pruned)] == [64, 1, 64]


def test_dropped_blocks_save_and_load(tmp_path):
    """The shallower model loads with stackcomp; compressed further (int8), transformers loads it too."""
    from transformers import AutoModelForSequenceClassification

    import stackcomp
    from stackcomp.artifacts import export_model
    from stackcomp.passes.int8 import Int8Pass

    model = _three_block_bert()
    _silence_block(model.bert.encoder.layer[2])
    pruned, _ = _prune(model, tmp_path, target_flops=0.5, drop_layers_below=0.3)
    assert pruned.config.num_hidden_layers == len(blocks(pruned)) < 3
    save_model(pruned, tmp_path / "m")
    depth, heads = len(blocks(pruned)), [b.heads for b in blocks(pruned)]
    int8 = run_pass(Int8Pass({"backend": "torch"}), copy.deepcopy(pruned), PassContext(stage="q", work_dir=tmp_path))
    with torch.no_grad():
        ref, ref8 = pruned(**_inputs()).logits, int8(**_inputs()).logits
        back = load_model(tmp_path / "m", verify=False)
        assert [b.heads for b in blocks(back)] == heads
        assert torch.equal(back(**_inputs()).logits, ref)
        folder = export_model(int8, tmp_path / "export")
        for again in (stackcomp.load(folder), AutoModelForSequenceClassification.from_pretrained(folder)):
            assert len(again.bert.encoder.layer) == depth
            assert torch.equal(again(**_inputs()).logits, ref8)


def test_dropping_every_block_is_a_clear_error(tmp_path):
    with pytest.raises(PassError, match="drops every block"):
        _prune(make_tiny_model("bert"), tmp_path, target_flops=0.3, drop_layers_below=0.99)
