"""Native blocks: each fused int8 encoder block as one C++ call, and a BERT model's embeddings and blocks as
one (``pack native_blocks: true``).

Oracles: the C++ block must be exactly the kernels the block's modules call, in their order (the same
float operations, so ``torch.equal``); the C++ embeddings exactly transformers' ``BertEmbeddings``; the
whole model exactly the module path on padded batches (both pack the real tokens), and within
``NATIVE_TOLERANCE`` without padding (the module path then runs SDPA, and an int8 layer after a
changed float may round one step the other way). Then where it steps aside, and that it follows
weights changed in place, copies, saves and loads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import stackcomp
from stackcomp.artifacts import export_model
from stackcomp.errors import PassError, PlanError
from stackcomp.kernels.ffn import ACTS, PATHS
from stackcomp.nn import native_blocks
from stackcomp.nn.native_blocks import (
    CONFIG_FLAG,
    apply_native_blocks,
    block_parts,
    model_parts,
    native_blocks_report,
    native_model_report,
    remove_native_blocks,
)
from stackcomp.passes.pack import NATIVE_TOLERANCE

from conftest import _tiny_config, kernel_extension, make_tiny_model, run_int8, run_pack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FUSIONS = {"fuse_ffn": True, "fuse_qkv": True, "fuse_norm": True, "unpad": True}


def _ext():
    return kernel_extension("ffn_forward")


def _int8_tables(model, tmp_path):
    """The recipe's stack on a tiny model: the word table pruned to the ids the test uses (unseen ids to
    [UNK]), int8 kernel linears, 4-bit tables, the pooler in float16."""
    from stackcomp.nn.remapped import RemappedEmbedding
    from stackcomp.passes.base import PassContext, as_analysis
    from stackcomp.passes.int8 import Int8Pass

    base = model.base_model
    base.embeddings.word_embeddings = RemappedEmbedding.from_embedding(
        base.embeddings.word_embeddings, torch.cat([torch.tensor([0, 100]), torch.arange(1000, 1900)]), unk_id=100)
    q = Int8Pass({"backend": "kernel", "embeddings": "int4", "embedding_group_size": 16,
                  "fp16_targets": ["*pooler.dense"]})
    ctx = PassContext(stage="int8", work_dir=tmp_path)
    ctx.analysis = as_analysis(q.analyze(model, ctx))
    return q.transform(model, ctx)


def _native(tmp_path, model=None, tables=False, **pack):
    """A tiny int8 model packed with native blocks: (model, pack context)."""
    ext = _ext()
    if not hasattr(ext, "EncoderBlock"):
        pytest.fail("the loaded C++ kernel predates EncoderBlock: rebuild it (python setup.py build_ext --inplace)")
    if not ext.ffn_has_vnni():  # a build without the VNNI path (STACKCOMP_CPU_ISA=avx2): pack fuses no FFN
        pytest.skip("this build has no VNNI path: no block gets a fused FFN, so none can run natively")
    model = model if model is not None else make_tiny_model("bert")
    model = _int8_tables(model, tmp_path / "i") if tables else run_int8(model, tmp_path / "i", backend="kernel")
    return run_pack(model, tmp_path / "p", **FUSIONS, native_blocks=True, **pack)


def _batch(rows: int = 4, width: int = 13, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, rows):
        mask[r, width - 3 * r:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _module_path(model):
    """A copy of ``model`` that runs its modules (unpadded, no native blocks)."""
    return remove_native_blocks(copy.deepcopy(model))


def _counting(module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


# ----------------------------------------------------------------------------- the C++ pieces against their oracles


def test_a_native_block_is_the_modules_kernels_in_their_order(tmp_path):
    model, _ = _native(tmp_path)
    ext = _ext()
    block = model.bert.encoder.layer[1]
    parts = block_parts(block)
    qkv, out, ffn = native_blocks._routes(parts)
    native = block.forward.native()
    g = torch.Generator().manual_seed(3)
    for lengths in ([5], [7, 1, 12], [20, 9]):  # short calls, and a long one (the AMX operands where the CPU has AMX)
        tokens = sum(lengths)
        h = torch.randn(tokens, 32, generator=g)
        cu = torch.tensor([0, *lengths]).cumsum(0)
        o, path = qkv.pick(tokens)
        y = ext.linear_forward(h, *o[:4], parts.qkv.out_features, PATHS[path])
        f = parts.qkv.query_features
        q, k, v = (y[:, i * f:(i + 1) * f].view(tokens, parts.heads, parts.head_dim) for i in range(3))
        ctx = ext.varlen_attention(q, k, v, cu, parts.scale, False).view(tokens, f)
        o, path = out.pick(tokens)
        attn = ext.linear_forward(ctx, *o[:4], parts.attention_dense.out_features, PATHS[path])
        n1, n2 = parts.norm1, parts.norm2
        mid = ext.add_layernorm(attn, h, n1.weight.detach(), n1.bias.detach(), n1.eps)
        o, path = ffn.pick(tokens)
        ff = ext.ffn_forward(mid, *o[:8], ffn.ops.hidden, ffn.ops.out, ACTS[parts.ffn.activation],
                             PATHS[path])
        expected = ext.add_layernorm(ff, mid, n2.weight.detach(), n2.bias.detach(), n2.eps)
        assert torch.equal(native.forward(h, cu), expected)


@pytest.mark.parametrize("tables", [False, True])
def test_native_embeddings_are_berts_on_the_real_tokens(tmp_path, tables):
    model, _ = _native(tmp_path, tables=tables)
    parts = model_parts(model.bert)
    tables = [native_blocks._table(m) for m in (parts.word, parts.position, parts.token_type)]
    norm = [parts.norm.weight.detach(), parts.norm.bias.detach()]
    embeddings_only = _ext().EncoderModel([t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables],
                                          norm, float(parts.norm.eps), [], [])
    ids, mask = _batch()
    types = (torch.arange(ids.numel()).view(ids.shape) % 2) * mask
    keep = mask.reshape(-1).nonzero().squeeze(1)
    positions = torch.arange(ids.shape[1]).repeat(ids.shape[0])[keep]
    with torch.inference_mode():
        ref = model.bert.embeddings(input_ids=ids, token_type_ids=types).reshape(-1, 32)[keep]
        got = embeddings_only.forward(ids.reshape(-1)[keep], types.reshape(-1)[keep], positions,
                                      torch.tensor([0, int(mask.sum())]))
    assert torch.equal(got, ref)  # BertEmbeddings' own ops in its order: the same floats


# ----------------------------------------------------------------------------- the packed model


@pytest.mark.parametrize("head,tables", [("sequence", True), ("sequence", False), ("token", False)])
def test_pack_native_blocks_gives_the_module_paths_answers(tmp_path, head, tables):
    from transformers import AutoModelForTokenClassification

    base = None
    if head == "token":
        torch.manual_seed(0)
        base = AutoModelForTokenClassification.from_config(_tiny_config("bert", num_labels=5)).eval()
    model, ctx = _native(tmp_path, base, tables=tables)
    report = ctx.report["native_blocks"]
    assert report["native"] == ["bert.encoder.layer.0", "bert.encoder.layer.1"] and report["not_native"] == {}
    assert report["whole_model"] == "embeddings and blocks in one call"
    assert ctx.report["native_parity"]["native_vs_modules"] <= NATIVE_TOLERANCE
    assert ctx.report["native_parity"]["batches"] == 4  # two padded batches and two single sentences
    modules = _module_path(model)
    ids, mask = _batch()
    types = (torch.arange(ids.numel()).view(ids.shape) % 2) * mask
    embedded = _counting(model.bert.embeddings)
    real = mask.bool()
    with torch.inference_mode():
        for kwargs in ({"attention_mask": mask}, {"attention_mask": mask, "token_type_ids": types},
                       {"attention_mask": mask, "position_ids": torch.arange(13).flip(0)[None]},
                       {}, {"attention_mask": torch.ones_like(mask)}):
            got, ref = model(input_ids=ids, **kwargs).logits, modules(input_ids=ids, **kwargs).logits
            if head == "token" and "attention_mask" in kwargs:
                got, ref = got[kwargs["attention_mask"].bool()], ref[kwargs["attention_mask"].bool()]
            if kwargs.get("attention_mask") is mask:  # padded: both run the same kernels on the same packed tokens
                assert torch.equal(got, ref), kwargs
            else:  # no padding: the module path runs SDPA, the native one the varlen kernel
                assert _rel(got, ref) < NATIVE_TOLERANCE, kwargs
        for row in range(ids.shape[0]):  # single sentences, as a server gets them
            one = ids[row:row + 1, real[row]]
            assert _rel(model(input_ids=one).logits, modules(input_ids=one).logits) < NATIVE_TOLERANCE
        last = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not embedded  # every call above ran the C++ model, not the embeddings module
    assert torch.equal(last[~real], torch.zeros_like(last[~real]))  # padding: zeros, as unpadded


def test_float_masks_and_rows_without_tokens(tmp_path):
    """A float 0/1 mask is a padding mask; a row with no real token gets zeros, as unpadded."""
    model, _ = _native(tmp_path)
    modules = _module_path(model)
    ids, mask = _batch()
    mask[2] = 0
    embedded = _counting(model.bert.embeddings)
    with torch.inference_mode():
        got = model.bert(input_ids=ids, attention_mask=mask.float()).last_hidden_state
        ref = modules.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, ref) and not got[2].any() and not embedded


def test_it_steps_aside_where_the_modules_must_run(tmp_path):
    model, _ = _native(tmp_path)
    modules = _module_path(model)
    ids, mask = _batch()
    embedded = _counting(model.bert.embeddings)
    attended = _counting(model.bert.encoder.layer[0].attention)
    with torch.inference_mode():
        ref = modules(input_ids=ids, attention_mask=mask)
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert len(states.hidden_states) == 3 and _rel(states.logits, ref.logits) < NATIVE_TOLERANCE
        model(input_ids=ids, attention_mask=mask, output_attentions=True)  # (SDPA gives no weights to return)
        assert isinstance(model.bert(input_ids=ids, attention_mask=mask, return_dict=False), tuple)
        model.bert(inputs_embeds=torch.randn(2, 5, 32))
    # per-layer outputs: the blocks' modules too; return_dict=False and inputs_embeds: the base model's own
    # forward around native blocks
    assert len(embedded) == 4 and len(attended) == 2
    out = model(input_ids=ids, attention_mask=mask).logits  # gradients enabled: the modules, as trained
    assert len(embedded) == 5 and len(attended) == 3 and out.requires_grad
    model.train()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    assert len(embedded) == 6 and len(attended) == 4
    model.eval()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    assert len(embedded) == 6
    with torch.no_grad():  # a trace records the modules' ops (a graph of the native call would be opaque)
        traced = torch.jit.trace(model, (ids, mask), strict=False)
    assert len(embedded) > 6  # (the trace runs the model more than once)
    with torch.inference_mode():
        assert _rel(traced(ids, mask)["logits"], ref.logits) < NATIVE_TOLERANCE


def test_threads_share_a_native_model(tmp_path):
    """The C++ calls release the GIL: two threads serving one model get each call's own answer."""
    from concurrent.futures import ThreadPoolExecutor

    model, _ = _native(tmp_path)
    batches = [_batch(rows=1 + i % 4, width=5 + i, seed=i) for i in range(12)]

    def run(batch):
        with torch.inference_mode():
            return model(input_ids=batch[0], attention_mask=batch[1]).logits

    alone = [run(b) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(run, batches * 3))
    assert all(torch.equal(a, b) for a, b in zip(alone * 3, together, strict=True))


