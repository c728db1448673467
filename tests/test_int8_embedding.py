"""Int8Embedding and the int8 pass's ``embeddings`` option: lookups, error bound, exact bytes, round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from stackcomp.artifacts import MANIFEST, export_model, load_model
from stackcomp.errors import ArtifactError, PlanError
from stackcomp.evaluate import size_report
from stackcomp.nn.quantized import Int8Embedding, Int8Linear, QuantizationError
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.int8 import Int8Pass

from conftest import _tiny_config, make_tiny_model


def _table(n=50, d=24, seed=0) -> nn.Embedding:
    g = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(n, d, padding_idx=0)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(n, d, generator=g) * torch.logspace(-3, 1, n).unsqueeze(1))
        emb.weight[7] = 0  # an all-zero row
        emb.weight[9, 5] = 300.0  # one outlier sets its row's scale
    return emb


def test_lookup_equals_the_dequantized_table_rows():
    emb = _table()
    q = Int8Embedding.from_embedding(emb)
    table = q.to_dense()
    ids = torch.tensor([[0, 7, 9, 9, 49], [3, 3, 1, 2, 48]])
    out = q(ids)
    assert out.shape == (2, 5, 24) and out.dtype == torch.float32
    assert torch.equal(out, table[ids])
    # the table itself is q * scale with the scale from the row's max, computed here by hand
    w = emb.weight.detach()
    amax = w.abs().amax(1)
    hand_scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    assert torch.allclose(q.weight_scale, hand_scale, rtol=0, atol=0)
    assert torch.equal(table, q.weight.float() * hand_scale.unsqueeze(1))
    assert torch.equal(out[0, 1], torch.zeros(24))  # the zero row stays exactly zero


def test_error_per_row_is_at_most_half_a_step():
    emb = _table(seed=1)
    q = Int8Embedding.from_embedding(emb)
    err = (q.to_dense() - emb.weight.detach()).abs()
    step = q.weight_scale.unsqueeze(1)
    assert (err <= step / 2 * (1 + 1e-6)).all()
    assert err.max() > 0  # a real quantization, not a copy
    assert q.weight.abs().amax(1)[torch.arange(50) != 7].eq(127).all()  # every nonzero row uses the full range


def test_storage_is_exact():
    q = Int8Embedding(1000, 24)
    st = q.storage()
    assert st.params == 1000 * 24 and st.dense_params == 1000 * 24
    assert st.bytes == 1000 * 24 * 1 + 1000 * 4  # int8 table + one fp32 scale per row
    assert st.dense_bytes == 1000 * 24 * 4
    assert st.ratio == pytest.approx(96 / 28)


def test_max_norm_embeddings_are_refused():
    with pytest.raises(QuantizationError, match="max_norm"):
        Int8Embedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0))


def _ctx(tmp_path):
    return PassContext(stage="t", work_dir=tmp_path)


def _run_pass(model, tmp_path, **params):
    p = Int8Pass({"backend": "torch", **params})
    ctx = _ctx(tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    return p.transform(model, ctx), ctx.analysis.report


@pytest.mark.parametrize("kind", ["bert", "albert"])
def test_pass_quantizes_word_position_and_token_type_tables(tmp_path, kind):
    model = make_tiny_model(kind)
    dim = model.config.embedding_size if kind == "albert" else model.config.hidden_size
    if kind == "albert":
        assert dim != model.config.hidden_size
    ids = torch.randint(0, 30522, (2, 11))
    tables = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert len(tables) == 3
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = size_report(model)
    model, report = _run_pass(model, tmp_path, embeddings=True)

    embs = {n: m for n, m in model.named_modules() if isinstance(m, Int8Embedding)}
    assert set(embs) == set(tables) == set(report["embeddings"])
    assert not any(type(m) is nn.Embedding for m in model.modules())
    for n, m in embs.items():
        row = report["embeddings"][n]
        assert row["shape"] == list(tables[n].shape) and tables[n].shape[1] == dim
        assert 0 < row["weight_error"] < 0.01 and row["max_row_error"] < 0.02
        assert 0 < row["max_error_in_steps"] <= 0.5 + 1e-4
        assert row["bytes_after"] == tables[n].numel() + 4 * tables[n].shape[0]
        assert row["bytes_before"] == 4 * tables[n].numel()
    assert report["embedding_bytes_after"] == sum(r["bytes_after"] for r in report["embeddings"].values())

    # whole-model bytes drop by exactly the hand-counted saving; linear accounting is untouched
    after = size_report(model)
    saved_lin = before["linear_bytes"] - after["linear_bytes"]
    saved_emb = sum(4 * t.numel() - (t.numel() + 4 * t.shape[0]) for t in tables.values())
    assert after["linear_dense_bytes"] == before["linear_dense_bytes"]
    assert after["linear_layers"] == before["linear_layers"]
    assert before["model_bytes"] - after["model_bytes"] == saved_lin + saved_emb
    assert after["model_dense_bytes"] == before["model_dense_bytes"]
    assert after["model_params"] == before["model_params"]

    with torch.no_grad():
        y = model(input_ids=ids).logits
    assert float((y - ref).norm() / ref.norm()) < 0.1

    export_model(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    word = next(n for n in tables if n.endswith("word_embeddings"))
    assert manifest["layers"][word] == {"type": "Int8Embedding", "layout_version": 1, "num_embeddings": 30522,
                                        "embedding_dim": dim, "padding_idx": model.config.pad_token_id}
    again = load_model(tmp_path / "m")
    for n, m in again.named_modules():
        if n in embs:
            assert isinstance(m, Int8Embedding)
            assert torch.equal(m.weight, embs[n].weight) and torch.equal(m.weight_scale, embs[n].weight_scale)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, y)
    assert size_report(again) == after


def test_embeddings_default_off_and_explicit_ignore(tmp_path):
    model, report = _run_pass(make_tiny_model("bert"), tmp_path)
    assert "embeddings" not in report
    assert not any(isinstance(m, Int8Embedding) for m in model.modules())
    model, report = _run_pass(make_tiny_model("bert"), tmp_path, embeddings=True, ignore=["*position_embeddings"])
    assert sorted(report["embeddings"]) == ["bert.embeddings.token_type_embeddings", "bert.embeddings.word_embeddings"]
    assert type(model.bert.embeddings.position_embeddings) is nn.Embedding


def test_tied_word_embeddings_are_left_alone(tmp_path):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(_tiny_config("bert")).eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    model, report = _run_pass(model, tmp_path, embeddings=True)
    assert type(model.bert.embeddings.word_embeddings) is nn.Embedding
    assert any(s.startswith("bert.embeddings.word_embeddings") and "tied" in s for s in report["skipped"])
    assert isinstance(model.bert.embeddings.position_embeddings, Int8Embedding)


@pytest.mark.parametrize("field,value", [("num_embeddings", 0), ("embedding_dim", "8"), ("padding_idx", -1),
                                         ("padding_idx", 10), ("layout_version", 2)])
def test_bad_manifest_entries_are_artifact_errors(field, value):
    entry = {"layout_version": 1, "num_embeddings": 10, "embedding_dim": 8, "padding_idx": None, field: value}
    with pytest.raises(ArtifactError, match="Int8Embedding"):
        Int8Embedding.from_manifest(entry)


def test_targets_empty_quantizes_only_the_tables(tmp_path):
    model, report = _run_pass(make_tiny_model("bert"), tmp_path, embeddings="int4", targets=[])
    assert report["layers"] == {} and report["median_output_error"] is None and len(report["embeddings"]) == 3
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear  # the linears stay fp32
    with pytest.raises(PlanError, match="targets: \\[\\] quantizes no linear"):
        _run_pass(make_tiny_model("bert"), tmp_path, targets=[])
