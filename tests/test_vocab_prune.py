"""vocab_prune: the word table pruned to the ids the train split uses, original ids still accepted.

Checked: kept ids give exactly the original logits; every other id gives what the original
model gives for unk (or the mean row); the bytes shrink by what the shapes say; the unseen
share on a planted dev set; int8/int4 on top; save/load directly and through the engine; a
tied LM head is refused by name.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stackcomp.artifacts import load_model, save_model
from stackcomp.errors import PassError
from stackcomp.evaluate import size_report
from stackcomp.factorize.budget import embedding_table_bytes, remap_bytes
from stackcomp.nn.conversions import Int8Config, convert, layer_storage
from stackcomp.nn.dense import densify
from stackcomp.nn.quantized import Int4Embedding, Int8Embedding
from stackcomp.nn.remapped import RemappedEmbedding, RemappedInt4Embedding, RemappedInt8Embedding
from stackcomp.passes.base import PassContext, available_passes, register_pass, run_pass
from stackcomp.passes.vocab_prune import VocabPrunePass

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAD, UNK, CLS, SEP = 0, 100, 101, 102
TOKENIZER = SimpleNamespace(all_special_ids=[PAD, UNK, CLS, SEP, 103], unk_token_id=UNK)


def _batch(rows: list[list[int]], key: str = "") -> dict[str, torch.Tensor]:
    """Right-padded ids and their attention mask (``key`` suffixes both, as pair tasks name them)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {f"input_ids{key}": ids, f"attention_mask{key}": mask}


class PlantedData:
    """A task's data with planted train and dev ids (the loaders the pass reads)."""

    tokenizer = TOKENIZER

    def __init__(self, train: list[dict], dev: list[dict]):
        self.train, self.dev = train, dev

    def train_loader(self, batch_size, seed=None, group_by_length=None, **_):
        return list(self.train)

    def eval_loader(self, batch_size, **_):
        return list(self.dev)


TRAIN = [_batch([[CLS, 2000, 2001, 2002, SEP], [CLS, 2003, SEP]]), _batch([[CLS, 2000, 2004, SEP]])]
SEEN = [CLS, 2000, 2001, 2002, 2003, 2004, SEP]


def _prune(model, tmp_path, train=TRAIN, dev=None, **params):
    ctx = PassContext(stage="v", work_dir=tmp_path, tokenizer=TOKENIZER,
                      data=PlantedData(train, dev or [_batch([[CLS, 2000, SEP]])]))
    model = run_pass(VocabPrunePass(params), model, ctx)
    return model, ctx


def _logits(model, ids: list[list[int]]) -> torch.Tensor:
    x = torch.tensor(ids)
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits


def test_seen_ids_give_exactly_the_original_logits(tmp_path):
    original = make_tiny_model("bert")
    pruned, ctx = _prune(make_tiny_model("bert"), tmp_path)
    table = pruned.get_input_embeddings()
    assert isinstance(table, RemappedEmbedding)
    # kept: the seen ids and the special ones, nothing else
    assert table.num_embeddings == len(set(SEEN) | set(TOKENIZER.all_special_ids)) == ctx.metrics["vocab_kept"]
    ids = [[CLS, 2000, 2001, 2002, SEP], [CLS, 2004, 2003, 2000, SEP]]
    assert torch.equal(_logits(pruned, ids), _logits(original, ids))


def test_unseen_ids_map_to_the_unk_row(tmp_path):
    original = make_tiny_model("bert")
    pruned, _ = _prune(make_tiny_model("bert"), tmp_path)
    ids = [[CLS, 2000, 7592, 29000, SEP]]  # two ids the train split never used
    as_unk = [[CLS, 2000, UNK, UNK, SEP]]
    assert torch.equal(_logits(pruned, ids), _logits(original, as_unk))
    assert not torch.equal(_logits(pruned, ids), _logits(original, ids))


def test_unseen_mean_adds_one_row_the_mean_of_the_dropped_rows(tmp_path):
    original = make_tiny_model("bert")
    pruned, ctx = _prune(make_tiny_model("bert"), tmp_path, unseen="mean")
    table = pruned.get_input_embeddings()
    w = original.get_input_embeddings().weight.detach()
    kept = sorted(set(SEEN) | set(TOKENIZER.all_special_ids))
    dropped = torch.ones(w.shape[0], dtype=torch.bool)
    dropped[kept] = False
    assert table.num_embeddings == len(kept) + 1 == ctx.report["vocab_kept"]
    with torch.no_grad():
        assert torch.allclose(table(torch.tensor([7592, 29000])), w[dropped].mean(0).expand(2, -1))
        assert torch.equal(table(torch.tensor(kept)), w[kept])