def test_weights_changed_in_place_or_a_copy_are_followed(tmp_path):
    model, _ = _native(tmp_path, tables=True)
    ids, mask = _batch()
    real = mask.bool()

    def states(m):
        return m.bert(input_ids=ids, attention_mask=mask).last_hidden_state[real]

    block = model.bert.encoder.layer[1]
    with torch.inference_mode():
        before = states(model)
    for change, in_block in ((lambda: block.attention.self.query.weight[:4].neg_(), True),  # an int8 buffer
                             (lambda: block.output.dense.weight2_scale.mul_(2.0), True),  # the fused FFN's
                             (lambda: model.bert.embeddings.word_embeddings.weight_offset.add_(0.5), False),  # 4-bit
                             (lambda: block.output.LayerNorm.weight.mul_(1.5), True)):  # the last norm
        built, whole = block.forward.native(), model.bert.forward.native()[1]
        with torch.no_grad():
            change()
        assert (block.forward.native() is not built) == in_block and model.bert.forward.native()[1] is not whole
    twin = copy.deepcopy(model)
    with torch.inference_mode():
        after = states(model)
        assert _rel(after, states(_module_path(model))) < NATIVE_TOLERANCE
        assert _rel(after, before) > 10 * NATIVE_TOLERANCE
        assert torch.equal(states(twin), after)
    remove_native_blocks(twin)  # the copy's, not the original's
    assert isinstance(model.bert.__dict__.get("forward"), native_blocks._NativeModel)


