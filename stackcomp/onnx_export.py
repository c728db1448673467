"""ONNX export of a (packed) sequence classifier, ONNX Runtime sessions and the parity check.

Export goes through ``torch.onnx.export(dynamo=True)`` (optimum's ONNX exporters need
transformers < 4.58, which this project does not use). Packed DS layers trace as standard ops
(matmul, gather, mul, sum; see ``PackedDSLinear.forward_standard_ops``) and int8 layers as
fp32 GEMMs with their dequantized weights, so the graph runs in any ONNX runtime; ONNX
Runtime's own dynamic int8 (``quantize_dynamic``, per-channel) is applied on request.

The files are saved with IR version 9: ONNX Runtime 1.31/1.32 refuse onnx 1.23's default (14).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stackcomp.errors import StackcompError

OPSET = 18
IR_VERSION = 9


class OnnxError(StackcompError):
    """ONNX export or ONNX Runtime is unavailable, failed, or disagrees with the torch model."""


def require_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise OnnxError(f"target onnx needs {', '.join(missing)}: pip install onnx onnxscript onnxruntime "
                        "(or stackcomp[onnx])")


#: the model inputs an exported graph may take, in this order
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class _Logits(nn.Module):
    """Token tensors -> logits tensor (what the exporter and ONNX Runtime see)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kw = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, **{k: v for k, v in kw.items() if v is not None}).logits


def export_onnx(model: nn.Module, path: str | Path, example: dict[str, torch.Tensor], opset: int = OPSET) -> Path:
    """Write ``model`` (a Hugging Face classifier) to ``path``; batch and sequence axes are dynamic."""
    require_onnx()
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unknown = set(example) - set(INPUT_NAMES) - {"labels"}
    if unknown:
        raise OnnxError(f"ONNX export takes the inputs {INPUT_NAMES}; the batch also has {sorted(unknown)}")
    example = {k: example[k].cpu() for k in INPUT_NAMES if k in example}
    dyn = torch.export.Dim.DYNAMIC
    wrapper = _Logits(model.cpu()).eval()
    try:
        with torch.no_grad():
            torch.onnx.export(wrapper, (), str(path), kwargs=example, dynamo=True, opset_version=opset,
                              input_names=list(example), output_names=["logits"], external_data=False,
                              dynamic_shapes={k: {0: dyn, 1: dyn} for k in example}, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; report it as one
        raise OnnxError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {str(e)[:500]}") from e
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    onnx.save(proto, str(path))
    return path


def quantize_onnx_int8(src: str | Path, dst: str | Path) -> tuple[Path, list[str]]:
    """ONNX Runtime dynamic int8 (per-channel weights, int8 activations at run time).

    MatMuls with a constant weight of more than 2 dimensions (the DS layers' batched dictionary
    products) stay fp32: ONNX Runtime's integer MatMul takes per-channel scales on 2-D weights
    only. Gathers from fp16 tables (``Int4Embedding``'s scales and offsets) stay as they are: ONNX
    Runtime would give their DequantizeLinear fp16 scales, which it then refuses to load. Returns
    the path and the names of the MatMul/Gemm nodes left in fp32.
    """
    require_onnx()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src)).graph
    batched = {t.name for t in graph.initializer if len(t.dims) > 2}
    keep = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and batched.intersection(n.input)]
    fp16 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    fp16_gathers = [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in fp16]
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_exclude=keep + fp16_gathers)
    proto = onnx.load(str(dst))
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    onnx.save(proto, str(dst))
    return Path(dst), keep


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_session(session: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.cpu().numpy() for k, v in inputs.items() if k in names}
    return torch.from_numpy(session.run(["logits"], feed)[0])


def parity(model: nn.Module, session: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Largest |torch - ONNX Runtime| logit difference, absolute and relative to max |logit|."""
    worst_abs, scale = 0.0, 0.0
    agree = total = 0
    model = model.cpu().eval()
    for b in batches:
        inputs = {k: v.cpu() for k, v in b.items() if k != "labels"}
        with torch.no_grad():
            ref = model(**inputs).logits.float()
        got = run_session(session, inputs).float()
        worst_abs = max(worst_abs, float((got - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        if ref.shape[-1] > 1:
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[0]
    out = {"max_abs_diff": worst_abs, "max_rel_diff": worst_abs / scale if scale else worst_abs}
    if total:
        out["argmax_agreement"] = agree / total
    return out
