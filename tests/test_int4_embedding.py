"""Int4Embedding and ``embeddings: int4`` in the int8 pass: packing, error bound, lookups, exact bytes, round trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stackcomp.artifacts import MANIFEST, export_model, load_model
from stackcomp.errors import ArtifactError
from stackcomp.evaluate import size_report
from stackcomp.nn.quantized import (
    Int4Embedding,
    Int8Embedding,
    QuantizationError,
    dequantize_groups_4bit,
    pack_nibbles,
    quantize_groups_4bit,
    unpack_nibbles,
)
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.int8 import Int8Params, Int8Pass

from conftest import make_tiny_model


def _table(n=60, d=48, seed=0) -> nn.Embedding:
    g = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(n, d, padding_idx=0)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(n, d, generator=g) * torch.logspace(-3, 1, n).unsqueeze(1))
        emb.weight[0] = 0  # the padding row
        emb.weight[7, :16] = 0.25  # a constant group
        emb.weight[9, 5] = 300.0  # one outlier widens its group's range only
        emb.weight[11] += 5.0  # a row far from zero: offsets, not just scales
    return emb


@pytest.mark.parametrize("n", [1, 2, 7, 48])
def test_pack_unpack_round_trip_is_exact(n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 16, (5, n), generator=g, dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (n + 1) // 2)
    # the layout by hand: even entry in the low nibble, odd entry in the high one
    assert int(packed[0, 0]) == int(codes[0, 0]) + (16 * int(codes[0, 1]) if n > 1 else 0)
    assert torch.equal(unpack_nibbles(packed, n), codes)


@pytest.mark.parametrize("fit", ["minmax", "mse"])
def test_planted_codes_are_recovered_exactly(fit):
    """A table that is exactly code * scale + offset with fp16-exact numbers comes back bit for bit."""
    g = torch.Generator().manual_seed(3)
    rows, groups, G = 6, 3, 8
    codes = torch.randint(0, 16, (rows, groups * G), generator=g, dtype=torch.uint8)
    codes.view(rows, groups, G)[..., 0] = 0  # every group spans the full code range,
    codes.view(rows, groups, G)[..., 1] = 15  # so its min and max pin the scale and offset
    scale = (2.0 ** torch.randint(-6, 2, (rows, groups), generator=g)).half()
    offset = (torch.randint(-64, 64, (rows, groups), generator=g) / 16).half()
    w = dequantize_groups_4bit(codes, scale, offset)
    emb = nn.Embedding(rows, groups * G)
    with torch.no_grad():
        emb.weight.copy_(w)
    q = Int4Embedding.from_embedding(emb, group_size=G, fit=fit)
    assert torch.equal(q.codes(), codes)
    assert torch.equal(q.weight_scale, scale) and torch.equal(q.weight_offset, offset)
    assert torch.equal(q.to_dense(), w)


@pytest.mark.parametrize("group", [8, 16, 48])
def test_minmax_error_is_at_most_half_a_step_per_entry(group):
    emb = _table(seed=group)
    q = Int4Embedding.from_embedding(emb, group_size=group, fit="minmax")
    w = emb.weight.detach()
    err = (q.to_dense() - w).abs()
    step = q.weight_scale.float().repeat_interleave(group, dim=1)
    assert (err <= step / 2 + 1e-6 * w.abs()).all()
    assert err.max() > 0  # a real quantization, not a copy
    assert torch.equal(q.to_dense()[0], torch.zeros(48))  # the padding row stays exactly zero
    # offsets: the group minimum rounded down to fp16; scales: (max - offset) / 15 rounded up to fp16
    gw = w.reshape(60, -1, group)
    lo, hi = gw.amin(-1), gw.amax(-1)
    off, sc = q.weight_offset.float(), q.weight_scale.float()
    assert (off <= lo).all() and (off >= lo - lo.abs() * 2**-10 - 2**-24).all()
    rng = (hi - off) / 15
    nonconst = rng > 0
    assert (sc[nonconst] >= rng[nonconst]).all()
    assert (sc[nonconst] <= rng[nonconst] * (1 + 2**-9) + 2**-24).all()
    codes = q.codes().reshape(60, -1, group)
    assert (codes.amax(-1)[nonconst] >= 14).all()  # the codes span the range: no wasted levels


def _group_errors(q: Int4Embedding, w: torch.Tensor) -> torch.Tensor:
    return (q.to_dense() - w).square().reshape(w.shape[0], -1, q.group_size).sum(-1)


@pytest.mark.parametrize("group", [8, 16, 48])
def test_mse_fit_is_never_worse_than_minmax_per_group_and_stays_exact_where_minmax_is(group):
    emb = _table(seed=group)
    w = emb.weight.detach()
    mm = Int4Embedding.from_embedding(emb, group_size=group, fit="minmax")
    ms = Int4Embedding.from_embedding(emb, group_size=group, fit="mse")
    e_mm, e_ms = _group_errors(mm, w), _group_errors(ms, w)
    assert (e_ms <= e_mm).all()
    assert e_ms.sum() < 0.9 * e_mm.sum()  # and better overall, not just equal
    assert torch.equal(ms.to_dense()[0], torch.zeros(48))  # the padding row stays exactly zero
    if group <= 16:  # row 7's first 16 entries are a constant group: exact under both fits
        assert torch.equal(ms.to_dense()[7, :16], w[7, :16])
    # the codes are the nearest ones for the scale and offset as stored
    codes = ms.codes().float().reshape(60, -1, group)
    nearest = torch.round((w.reshape(60, -1, group) - ms.weight_offset.float().unsqueeze(-1))
                          / ms.weight_scale.float().unsqueeze(-1)).clamp(0, 15)
    assert torch.equal(codes, nearest)


def test_mse_fit_matches_a_brute_force_search_on_a_heavy_tailed_group():
    """One 256-wide group of Laplace samples (heavy tails, where min-max wastes most codes on rare
    values). Reference: the least squared error over a fine grid of clipped ranges (121 x 121 clip
    fractions up to 60% of the range off each end), in float32 with the nearest codes. The fit
    must reach it within 2% (it also refits the scale and offset by least squares, so it may beat
    the grid) and clip: some entries end up more than half a step from their value."""
    g = torch.Generator().manual_seed(11)
    u = torch.rand(1, 256, generator=g) - 0.5  # Laplace(0, 1) by its inverse CDF, from the test's own generator
    w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    emb = nn.Embedding(1, 256)
    with torch.no_grad():
        emb.weight.copy_(w)
    mm = Int4Embedding.from_embedding(emb, group_size=256, fit="minmax")
    ms = Int4Embedding.from_embedding(emb, group_size=256, fit="mse")

    lo, hi = float(w.min()), float(w.max())
    frac = torch.linspace(0, 0.6, 121)
    c_lo = (lo + (hi - lo) * frac).view(-1, 1, 1)
    c_hi = (hi - (hi - lo) * frac).view(1, -1, 1)
    step = ((c_hi - c_lo) / 15).clamp_min(1e-12)
    codes = torch.round((w.view(1, 1, -1) - c_lo) / step).clamp(0, 15)
    brute = float((codes * step + c_lo - w.view(1, 1, -1)).square().sum(-1).min())

    e_mm, e_ms = float(_group_errors(mm, w).sum()), float(_group_errors(ms, w).sum())
    assert brute < 0.8 * e_mm  # the planted problem rewards clipping
    assert e_ms <= 1.02 * brute
    err_in_steps = (ms.to_dense() - w).abs() / float(ms.weight_scale)
    assert float(err_in_steps.max()) > 0.5  # clipped entries
    assert int(ms.codes().min()) == 0 and int(ms.codes().max()) == 15


def test_an_unknown_fit_is_a_clear_error():
    with pytest.raises(QuantizationError, match="fit must be one of minmax, mse, got 'l1'"):
        quantize_groups_4bit(torch.ones(2, 8), 8, fit="l1")


def test_smaller_groups_give_smaller_error_and_int4_is_worse_than_int8():
    emb = _table(seed=5)
    w = emb.weight.detach()

    def rel(q):
        return float((q.to_dense() - w).norm() / w.norm())

    e8 = rel(Int8Embedding.from_embedding(emb))
    e4 = [rel(Int4Embedding.from_embedding(emb, group_size=g)) for g in (48, 16, 8)]
    assert e4[0] > e4[1] > e4[2] > e8 > 0


def test_forward_equals_embedding_of_the_dequantized_table():
    emb = _table()
    q = Int4Embedding.from_embedding(emb, group_size=16)
    table = q.to_dense()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (3, 9), generator=g)
    ids[0, 0] = ids[2, 4] = 0  # padding_idx
    ids[1, 1] = 59
    out = q(ids)
    assert out.shape == (3, 9, 48) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(ids, table, padding_idx=0))
    assert torch.equal(out[0, 0], torch.zeros(48))
    assert q(torch.zeros(0, dtype=torch.long)).shape == (0, 48)


@pytest.mark.parametrize("d,group", [(48, 16), (384, 64), (30, 5), (7, 7), (9, 3)])
def test_compiled_lookup_gives_the_torch_lookup_bit_for_bit(d, group):
    """code * scale is exact in fp32 (4-bit code, fp16 scale), so the kernel's fused multiply-add and
    torch's multiply then add give the same floats; odd widths and odd groups take the byte-by-byte loop."""
    from stackcomp.kernels import ds_cpu

    if ds_cpu.extension_with("int4_embedding", "test") is None:
        pytest.skip("the C++ CPU kernel is not available here")
    torch.manual_seed(d)
    q = Int4Embedding.from_embedding(nn.Embedding(50, d), group_size=group)
    ids = torch.randint(0, 50, (4, 11))
    fast = q(ids)
    q.kernel = False
    assert torch.equal(fast, q(ids))
    q.kernel = True
    assert q(ids.int()).dtype == torch.float32 and q(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, d)
    with pytest.raises(RuntimeError, match="out of range for a table of 50 rows"):
        q(torch.tensor([3, 50]))


