"""KDLoss: the weighted sum of its parts, teacher frozen and unseen by the optimizer, logit cache."""

import pytest
import torch

from stackcomp.distill import losses as L
from stackcomp.distill.kd import KDLoss, KDWeights, forward_inputs
from stackcomp.distill.students import student_from_config
from stackcomp.errors import ModelError, RecipeError
from stackcomp.train import TrainConfig, default_param_groups, train
from tests.conftest import make_tiny_model


def _batch(n=4, length=10, seed=0, labels=True, pad_to=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, length - i:] = 0
    ids = ids * mask
    b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    if labels:
        b["labels"] = torch.randint(0, 2, (n,), generator=g)
    return b


def _narrow_student(ref):
    spec = {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 24, "intermediate_size": 40,
            "num_attention_heads": 2}
    return student_from_config(spec, ref, seed=3)[0]


def test_forward_inputs_follow_each_signature():
    b = _batch()
    assert set(forward_inputs(make_tiny_model("bert"), b)) == {"input_ids", "attention_mask", "token_type_ids"}
    assert set(forward_inputs(make_tiny_model("distilbert"), b)) == {"input_ids", "attention_mask"}


def test_total_is_the_weighted_sum_of_hand_assembled_parts():
    teacher, student = make_tiny_model("bert", seed=0), _narrow_student(make_tiny_model("bert"))
    w = KDWeights(soft=0.3, hard=0.7, pred=0.2, cosine=0.5, attention=1.5, hidden=2.0)
    kd = KDLoss(teacher, student, w, temperature=3.0)
    student.eval()  # no dropout: the two student forwards must agree
    b = _batch()
    got = kd(student, b)
    x = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        t = teacher(**x, output_hidden_states=True, output_attentions=True)
    s = student(**x, output_hidden_states=True, output_attentions=True)
    m, proj = b["attention_mask"], kd.projection
    assert kd.layer_map == [2]  # 1-layer student, 2-layer teacher: its only layer learns from the last
    expect = (0.3 * L.soft_kl(s.logits, t.logits, 3.0) + 0.7 * L.hard_loss(s.logits, b["labels"])
              + 0.2 * L.soft_cross_entropy(s.logits, t.logits, 3.0)
              + 0.5 * L.hidden_cosine(proj(s.hidden_states[-1]), t.hidden_states[-1], m)
              + 2.0 * (L.hidden_mse(proj(s.hidden_states[0]), t.hidden_states[0], m)
                       + L.hidden_mse(proj(s.hidden_states[1]), t.hidden_states[2], m))
              + 1.5 * L.attention_mse(s.attentions[0], t.attentions[1], m))
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    parts = kd.summary()
    assert set(parts) >= {"kd_soft", "kd_hard", "kd_pred", "kd_cosine", "kd_attention", "kd_hidden"}
    kd.detach(student)


def test_teacher_gets_no_gradient_and_stays_unchanged_through_training():
    teacher, student = make_tiny_model("bert", seed=0), make_tiny_model("bert", seed=1)
    teacher.train()  # KDLoss must put it in eval (no dropout) itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = KDLoss(teacher, student, KDWeights(soft=1, hard=0, hidden=1, attention=1))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    batches = [_batch(seed=i) for i in range(3)]
    s_before = [p.clone() for p in student.parameters()]
    train(student, batches, TrainConfig(max_steps=3, lr=1e-2, warmup_ratio=0.0), loss_fn=kd)
    kd.detach(student)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))


def test_projection_is_trained_while_attached_and_removed_after():
    teacher, student = make_tiny_model("bert", seed=0), _narrow_student(make_tiny_model("bert"))
    kd = KDLoss(teacher, student, KDWeights(soft=0, hard=0, hidden=1))
    proj_w = kd.projection.proj.weight
    assert proj_w.shape == (32, 24)
    kd.attach(student)
    ids = {id(p) for g in default_param_groups(student, 0.01) for p in g["params"]}
    assert id(proj_w) in ids
    before = proj_w.detach().clone()
    train(student, [_batch(seed=i) for i in range(2)], TrainConfig(max_steps=2, lr=1e-2, warmup_ratio=0.0),
          loss_fn=kd)
    assert not torch.equal(before, proj_w.detach())
    kd.detach(student)
    assert not any("_kd_projection" in k for k in student.state_dict())


def test_attention_loss_switches_to_eager_and_back():
    teacher, student = make_tiny_model("bert", seed=0), make_tiny_model("bert", seed=1)
    impl = student.config._attn_implementation
    kd = KDLoss(teacher, student, KDWeights(soft=0, hard=0, attention=1))
    assert student.config._attn_implementation == "eager"
    assert kd(student, _batch()).item() > 0
    kd.detach(student)
    assert student.config._attn_implementation == impl


