"""Unpadded inference: the varlen attention kernel against SDPA per sequence, encoders run on packed
real tokens against the padded model (right and left padding, per-token and pooled heads), which
models qualify, ``pack``'s ``unpad`` (parity, report, plan-time refusal), save/load, and the
padded fallbacks (training, export).

Bounds: the kernel sums in fp32 in another order than SDPA and its exp is a polynomial within about
1 ulp: outputs of order 1 agree to 1e-5 (measured ~2e-6).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stackcomp
from stackcomp.artifacts import export_model
from stackcomp.errors import PlanError
from stackcomp.kernels.attention import cu_seqlens_from_mask, varlen_attention, varlen_attention_reference
from stackcomp.kernels.reference import KernelError
from stackcomp.nn.unpadded import CONFIG_FLAG, apply_unpadding, remove_unpadding, unpad_unsupported
from stackcomp.passes.pack import UNPAD_TOLERANCE
from stackcomp.targets import block_stacks

from conftest import kernel_extension, make_tiny_model, run_int8, run_pack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5


def _ext():
    return kernel_extension("varlen_attention")


def _packed_qkv(lengths: list[int], heads: int, head_dim: int, seed: int = 0):
    """q, k, v as (tokens, heads, head_dim) slices of one fused QKV output (strided), and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    qkv = torch.randn(tokens, 3 * heads * head_dim, generator=g) * 2
    width = heads * head_dim
    q, k, v = (qkv[:, i * width:(i + 1) * width].view(tokens, heads, head_dim) for i in range(3))
    return q, k, v, torch.tensor([0, *lengths]).cumsum(0)


@pytest.mark.parametrize("lengths,heads,head_dim", [
    ([5, 1, 17, 44, 0, 16], 6, 32),  # empty and one-token sequences, tails of every width
    ([33, 7, 64], 4, 64),            # whole 16-key blocks and more than 4 of them
    ([3, 70], 2, 24),                # a head dim that is not a multiple of 16
    ([200], 3, 16),
])
@pytest.mark.parametrize("path", ["best", "generic"])
def test_kernel_matches_sdpa_per_sequence(lengths, heads, head_dim, path):
    _ext()
    q, k, v, cu = _packed_qkv(lengths, heads, head_dim, seed=len(lengths))
    assert q.stride(0) == 3 * heads * head_dim  # the kernel reads the strided slices as they are
    scale = head_dim ** -0.5
    out = varlen_attention(q, k, v, cu, scale, path=path)
    ref = varlen_attention_reference(q, k, v, cu, scale)
    assert out.shape == (sum(lengths), heads, head_dim) and out.is_contiguous()
    assert torch.allclose(out, ref, atol=TOL, rtol=0)
    # each sequence alone, against the textbook formula: softmax(scale q k^T) v
    a, b = int(cu[-2]), int(cu[-1])
    s = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) * scale
    assert torch.allclose(out[a:b], torch.einsum("hij,jhd->ihd", s.softmax(-1), v[a:b]), atol=TOL)


def test_kernel_refuses_bad_inputs_and_falls_back_where_it_cannot_run():
    ext = _ext()
    q, k, v, cu = _packed_qkv([4, 6], 2, 8)
    with pytest.raises(KernelError, match="cu_seqlens"):
        varlen_attention(q, k, v, torch.tensor([0, 4, 9]), 0.5)
    with pytest.raises(KernelError, match="one shape"):
        varlen_attention(q, k[:, :1], v, cu, 0.5)
    with pytest.raises(RuntimeError, match="must not decrease"):
        ext.varlen_attention(q, k, v, torch.tensor([0, 6, 4, 10]), 0.5, False)
    # float64, or a head dim that is not contiguous: the torch oracle answers
    qd, kd, vd = (t.double() for t in (q, k, v))
    assert torch.allclose(varlen_attention(qd, kd, vd, cu, 0.5), varlen_attention_reference(qd, kd, vd, cu, 0.5))
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert qt.stride(-1) != 1
    assert torch.allclose(varlen_attention(qt, k, v, cu, 0.5), varlen_attention_reference(q, k, v, cu, 0.5), atol=TOL)


def test_cu_seqlens_from_a_padding_mask():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert cu_seqlens_from_mask(mask).tolist() == [0, 3, 5, 9]