def test_odd_dim_and_group_larger_than_the_row():
    emb = nn.Embedding(10, 7)
    q = Int4Embedding.from_embedding(emb, group_size=64)  # one group per row
    assert q.group_size == 7 and q.weight.shape == (10, 4) and q.weight_scale.shape == (10, 1)
    ids = torch.arange(10)
    assert torch.equal(q(ids), q.to_dense())
    assert float((q.to_dense() - emb.weight.detach()).abs().max()) <= float(q.weight_scale.max()) / 2 + 1e-6


@pytest.mark.parametrize("n,d,group", [(1000, 384, 64), (1000, 384, 32), (30522, 384, 128), (5, 7, 7)])
def test_storage_is_exact(n, d, group):
    st = Int4Embedding(n, d, group_size=group).storage()
    assert st.params == n * d and st.dense_params == n * d
    # packed codes (half a byte each, a row padded to whole bytes) + fp16 scale and offset per group
    assert st.bytes == n * ((d + 1) // 2) + n * (d // group) * 2 * 2
    assert st.dense_bytes == n * d * 4


@pytest.mark.parametrize("group,match", [(100, "does not divide embedding_dim 384"), (0, "group_size must be"),
                                         (-4, "group_size must be")])
def test_bad_group_size_is_a_clear_error(group, match):
    with pytest.raises(QuantizationError, match=match):
        Int4Embedding(10, 384, group_size=group)
    with pytest.raises(QuantizationError, match="group"):
        quantize_groups_4bit(torch.zeros(2, 384), 100)


def test_values_beyond_fp16_and_max_norm_are_refused():
    emb = nn.Embedding(4, 8)
    with torch.no_grad():
        emb.weight[1, 1] = 1e6
    with pytest.raises(QuantizationError, match="fp16"):
        Int4Embedding.from_embedding(emb, group_size=8)
    with pytest.raises(QuantizationError, match="max_norm"):
        Int4Embedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0))