def test_hard_only_never_loads_the_teacher():
    calls = []

    def load():
        calls.append(1)
        return make_tiny_model("bert")

    student = make_tiny_model("bert", seed=1)
    kd = KDLoss(load, student, KDWeights(soft=0, hard=1))
    b = _batch()
    assert kd(student, b).item() == pytest.approx(L.hard_loss(student(**forward_inputs(student, b)).logits,
                                                              b["labels"]).item(), rel=1e-5)
    assert calls == [] and kd.teacher_calls == 0
    KDLoss(load, student, KDWeights(soft=1, hard=0))
    assert calls == [1]


def test_logit_cache_is_keyed_by_content_whatever_the_shuffle_and_padding():
    teacher, student = make_tiny_model("bert", seed=0), make_tiny_model("bert", seed=1)
    ex = _batch(n=6, length=12, seed=5)
    rows = [{k: v[i] for k, v in ex.items()} for i in range(6)]

    def collate(items, pad_to):
        out = {}
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            out[k] = torch.stack([torch.nn.functional.pad(r[k][: int(r["attention_mask"].sum())],
                                                          (0, pad_to - int(r["attention_mask"].sum()))) for r in items])
        out["labels"] = torch.stack([r["labels"] for r in items])
        return out

    epoch1 = [collate(rows[0:3], 12), collate(rows[3:6], 12)]
    epoch2 = [collate([rows[4], rows[0], rows[2]], 14), collate([rows[5], rows[1], rows[3]], 16)]
    cached = KDLoss(teacher, student, KDWeights(soft=1, hard=0.5), cache_teacher_logits=True)
    plain = KDLoss(teacher, student, KDWeights(soft=1, hard=0.5))
    with torch.no_grad():
        for b in epoch1:
            cached(student, b)
        assert cached.teacher_calls == 2
        for b in epoch2:
            assert cached(student, b).item() == pytest.approx(plain(student, b).item(), rel=1e-5, abs=1e-6)
    assert cached.teacher_calls == 2 and cached.cache_hits == 2
    new = collate([rows[0], {**rows[1], "input_ids": rows[1]["input_ids"].clone().index_fill_(0, torch.tensor([1]), 7)},
                   rows[2]], 12)
    with torch.no_grad():
        cached(student, new)
    assert cached.teacher_calls == 3  # one unseen example: the teacher runs again


def test_cache_is_off_when_intermediate_losses_need_the_teacher(caplog):
    teacher, student = make_tiny_model("bert", seed=0), make_tiny_model("bert", seed=1)
    kd = KDLoss(teacher, student, KDWeights(soft=1, hidden=1), cache_teacher_logits=True)
    assert not kd.cache_teacher_logits
    assert "no effect" in caplog.text


def test_bert_teacher_distilbert_student_and_regression():
    teacher, student = make_tiny_model("bert", seed=0), make_tiny_model("distilbert", seed=1)
    kd = KDLoss(teacher, student, KDWeights(soft=1, hard=1, cosine=1, hidden=1, attention=1))
    loss = kd(student, _batch())
    assert torch.isfinite(loss) and kd.summary()["kd_attention"] > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    kd.detach(student)
    rt, rs = make_tiny_model("bert", num_labels=1, seed=0), make_tiny_model("bert", num_labels=1, seed=1)
    b = {**_batch(), "labels": torch.tensor([0.5, 1.0, 2.0, 3.5])}
    kd = KDLoss(rt, rs, KDWeights(soft=1, hard=1))
    x = forward_inputs(rs, b)
    with torch.no_grad():
        t, s = rt(**x).logits.squeeze(-1), rs(**x).logits.squeeze(-1)
    expect = ((s - t) ** 2).mean() + ((s - b["labels"]) ** 2).mean()
    assert kd(rs, b).item() == pytest.approx(expect.item(), rel=1e-5)


def test_mistakes_are_user_errors():
    teacher, student = make_tiny_model("bert", seed=0), make_tiny_model("bert", seed=1)
    with pytest.raises(RecipeError, match="all 0"):
        KDLoss(teacher, student, KDWeights(soft=0, hard=0))
    with pytest.raises(ModelError, match="label"):
        KDLoss(make_tiny_model("bert", num_labels=3), student, KDWeights(soft=1))
    with pytest.raises(RecipeError, match="layer_map"):
        KDLoss(teacher, student, KDWeights(hidden=1), layer_map=[1, 5])
    with pytest.raises(RecipeError, match="need a teacher"):
        KDLoss(None, student, KDWeights(soft=1))