def test_min_count_and_keep_top_k():
    model = make_tiny_model("bert")
    pass_ = VocabPrunePass({"min_count": 2, "keep_top_k": 10})
    ctx = PassContext(stage="v", work_dir=".", tokenizer=TOKENIZER, data=PlantedData(TRAIN, TRAIN))
    report = pass_.analyze(model, ctx).report
    # 2000 is the only non-special id seen twice; ids 0-9 kept by keep_top_k; specials 100-103 (0 counted once)
    assert report["vocab_kept"] == 1 + 10 + 4


def test_unseen_share_on_a_planted_dev_set(tmp_path):
    # dev: 10 real tokens (padding excluded by the mask), 3 of them never seen in train (5000 twice, 6000 once);
    # a pair key (input_ids_b, as embedding tasks name their second text) is counted too
    dev = [_batch([[CLS, 2000, 5000, 5000, SEP], [CLS, 6000, SEP]]), _batch([[2001, 2002]], key="_b")]
    _, ctx = _prune(make_tiny_model("bert"), tmp_path, dev=dev)
    report = ctx.analysis.report
    assert report["dev_tokens"] == 10 and report["dev_unseen_tokens"] == 3
    assert report["dev_unseen_distinct_ids"] == 2
    assert (report["dev_examples"], report["dev_examples_with_unseen"]) == (3, 2)  # only those can change
    assert ctx.metrics["vocab_unseen_token_share"] == pytest.approx(0.3)