def _padded_batch(rows: int = 4, width: int = 13, left: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, rows):
        cut = width - 3 * r
        if left:
            mask[r, :width - cut] = 0
        else:
            mask[r, cut:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "xlm-roberta", "distilbert", "albert"])
@pytest.mark.parametrize("left", [False, True])
def test_encoders_run_unpadded_with_the_padded_answers(kind, left):
    """Every real token's final hidden state as in the padded model; with right padding (where the
    pooler reads a real first token) the logits too."""
    model = make_tiny_model(kind)
    assert unpad_unsupported(model) is None
    ids, mask = _padded_batch(left=left)
    real = mask.bool()
    calls = []
    with torch.inference_mode():
        padded = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        apply_unpadding(model)
        block = block_stacks(model)[0][1][0]  # the first block (ALBERT: its one shared layer group)
        block.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape if args else
                                                                                next(iter(kwargs.values())).shape),
                                        with_kwargs=True)
        unpadded = model(input_ids=ids, attention_mask=mask)
        full = model(input_ids=ids).logits  # no mask: nothing to pack, SDPA as before
        # per-layer states are collected from the blocks themselves: such a call runs padded
        layers = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert calls and calls[0][:2] == (1, int(mask.sum()))  # the blocks saw the packed real tokens
    assert all(c[0] == ids.shape[0] for c in calls[2:])
    assert [h.shape for h in layers] == [h.shape for h in padded.hidden_states]
    last, ref = model.base_model(input_ids=ids, attention_mask=mask)[0], padded.hidden_states[-1]
    assert last.shape == ref.shape and torch.allclose(last[real], ref[real], atol=TOL)
    if not left:
        assert torch.allclose(unpadded.logits, padded.logits, atol=TOL)
    remove_unpadding(model)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, CONFIG_FLAG)
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, full, atol=TOL)
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, padded.logits, atol=TOL)


def test_per_token_heads_get_real_tokens_right_and_zeros_at_padding():
    from transformers import AutoModelForTokenClassification

    from conftest import _tiny_config

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(_tiny_config("bert", num_labels=5)).eval()
    ids, mask = _padded_batch()
    with torch.inference_mode():
        padded = model(input_ids=ids, attention_mask=mask)
        apply_unpadding(model)
        unpadded = model(input_ids=ids, attention_mask=mask)
        last = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert unpadded.logits.shape == padded.logits.shape
    assert torch.allclose(unpadded.logits[real], padded.logits[real], atol=TOL)
    assert torch.equal(last[~real], torch.zeros_like(last[~real]))


@pytest.mark.parametrize("kind,why", [("deberta-v2", "attention interface"), ("modernbert", "inside its blocks")])
def test_models_it_cannot_apply_to_say_why(kind, why):
    model = make_tiny_model(kind)
    assert why in unpad_unsupported(model)
    with pytest.raises(ValueError, match=why):
        apply_unpadding(model)


def test_training_and_export_see_the_padded_model():
    model = make_tiny_model("bert")
    ids, mask = _padded_batch()
    with torch.inference_mode():
        padded = model(input_ids=ids, attention_mask=mask).logits
    apply_unpadding(model)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    out = model(input_ids=ids, attention_mask=mask).logits
    out.sum().backward()  # the SDPA path, with gradients
    assert torch.allclose(out.detach(), padded, atol=TOL)
    model.eval()
    traced = torch.jit.trace(model, (ids, mask), strict=False)
    with torch.inference_mode():
        assert torch.allclose(traced(ids, mask)["logits"], padded, atol=TOL)


