import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from stackcomp.passes.base import PassContext, available_passes
from stackcomp_nm_prune import NMPrunePass, nm_mask


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def test_mask_keeps_the_n_largest_per_group():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 9.0, -8.0, 0.0, 1.0]])
    assert nm_mask(w, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]


def test_pass_prunes_every_encoder_linear_to_2_of_4(tmp_path):
    model = tiny_bert()
    p = NMPrunePass()
    ctx = PassContext(stage="prune", work_dir=tmp_path)
    ctx.analysis = p.analyze(model, ctx)
    assert len(ctx.analysis.report["layers"]) == 12
    model = p.transform(model, ctx)
    w = model.bert.encoder.layer[0].attention.self.query.weight
    nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    assert (nz <= 2).all()
    assert model.classifier.weight.count_nonzero() == model.classifier.weight.numel()  # heads untouched


def test_n_must_be_below_m():
    with pytest.raises(ValueError):
        NMPrunePass({"n": 4, "m": 4})


def test_registered_by_entry_point():
    assert "nm_prune" in available_passes(), "pip install -e plugins/stackcomp-nm-prune"