def test_a_saved_model_loads_with_native_blocks(tmp_path):
    model, _ = _native(tmp_path, tables=True)
    ids, mask = _batch()
    from transformers import AutoModelForSequenceClassification

    saved = export_model(model, tmp_path / "saved")
    for again in (stackcomp.load(saved), AutoModelForSequenceClassification.from_pretrained(saved)):
        assert getattr(again.config, CONFIG_FLAG)
        assert isinstance(again.bert.__dict__.get("forward"), native_blocks._NativeModel)
        embedded = _counting(again.bert.embeddings)
        with torch.inference_mode():
            assert torch.equal(again.eval()(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
        assert not embedded


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta"])
@pytest.mark.parametrize("left", [False, True])
def test_roberta_models_run_as_one_call_with_their_own_positions(tmp_path, kind, left):
    """RoBERTa counts positions over the real tokens from padding_idx + 1: left padding moves them."""
    model, ctx = _native(tmp_path, make_tiny_model(kind))
    assert ctx.report["native_blocks"]["whole_model"] == "embeddings and blocks in one call"
    ids, mask = _batch()
    if left:
        ids, mask = ids.flip(1), mask.flip(1)
    modules = _module_path(model)
    embedded = _counting(model.roberta.embeddings)
    real = mask.bool()
    with torch.inference_mode():
        got = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = modules.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got[real], ref[real]) and not embedded


def test_distilbert_blocks_run_natively_with_its_own_norms(tmp_path):
    """DistilBERT's blocks add and call nn.LayerNorm (no FusedResidualNorm): the native block does the same."""
    model, ctx = _native(tmp_path, make_tiny_model("distilbert"))
    report = ctx.report["native_blocks"]
    assert report["native"] == ["distilbert.transformer.layer.0", "distilbert.transformer.layer.1"]
    assert "BertModel" in report["whole_model"]
    assert block_parts(model.distilbert.transformer.layer[0]).torch_norms
    ids, mask = _batch()
    modules = _module_path(model)
    attended = _counting(model.distilbert.transformer.layer[0].attention)
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).logits
        ref = modules(input_ids=ids, attention_mask=mask).logits
        single = model(input_ids=ids[:1]).logits
        assert _rel(single, modules(input_ids=ids[:1]).logits) < NATIVE_TOLERANCE
    assert torch.equal(got, ref) and not attended


