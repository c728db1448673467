"""Distillation losses against hand computations on tiny tensors; layer maps; projection shapes."""

import math

import pytest
import torch

from stackcomp.distill import losses as L


def _softmax(xs, T=1.0):
    e = [math.exp(x / T) for x in xs]
    return [v / sum(e) for v in e]


def test_soft_kl_matches_hand_computation_with_t_squared():
    s = [[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]
    t = [[0.5, 0.5, 2.0], [1.0, 0.0, 0.0]]
    T = 2.0
    expect = 0.0
    for srow, trow in zip(s, t):
        ps, pt = _softmax(srow, T), _softmax(trow, T)
        expect += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expect = expect / 2 * T * T
    got = L.soft_kl(torch.tensor(s), torch.tensor(t), temperature=T)
    assert got.item() == pytest.approx(expect, rel=1e-5)
    assert L.soft_kl(torch.tensor(s), torch.tensor(s), temperature=T).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_kl_temperature_changes_the_value():
    s, t = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.5, 0.5, 2.0]])
    assert L.soft_kl(s, t, 1.0).item() != pytest.approx(L.soft_kl(s, t, 4.0).item(), rel=1e-3)


def test_soft_cross_entropy_matches_hand_computation():
    s, t, T = [[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], [[0.5, 0.5, 2.0], [1.0, 0.0, 0.0]], 1.5
    expect = 0.0
    for srow, trow in zip(s, t):
        ps, pt = _softmax(srow, T), _softmax(trow, T)
        expect -= sum(b * math.log(a) for a, b in zip(ps, pt))
    expect /= 2
    got = L.soft_cross_entropy(torch.tensor(s), torch.tensor(t), temperature=T)
    assert got.item() == pytest.approx(expect, rel=1e-5)


def test_hard_loss_cross_entropy_and_regression_mse():
    s = [[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]
    labels = [2, 0]
    expect = -(math.log(_softmax(s[0])[2]) + math.log(_softmax(s[1])[0])) / 2
    assert L.hard_loss(torch.tensor(s), torch.tensor(labels)).item() == pytest.approx(expect, rel=1e-5)
    reg = torch.tensor([[1.0], [3.0]])
    y = torch.tensor([2.0, 2.5])
    assert L.hard_loss(reg, y).item() == pytest.approx(((1 - 2) ** 2 + (3 - 2.5) ** 2) / 2)


def test_regression_soft_losses_are_mse_on_the_logit():
    s, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [4.0]])
    assert L.soft_kl(s, t, 4.0).item() == pytest.approx(1.0)  # (1 + 1) / 2, no temperature
    assert L.soft_cross_entropy(s, t, 4.0).item() == pytest.approx(1.0)


def test_hidden_cosine_over_real_tokens_only():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, -7.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 3.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0]])
    expect = ((1 - 1 / math.sqrt(2)) + (1 - 1.0)) / 2
    assert L.hidden_cosine(s, t, mask).item() == pytest.approx(expect, rel=1e-5)
    with_pad = ((1 - 1 / math.sqrt(2)) + 0 + (1 - (5 - 7) / (math.sqrt(74) * math.sqrt(2)))) / 3
    assert L.hidden_cosine(s, t).item() == pytest.approx(with_pad, rel=1e-5)


def test_hidden_mse_over_real_tokens_and_features():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [9.0, 9.0]]])
    t = torch.tensor([[[0.0, 2.0], [3.0, 6.0]], [[1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # real tokens: (1,0)+(0,4) | (1,1); squared errors 1, 4, 2 over 3 tokens x 2 features
    assert L.hidden_mse(s, t, mask).item() == pytest.approx((1 + 4 + 2) / 6)


def test_attention_mse_over_real_query_key_pairs():
    s = torch.zeros(1, 1, 3, 3)
    t = torch.zeros(1, 1, 3, 3)
    s[0, 0, 0, 0], t[0, 0, 0, 0] = 0.7, 0.4   # real pair: counts
    s[0, 0, 1, 0], t[0, 0, 1, 0] = 0.2, 0.5   # real pair: counts
    s[0, 0, 2, 0] = 9.0                        # padded query: ignored
    s[0, 0, 0, 2] = 9.0                        # padded key: ignored
    mask = torch.tensor([[1, 1, 0]])
    assert L.attention_mse(s, t, mask).item() == pytest.approx((0.3**2 + 0.3**2) / 4, rel=1e-5)


def test_attention_mse_averages_heads_when_counts_differ():
    s = torch.rand(2, 4, 3, 3)
    t = torch.rand(2, 2, 3, 3)
    expect = ((s.mean(1) - t.mean(1)) ** 2).mean()
    assert L.attention_mse(s, t).item() == pytest.approx(expect.item(), rel=1e-5)


def test_intermediate_losses_do_not_depend_on_padding():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    sa, ta = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4)
    m = torch.ones(1, 4)
    pad = lambda x, n: torch.nn.functional.pad(x, (0, 0, 0, n), value=3.0)  # noqa: E731
    pad_att = lambda x, n: torch.nn.functional.pad(x, (0, n, 0, n), value=0.5)  # noqa: E731
    mp = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert L.hidden_mse(pad(s, 2), pad(t, 2) * 0, mp).item() == pytest.approx(
        L.hidden_mse(s, t * 0, m).item(), rel=1e-6)
    assert L.hidden_cosine(pad(s, 2), pad(t, 2), mp).item() == pytest.approx(L.hidden_cosine(s, t, m).item(), rel=1e-6)
    assert L.attention_mse(pad_att(sa, 2), pad_att(ta, 2) * 0, mp).item() == pytest.approx(
        L.attention_mse(sa, ta * 0, m).item(), rel=1e-6)


def test_losses_give_no_gradient_to_the_teacher_side():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    (L.soft_kl(s, t, 2.0) + L.soft_cross_entropy(s, t)).backward()
    assert s.grad is not None and t.grad is None


def test_uniform_layer_maps():
    assert L.uniform_layer_map(3, 6) == [2, 4, 6]
    assert L.uniform_layer_map(4, 12) == [3, 6, 9, 12]  # TinyBERT's g(m) = 3m
    assert L.uniform_layer_map(4, 6) == [1, 3, 4, 6]
    assert L.uniform_layer_map(2, 2) == [1, 2]
    with pytest.raises(ValueError, match="no deeper"):
        L.uniform_layer_map(4, 2)


def test_explicit_layer_maps_are_checked():
    assert L.resolve_layer_map(None, 3, 6) == [2, 4, 6]
    assert L.resolve_layer_map([1, 3, 5], 3, 6) == [1, 3, 5]
    with pytest.raises(ValueError, match="3 layers"):
        L.resolve_layer_map([1, 3], 3, 6)
    with pytest.raises(ValueError, match="1..6"):
        L.resolve_layer_map([0, 3, 7], 3, 6)


def test_projection_shapes_and_identity():
    p = L.HiddenProjection(32, 48)
    assert p(torch.randn(2, 5, 32)).shape == (2, 5, 48)
    assert sum(q.numel() for q in p.parameters()) == 32 * 48 + 48
    same = L.HiddenProjection(32, 32)
    x = torch.randn(2, 5, 32)
    assert same(x) is x and not list(same.parameters())
    with pytest.raises(ValueError, match="width 32"):
        p(torch.randn(2, 5, 16))