def test_bytes_shrink_by_what_the_shapes_say(tmp_path):
    before = size_report(make_tiny_model("bert"))
    pruned, ctx = _prune(make_tiny_model("bert"), tmp_path)
    after = size_report(pruned)
    table = pruned.get_input_embeddings()
    vocab, dim, rows = table.vocab_size, table.embedding_dim, table.num_embeddings
    assert table.remap.dtype == torch.uint8  # 9 kept rows: one byte an id
    expected_after = rows * dim * 4 + vocab * 1
    assert layer_storage(table).bytes == expected_after
    assert before["model_bytes"] - after["model_bytes"] == vocab * dim * 4 - expected_after
    assert before["model_dense_bytes"] == after["model_dense_bytes"]  # the reference stays the full fp32 table
    b = ctx.analysis.report["bytes"]
    assert b["fp32"] == {"before": vocab * dim * 4, "after": expected_after, "ratio": vocab * dim * 4 / expected_after}
    assert b["int8"]["after"] == rows * (dim + 4) + vocab
    assert b["int4"]["after"] == rows * (dim // 2 + 2 * 2) + vocab  # dim 32 < group 64: one group a row


def test_remap_width_follows_the_kept_rows():
    emb = nn.Embedding(40000, 4)
    big = RemappedEmbedding.from_embedding(emb, torch.arange(300), unk_id=1)
    assert big.remap.dtype == torch.int16 and layer_storage(big).bytes == 300 * 4 * 4 + 40000 * 2
    assert remap_bytes(40000, 300) == 80000 and remap_bytes(40000, 40000) == 160000


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int8_and_int4_quantize_the_kept_rows_exactly_as_the_full_table(tmp_path, fmt):
    """Row-wise (int8) and group-wise (int4) codes depend on the row only: the pruned table's quantized
    lookups equal the full table's for the same ids (unseen ones through unk)."""
    original = make_tiny_model("bert").get_input_embeddings()
    pruned, _ = _prune(make_tiny_model("bert"), tmp_path)
    table = pruned.get_input_embeddings()
    config = Int8Config(embedding_format=fmt, embedding_group_size=16)
    q = convert("int8", table, config)
    full = convert("int8", original, config)
    assert type(q) is {"int8": RemappedInt8Embedding, "int4": RemappedInt4Embedding}[fmt]
    assert type(full) is {"int8": Int8Embedding, "int4": Int4Embedding}[fmt]
    ids = torch.tensor([[CLS, 2000, 7592, 2004, SEP, PAD]])
    with torch.no_grad():
        assert torch.equal(q(ids), full(torch.where(ids == 7592, UNK, ids)))
    rows, dim, vocab = table.num_embeddings, table.embedding_dim, table.vocab_size
    assert layer_storage(q).bytes == embedding_table_bytes(rows, dim, fmt, 16) + remap_bytes(vocab, rows)
    assert layer_storage(full).bytes == embedding_table_bytes(vocab, dim, fmt, 16)


def test_int8_pass_with_int4_embeddings_stacks_on_top(tmp_path):
    from stackcomp.passes.int8 import Int8Pass

    pruned, _ = _prune(make_tiny_model("bert"), tmp_path)
    ref = _logits(pruned, [[CLS, 2000, 2001, SEP]])
    ctx = PassContext(stage="q", work_dir=tmp_path)
    q = run_pass(Int8Pass({"backend": "torch", "embeddings": "int4", "embedding_group_size": 16}), pruned, ctx)
    assert isinstance(q.get_input_embeddings(), RemappedInt4Embedding)
    assert "bert.embeddings.word_embeddings" in ctx.analysis.report["embeddings"]
    got = _logits(q, [[CLS, 2000, 2001, SEP]])
    assert (got - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("fmt", [None, "int8", "int4"])
def test_save_load_round_trip(tmp_path, fmt):
    model, _ = _prune(make_tiny_model("bert"), tmp_path)
    if fmt is not None:
        table = model.get_input_embeddings()
        q = convert("int8", table, Int8Config(embedding_format=fmt, embedding_group_size=16))
        model.bert.embeddings.word_embeddings = q
    ids = [[CLS, 2000, 7592, 2003, SEP]]
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", verify=False)
    assert type(loaded.get_input_embeddings()) is type(model.get_input_embeddings())
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_densify_gives_a_full_table_with_the_same_lookups(tmp_path):
    model, _ = _prune(make_tiny_model("bert"), tmp_path)
    ids = [[CLS, 2000, 7592, 2003, SEP]]
    ref = _logits(model, ids)
    dense = densify(model).get_input_embeddings()
    assert type(dense) is nn.Embedding and dense.num_embeddings == 30522
    assert torch.equal(_logits(model, ids), ref)


def test_tied_lm_head_is_refused_by_name(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    mlm = BertForMaskedLM(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64))
    with pytest.raises(PassError, match=r"bert\.embeddings\.word_embeddings is tied to cls\.predictions"):
        _prune(mlm, tmp_path, train=[_batch([[CLS % 200, 20, SEP % 200]])])


def test_a_quantized_table_is_refused(tmp_path):
    model = make_tiny_model("bert")
    model.bert.embeddings.word_embeddings = Int8Embedding.from_embedding(model.bert.embeddings.word_embeddings)
    with pytest.raises(PassError, match="Int8Embedding, not a plain nn.Embedding"):
        _prune(model, tmp_path)


def test_through_the_engine_with_int4_and_pack_on_top(tmp_path, tiny_model_dirs, data_env):
    import stackcomp

    if "vocab_prune" not in available_passes():  # an install whose entry points predate the pass
        register_pass(VocabPrunePass)
    recipe = {"name": "vp", "model": str(tiny_model_dirs["bert"]), "task": "glue/sst2", "evaluate_leaves": False,
              "stages": {"v": {"pass": "vocab_prune"},
                         "q": {"pass": "int8", "after": "v",
                               "params": {"backend": "torch", "embeddings": "int4", "embedding_group_size": 16}},
                         "p": {"pass": "pack", "after": "q", "params": {"target": "cpu"}}}}
    result = stackcomp.run(recipe, out=tmp_path / "run")
    assert result.ok, [s.error for s in result.failed]
    metrics = result.stage("v").metrics
    report = json.loads((result.artifact("v") / "report.json").read_text())
    v = stackcomp.load(result.artifact("v"))
    q = stackcomp.load(result.artifact("q"))
    packed = stackcomp.load(result.artifact("p"))
    table = v.get_input_embeddings()
    assert isinstance(table, RemappedEmbedding) and isinstance(q.get_input_embeddings(), RemappedInt4Embedding)
    assert isinstance(packed.get_input_embeddings(), RemappedInt4Embedding)  # pack keeps the table
    assert metrics["vocab_kept"] == table.num_embeddings < 30522
    assert 0 <= metrics["vocab_unseen_token_share"] < 1
    assert "vocab_unseen_token_share" in json.dumps(report)
    # the tiny train split's ids give the original model's logits exactly
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs["bert"]).eval()
    kept = (table.remap != table.remap[UNK]).nonzero().squeeze(1)[:12].tolist()
    ids = [[CLS, *kept, SEP]]
    assert torch.equal(_logits(v, ids), _logits(base, ids))
    assert torch.allclose(_logits(packed, ids), _logits(q, ids), atol=1e-5)


def test_export_loads_through_transformers_from_pretrained(tmp_path):
    """The pruned table is a registered layer like the others: an export rebuilds it in ``from_pretrained``."""
    from transformers import AutoModelForSequenceClassification

    from stackcomp.artifacts import export_model

    model, _ = _prune(make_tiny_model("bert"), tmp_path)
    ids = [[CLS, 2000, 7592, 2003, SEP]]
    export_model(model, tmp_path / "export")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert isinstance(hf.get_input_embeddings(), RemappedEmbedding)
    assert torch.equal(_logits(hf, ids), _logits(model, ids))