def test_blocks_of_other_bert_layouts_run_natively_one_by_one(tmp_path):
    model, ctx = _native(tmp_path, make_tiny_model("electra"))  # its embeddings project 16 -> 32 features
    report = ctx.report["native_blocks"]
    assert len(report["native"]) == 2 and "BertModel" in report["whole_model"]
    ids, mask = _batch()
    modules = _module_path(model)
    embedded = _counting(model.electra.embeddings)
    attended = _counting(model.electra.encoder.layer[0].attention)
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).logits
        ref = modules(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, ref) and len(embedded) == 1 and not attended


def test_without_the_kernel_the_modules_run_and_with_it_again_the_native_model(tmp_path, monkeypatch):
    from stackcomp.kernels import ds_cpu

    model, _ = _native(tmp_path)
    ids, mask = _batch()
    embedded = _counting(model.bert.embeddings)
    monkeypatch.setenv("STACKCOMP_KERNELS", "torch")
    ds_cpu.reset()
    try:
        with torch.inference_mode():
            off = model(input_ids=ids, attention_mask=mask).logits
        assert len(embedded) == 1 and "not loaded" in native_model_report(model)
    finally:
        monkeypatch.delenv("STACKCOMP_KERNELS")
        ds_cpu.reset()
    with torch.inference_mode():
        on = model(input_ids=ids, attention_mask=mask).logits
    assert len(embedded) == 1 and _rel(on, off) < NATIVE_TOLERANCE  # torch ops: the dequantized weights


def test_what_cannot_run_natively_says_why(tmp_path):
    fp32 = make_tiny_model("bert")
    assert "FusedInt8QKV" in block_parts(fp32.bert.encoder.layer[0])
    assert "FusedInt8QKV" in model_parts(fp32.bert)
    with pytest.raises(PlanError, match="`unpad: true`"):
        run_pack(make_tiny_model("bert"), tmp_path / "a", fuse_ffn=True, fuse_qkv=True, fuse_norm=True,
                 native_blocks=True)
    with pytest.raises(PlanError, match="target onnx"):
        run_pack(make_tiny_model("bert"), tmp_path / "b", target="onnx", native_blocks=True)
    if _ext().ffn_has_vnni():  # (without it no FFN is fused, and that is the first reason given)
        torch_int8 = run_int8(make_tiny_model("bert"), tmp_path / "c", backend="torch")
        with pytest.raises(PassError, match="'kernel' one"):
            run_pack(torch_int8, tmp_path / "d", **FUSIONS, native_blocks=True)
    assert set(native_blocks_report(fp32).values()) == {block_parts(fp32.bert.encoder.layer[0])}
    with pytest.raises(ValueError, match="attention interface"):
        apply_native_blocks(make_tiny_model("deberta-v2"))