@pytest.mark.parametrize("field,value", [("num_embeddings", 0), ("group_size", 0), ("group_size", 5),
                                         ("padding_idx", 10), ("layout_version", 2)])
def test_bad_manifest_entries_are_artifact_errors(field, value):
    entry = {"layout_version": 1, "num_embeddings": 10, "embedding_dim": 8, "padding_idx": None, "group_size": 4,
             field: value}
    with pytest.raises(ArtifactError, match="Int4Embedding"):
        Int4Embedding.from_manifest(entry)


# ----------------------------------------------------------------------------- the pass


def _run_pass(model, tmp_path, **params):
    p = Int8Pass({"backend": "torch", **params})
    ctx = PassContext(stage="t", work_dir=tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    return p.transform(model, ctx), ctx.analysis.report


def test_params_accept_int4_and_keep_old_keys():
    old = {"backend": "bitsandbytes", "targets": None, "ignore": None, "embeddings": False, "error_tokens": 256,
           "calibration_sequences": 8, "seed": 0}
    assert Int8Params().model_dump(mode="json") == old  # default stages keep their keys
    assert Int8Params(embeddings=True).model_dump(mode="json") == {**old, "embeddings": True}
    assert Int8Params(embeddings=True).embedding_format == "int8"
    assert Int8Params(embeddings="int8").embedding_format == "int8"
    assert Int8Params().embedding_format is None
    p = Int8Params(embeddings="int4", embedding_group_size=32, embedding_fit="mse")
    assert p.embedding_format == "int4"
    assert p.model_dump(mode="json") == {**old, "embeddings": "int4", "embedding_group_size": 32,
                                         "embedding_fit": "mse"}
    assert Int8Params.model_validate(p.model_dump(mode="json")) == p
    # "minmax" (the default) was the only fit before "mse": int4 stages keep their old keys
    mm = Int8Params(embeddings="int4", embedding_group_size=32)
    assert mm.embedding_fit == "minmax"
    assert mm.model_dump(mode="json") == {**old, "embeddings": "int4", "embedding_group_size": 32}
    assert Int8Params(embeddings="int8", embedding_fit="minmax").model_dump(mode="json") == {**old, "embeddings": "int8"}
    with pytest.raises(ValueError):
        Int8Params(embeddings="int4", embedding_fit="l1")
    with pytest.raises(ValueError):
        Int8Params(embeddings="int3")
    with pytest.raises(ValueError):
        Int8Params(embeddings="int4", embedding_group_size=0)


@pytest.mark.parametrize("fit", ["mse", "minmax"])
def test_pass_int4_changes_tables_keeps_logits_close_and_round_trips(tmp_path, fit):
    model = make_tiny_model("bert")  # hidden 32: group 16 gives two groups a row
    tables = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert len(tables) == 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30522, (2, 11), generator=g)
    ids[0, -3:] = model.config.pad_token_id
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = size_report(model)
    model, report = _run_pass(model, tmp_path, embeddings="int4", embedding_group_size=16, embedding_fit=fit)

    embs = {n: m for n, m in model.named_modules() if isinstance(m, Int4Embedding)}
    assert set(embs) == set(tables) == set(report["embeddings"])
    assert report["embedding_format"] == "int4" and report["embedding_group_size"] == 16
    assert report["embedding_fit"] == fit
    for n, m in embs.items():
        row = report["embeddings"][n]
        rows, d = tables[n].shape
        assert row["type"] == "Int4Embedding" and row["group_size"] == 16 and m.group_size == 16
        assert not torch.equal(m.to_dense(), tables[n])  # the table changed
        assert 0 < row["weight_error"] < 0.15 and row["max_row_error"] < 0.3
        assert row["max_error_in_steps"] > 0
        if fit == "minmax":  # every entry within half a step; "mse" may clip a group's extremes
            assert row["max_error_in_steps"] <= 0.5 + 1e-4
        assert row["bytes_after"] == rows * d // 2 + rows * (d // 16) * 4
        assert row["bytes_before"] == 4 * tables[n].numel()
    assert report["embedding_max_weight_error"] == max(r["weight_error"] for r in report["embeddings"].values())

    after = size_report(model)
    saved_lin = before["linear_bytes"] - after["linear_bytes"]
    saved_emb = sum(4 * t.numel() - (t.numel() // 2 + t.shape[0] * (t.shape[1] // 16) * 4) for t in tables.values())
    assert before["model_bytes"] - after["model_bytes"] == saved_lin + saved_emb
    assert after["model_dense_bytes"] == before["model_dense_bytes"]
    assert after["model_params"] == before["model_params"]

    with torch.no_grad():
        y = model(input_ids=ids).logits
    assert not torch.equal(y, ref)
    assert float((y - ref).norm() / ref.norm()) < 0.2

    export_model(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    word = next(n for n in tables if n.endswith("word_embeddings"))
    assert manifest["layers"][word] == {"type": "Int4Embedding", "layout_version": 1, "num_embeddings": 30522,
                                        "embedding_dim": 32, "padding_idx": model.config.pad_token_id,
                                        "group_size": 16}
    again = load_model(tmp_path / "m")
    for n, m in again.named_modules():
        if n in embs:
            assert isinstance(m, Int4Embedding)
            for b in ("weight", "weight_scale", "weight_offset"):
                assert torch.equal(getattr(m, b), getattr(embs[n], b))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, y)
    assert size_report(again) == after


def test_pass_int4_is_smaller_than_int8_and_less_exact(tmp_path):
    m8, r8 = _run_pass(make_tiny_model("bert"), tmp_path, embeddings=True)
    m4, r4 = _run_pass(make_tiny_model("bert"), tmp_path, embeddings="int4")  # default group 64 > 32: one per row
    assert r8["embedding_format"] == "int8" and "embedding_group_size" not in r8
    assert all(r["group_size"] == 32 for r in r4["embeddings"].values())
    assert r4["embedding_bytes_after"] < r8["embedding_bytes_after"]
    assert size_report(m4)["model_bytes"] < size_report(m8)["model_bytes"]
    assert r4["embedding_max_weight_error"] > r8["embedding_max_weight_error"]


def test_pass_bad_group_size_names_the_table(tmp_path):
    with pytest.raises(QuantizationError, match=r"word_embeddings.*embedding_group_size=12.*does not divide"):
        _run_pass(make_tiny_model("bert"), tmp_path, embeddings="int4", embedding_group_size=12)
