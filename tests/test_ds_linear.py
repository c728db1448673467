"""DSLinear: forward paths against the dense product, STF gradients, storage, save/load."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import stackcomp.nn.ds_linear as dsl
from stackcomp.errors import ArtifactError
from stackcomp.factorize.budget import ds_bytes
from stackcomp.factorize.dictionary import ds_blocks, ds_reconstruct, factorize_ds
from stackcomp.factorize.omp import sparse_code
from stackcomp.nn.base import LAYER_TYPES, layer_class
from stackcomp.nn.ds_linear import DSLayerError, DSLinear


def _linear(in_f=32, out_f=24, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _layer(dtype=torch.float32, bias=True):
    return DSLinear.from_linear(_linear(bias=bias, dtype=dtype), block=8, atoms=12, nnz=3, iters=2, dtype=dtype)


def test_registered():
    assert LAYER_TYPES["DSLinear"] is DSLinear and layer_class("DSLinear") is DSLinear


@pytest.mark.parametrize("bias", [True, False])
def test_forward_paths_equal_dense_product(bias, monkeypatch):
    layer = _layer(bias=bias)
    W = layer.to_dense()
    b = layer.bias.detach() if bias else torch.zeros(24)
    for shape in [(32,), (1, 32), (3, 5, 32), (300, 32)]:
        x = torch.randn(*shape)
        ref = x @ W.T + b
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.forward_reference(x), ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(dsl, "_GATHER_ELEMENTS", 100)  # many token chunks
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(layer.forward_reference(x), x @ W.T + b, atol=1e-5, rtol=1e-5)
    assert layer.forward_reference(torch.randn(0, 32)).shape == (0, 24)


def test_layout_and_factors():
    lin = _linear()
    f = factorize_ds(lin.weight.detach(), 8, 12, 3, iters=2)
    layer = DSLinear.from_factors(f.dictionary, f.values, f.indices, lin.bias.detach())
    assert layer.dictionary.shape == (4, 12, 8) and layer.values.shape == (4, 24, 3)
    assert layer.indices.shape == (4, 24, 3) and layer.indices.dtype == torch.uint8
    assert isinstance(layer.dictionary, nn.Parameter) and isinstance(layer.values, nn.Parameter)
    assert "indices" in dict(layer.named_buffers())
    torch.testing.assert_close(layer.to_dense(), ds_reconstruct(f.dictionary, f.values, f.indices))
    # hand check of one entry: W[o, b*B + j] = sum_t v[b,o,t] D[b, idx[b,o,t], j]
    o, b, j = 5, 2, 3
    want = sum(f.values[b, o, t] * f.dictionary[b, f.indices[b, o, t], j] for t in range(3))
    torch.testing.assert_close(layer.to_dense()[o, b * 8 + j], want)
    big = DSLinear(64, 4, 16, 300, 2)
    assert big.indices.dtype == torch.int16
    with pytest.raises(DSLayerError, match="divide"):
        DSLinear(30, 4, 8, 16, 2)
    with pytest.raises(DSLayerError, match="indices"):
        DSLinear.from_factors(f.dictionary, f.values, f.indices + 12)


def test_storage_matches_hand_count_and_budget():
    layer = _layer()
    st = layer.storage()
    floats = 4 * 12 * 8 + 4 * 24 * 3 + 24
    assert st.bytes == floats * 4 + 4 * 24 * 3 * 1  # uint8 indices
    assert st.bytes == ds_bytes(24, 32, 8, 12, 3)
    assert st.params == floats and st.dense_params == 32 * 24 + 24 and st.dense_bytes == (32 * 24 + 24) * 4
    half = DSLinear(64, 16, 16, 300, 2, bias=False, dtype=torch.float16)
    assert half.storage().bytes == (4 * 300 * 16 + 4 * 16 * 2) * 2 + 4 * 16 * 2 * 2
    assert half.storage().bytes == ds_bytes(16, 64, 16, 300, 2, value_bits=16, bias=False)


def _round_trip(layer, tmp_path):
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
    fresh = DSLinear.from_manifest(dict(layer.manifest()))
    fresh.load_state_dict(load_file(str(path)), strict=True)
    return fresh


def test_save_load_round_trip(tmp_path):
    layer = _layer()
    fresh = _round_trip(layer, tmp_path)
    assert fresh.indices.dtype == torch.uint8
    x = torch.randn(4, 32)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.manifest() == layer.manifest()
    # mid-STF checkpoints keep the latent weight
    layer.start_stf(refresh_every=3, keep=1)
    with torch.no_grad():
        layer.weight.add_(0.01)
    fresh = _round_trip(layer, tmp_path)
    assert fresh.stf and fresh.refresh_every == 3 and fresh.stf_keep == 1
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.values, layer.values)


def test_manifest_errors():
    m = _layer().manifest()
    with pytest.raises(ArtifactError, match="atoms"):
        DSLinear.from_manifest({k: v for k, v in m.items() if k != "atoms"})
    with pytest.raises(ArtifactError, match="layout_version"):
        DSLinear.from_manifest({**m, "layout_version": 99})
    with pytest.raises(ArtifactError, match="divide"):
        DSLinear.from_manifest({**m, "block": 5})
    with pytest.raises(ArtifactError, match="index_dtype"):
        DSLinear.from_manifest({**m, "index_dtype": "int32"})


def test_stf_gradients_dictionary_by_finite_differences_and_weight_straight_through():
    layer = _layer(dtype=torch.float64)
    layer.start_stf(refresh_every=1)
    layer.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 32, generator=g, dtype=torch.float64)
    r = torch.randn(6, 24, generator=g, dtype=torch.float64)
    loss = (layer(x) * r).sum()
    loss.backward()
    gD = layer.dictionary.grad.clone()
    # straight through: d loss / d weight = d loss / d W_hat = r^T x
    torch.testing.assert_close(layer.weight.grad, r.T @ x)
    assert layer.values.grad is None  # C is a constant from OMP
    assert gD.abs().sum() > 0
    # finite differences of the same function of D (codes fixed: eval mode does not refresh)
    layer.eval()
    eps = 1e-6
    for b, k, j in [(0, 0, 0), (1, 3, 5), (3, 11, 7), (2, 6, 1)]:
        with torch.no_grad():
            layer.dictionary[b, k, j] += eps
            up = float((layer(x) * r).sum())
            layer.dictionary[b, k, j] -= 2 * eps
            down = float((layer(x) * r).sum())
            layer.dictionary[b, k, j] += eps
        assert abs((up - down) / (2 * eps) - float(gD[b, k, j])) < 1e-6 * max(1.0, abs(float(gD[b, k, j])))


def test_stf_refresh_solves_omp_from_latent_weight():
    layer = _layer()
    layer.start_stf(refresh_every=2, keep=0)
    layer.train()
    x = torch.randn(3, 32)
    new_w = torch.randn(24, 32)
    with torch.no_grad():
        layer.weight.copy_(new_w)
    out = layer(x)  # first training forward: refresh
    v, i = sparse_code(ds_blocks(new_w, 8), layer.dictionary.detach(), 3)
    assert torch.equal(layer.indices.long(), i)
    torch.testing.assert_close(layer.values.detach(), v)
    torch.testing.assert_close(out, x @ layer.to_dense().T + layer.bias, atol=1e-5, rtol=1e-5)
    before = layer.indices.clone()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(24, 32))  # step 1: no refresh (every 2 steps)
    layer(x)
    assert torch.equal(layer.indices, before)
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn(24, 32))  # step 2: refresh
    layer(x)
    assert not torch.equal(layer.indices, before)
    # keep = nnz: the support never moves, only its values are re-solved
    layer.stf_keep = 3
    with torch.no_grad():
        layer.weight.copy_(torch.randn(24, 32))
    before = layer.indices.clone()
    layer.refresh_codes()
    assert torch.equal(layer.indices.sort(-1).values, before.sort(-1).values)


def test_stf_several_calls_per_step_share_one_refresh():
    # gradient accumulation or a layer shared across depth (ALBERT): many forwards, one backward
    layer = _layer()
    layer.start_stf(refresh_every=1)
    layer.train()
    opt = torch.optim.SGD([layer.weight, layer.dictionary], lr=0.1)
    x = torch.randn(4, 32)
    for _ in range(2):
        h = layer(x)
        for _ in range(2):  # the same layer again, 24 -> 32 features by repeating 8 of them
            h = layer(torch.cat([h, h[:, :8]], dim=1))
        idx = layer.indices.clone()
        h.pow(2).mean().backward()  # no "modified by an inplace operation" error
        assert torch.equal(layer.indices, idx)
        opt.step()
        opt.zero_grad()
    assert layer._stf_updates == 2


def test_stf_keeps_unit_atoms_without_changing_the_product():
    layer = _layer()
    layer.start_stf(refresh_every=1000)
    layer.train()
    x = torch.randn(4, 32)
    layer(x)  # first call refreshes
    with torch.no_grad():
        layer.dictionary.mul_(torch.rand(4, 12, 1) + 0.5)
    W_before = layer.to_dense()
    out = layer(x)
    torch.testing.assert_close(layer.dictionary.norm(dim=-1), torch.ones(4, 12))
    torch.testing.assert_close(layer.to_dense(), W_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, x @ W_before.T + layer.bias, atol=1e-5, rtol=1e-5)


def test_stf_training_lowers_a_task_loss_then_freeze():
    torch.manual_seed(0)
    teacher = nn.Linear(32, 24)
    layer = DSLinear.from_linear(_linear(seed=3), block=8, atoms=12, nnz=3, iters=2)
    layer.start_stf(refresh_every=1)
    layer.train()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(256, 32)
    y = teacher(x).detach()
    losses = []
    for _ in range(40):
        loss = ((layer(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    layer.freeze(train_values=False)
    assert not layer.stf and not hasattr(layer, "weight")
    assert not layer.values.requires_grad and layer.dictionary.requires_grad
    idx = layer.indices.clone()
    out = layer(x)  # frozen support: training forward no longer refreshes
    assert torch.equal(layer.indices, idx)
    torch.testing.assert_close(out, x @ layer.to_dense().T + layer.bias, atol=1e-4, rtol=1e-4)
    assert "weight" not in layer.state_dict()


def test_no_stf_ablation_trains_values_and_dictionary():
    layer = _layer().freeze(train_values=True)
    layer.train()
    x = torch.randn(5, 32)
    layer(x).pow(2).sum().backward()
    assert layer.values.grad is not None and layer.dictionary.grad is not None
    assert layer.values.grad.abs().sum() > 0 and layer.dictionary.grad.abs().sum() > 0


@pytest.mark.parametrize("fused", [True, False])
def test_stf_refreshes_on_schedule_under_adamw(fused):
    # fused AdamW updates in place without bumping version counters: mark_step (STFCallback in
    # stackcomp.train) tells the layer
    layer = _layer()
    layer.start_stf(refresh_every=5)
    layer.train()
    opt = torch.optim.AdamW([layer.weight, layer.dictionary], lr=1e-2, fused=fused)
    for _ in range(12):
        layer(torch.randn(4, 32)).pow(2).mean().backward()
        opt.step()
        layer.mark_step()
        opt.zero_grad()
    assert layer._stf_updates == 12  # one per optimizer step: refreshes at steps 1, 6, 11
    before = layer.indices.clone(), layer.values.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, 32))  # evaluation never re-solves the codes
    assert torch.equal(layer.indices, before[0]) and torch.equal(layer.values, before[1])


def test_freeze_without_resolve_keeps_the_evaluated_layer():
    """After STF training the codes the loop evaluated are kept (resolve=False); a final solve
    from the latent weight gives a different layer, which is why the pass does not do it."""
    import copy

    torch.manual_seed(0)
    layer = DSLinear.from_linear(_linear(seed=3), block=8, atoms=12, nnz=3, iters=2)
    layer.start_stf(refresh_every=3)
    layer.train()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(64, 32)
    for _ in range(7):  # the last steps move the latent weight after the last refresh
        loss = (layer(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    with torch.no_grad():
        evaluated = layer(x)
    kept, resolved = copy.deepcopy(layer), copy.deepcopy(layer)
    kept.freeze(resolve=False)
    resolved.freeze(resolve=True)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), evaluated, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(resolved(x), evaluated, atol=1e-3, rtol=1e-3)


def test_unpacked_ds_layers_are_named_and_packed_ones_are_not():
    """evaluate warns about these: their latency is the reference path's, not the kernels'."""
    from stackcomp.evaluate import unpacked_ds_layers
    from stackcomp.nn.packed import PackedDSLinear
    from stackcomp.nn.quantized import Int8DSLinear

    ds = dsl.DSLinear(64, 16, 16, 32, 2)
    model = nn.Sequential(nn.Linear(64, 64), ds, Int8DSLinear.from_ds(ds), PackedDSLinear.from_ds(ds, kernel="torch"))
    assert unpacked_ds_layers(model) == ["1", "2"]
    assert unpacked_ds_layers(nn.Sequential(nn.Linear(4, 4))) == []