@pytest.mark.parametrize("int8", [False, True])
def test_pack_unpad_checks_parity_and_round_trips(tmp_path, int8):
    """pack unpad on an fp32 and on a fused int8 model: parity on padded batches in the report, the
    padded answers, and a saved model that loads (stackcomp.load) unpadded again."""
    _ext()
    model = make_tiny_model("bert")
    fusions = {}
    if int8:
        model = run_int8(model, tmp_path / "i", backend="kernel")
        fusions = {"fuse_ffn": True, "fuse_qkv": True, "fuse_norm": True}
    ids, mask = _padded_batch()
    with torch.inference_mode():
        padded = model(input_ids=ids, attention_mask=mask).logits
    model, ctx = run_pack(model, tmp_path / "p", unpad=True, **fusions)
    parity = ctx.report["unpad_parity"]
    assert parity["unpadded_vs_padded"] <= UNPAD_TOLERANCE and parity["real_token_share"] < 1.0
    assert "unpad" in ctx.analysis.report and model.config._attn_implementation == "stackcomp_unpadded"
    with torch.inference_mode():
        unpadded = model(input_ids=ids, attention_mask=mask).logits
    assert float((unpadded - padded).abs().max() / padded.abs().max()) < UNPAD_TOLERANCE
    again = stackcomp.load(export_model(model, tmp_path / "saved"))
    assert getattr(again.config, CONFIG_FLAG) and again.config._attn_implementation == "stackcomp_unpadded"
    with torch.inference_mode():
        assert torch.allclose(again(input_ids=ids, attention_mask=mask).logits, unpadded, atol=TOL)


def test_pack_unpad_is_refused_at_plan_time_where_it_cannot_apply(tmp_path):
    with pytest.raises(PlanError, match="attention interface"):
        run_pack(make_tiny_model("deberta-v2"), tmp_path, unpad=True)
    with pytest.raises(PlanError, match="target onnx"):
        run_pack(make_tiny_model("bert"), tmp_path, unpad=True, target="onnx")
    _, ctx = run_pack(make_tiny_model("bert"), tmp_path)
    assert "unpad" not in ctx.analysis.report


def test_a_copied_model_runs_unpadded_on_its_own():
    import copy

    model = apply_unpadding(make_tiny_model("bert"))
    twin = copy.deepcopy(model)
    ids, mask = _padded_batch()
    calls = []
    block = block_stacks(twin)[0][1][0]
    block.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape), with_kwargs=True)
    with torch.inference_mode():
        assert torch.allclose(twin(input_ids=ids, attention_mask=mask).logits,
                              model(input_ids=ids, attention_mask=mask).logits, atol=TOL)
    assert calls == [torch.Size([1, int(mask.sum()), model.config.hidden_size])]
    remove_unpadding(twin)  # the copy's hooks, not the original's
    assert model.config._attn_implementation == "stackcomp_unpadded"


def test_a_mask_it_does_not_pack_runs_padded():
    """A call whose mask is not a plain padding mask (packed position ids without a mask, which
    transformers turns into a block-diagonal mask) gets SDPA's 4-D mask and runs padded."""
    model = make_tiny_model("bert")
    ids = torch.randint(1000, 2000, (1, 10))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])  # three sequences packed in one row
    with torch.inference_mode():
        ref = model(input_ids=ids, position_ids=positions).logits
        apply_unpadding(model)
        assert torch.allclose(model(input_ids=ids, position_ids=positions).logits, ref, atol=TOL)


def test_onnx_export_of_an_unpadded_model_is_the_padded_graph(tmp_path):
    """Exported from an example without padding, the graph still masks padding: export sees
    transformers' own mask, not the unpadded model's shortcut for a batch without padding."""
    pytest.importorskip("onnxruntime")
    from stackcomp.onnx_export import export_onnx, ort_session, run_session

    model = make_tiny_model("bert")
    ids, mask = _padded_batch()
    with torch.inference_mode():
        padded = model(input_ids=ids, attention_mask=mask).logits
    apply_unpadding(model)
    example = {"input_ids": ids[:2, :5], "attention_mask": torch.ones(2, 5, dtype=torch.long),
               "token_type_ids": torch.zeros(2, 5, dtype=torch.long)}
    session = ort_session(export_onnx(model, tmp_path / "model.onnx", example))
    got = run_session(session, {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    assert torch.allclose(torch.as_tensor(got), padded, atol=1e-4)
    with torch.inference_mode():  # and the torch model still runs unpadded afterwards
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, padded, atol=TOL)


def test_a_bool_mask_changed_in_place_between_calls_is_read_again():
    """The sequence starts are kept for one forward only, not on the caller's mask tensor."""
    model = make_tiny_model("bert")
    ids, mask = _padded_batch()
    mask = mask.bool()
    unpadded = apply_unpadding(make_tiny_model("bert"))
    with torch.inference_mode():
        unpadded(input_ids=ids, attention_mask=mask)
        mask[0, 7:] = False  # the same tensor, another padding
        got = unpadded(input_ids=ids, attention_mask=mask).logits
        ref = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, ref, atol=TOL)
