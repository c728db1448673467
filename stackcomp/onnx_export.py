"""ONNX export of a (packed) sequence classifier, ONNX Runtime sessions, parity and latency.

Export goes through ``torch.onnx.export(dynamo=True)`` (optimum's ONNX exporters need
transformers < 4.58, which this project does not use). What each compressed layer records:

* int8 linears: their backend's int8 arithmetic (:mod:`stackcomp.onnx_ops`: ``QuantizeLinear`` +
  ``MatMulInteger`` + rescale, weights int8 in the file), so ONNX Runtime computes what torch does;
* packed DS layers (``PackedDSLinear``): by default (``ds_form="weight"``) the dense weight
  rebuilt from the stored factors by a gather and a sum over initializers only, then one MatMul:
  ONNX Runtime folds the rebuild into a constant when the session loads, so each layer runs the
  dense graph's MatMul while the file keeps the factors (MiniLM: 7-8% slower than dense, the
  fastest DS form measured) (``bench/onnx_ds.py`` measured the
  forms; ``"codes"`` and ``"gather"`` are kept for it).

ONNX Runtime's own dynamic int8 (``quantize_dynamic``, per-channel) is applied on request.
:func:`write_onnx_folder` lays the folder out as optimum's ``ORTModel`` classes read it
(``model.onnx``, ``config.json``, tokenizer files).

The files are saved with IR version 9: ONNX Runtime 1.31/1.32 refuse onnx 1.23's default (14).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def ds_export_form(model: nn.Module, form: str) -> Iterator[None]:
    """Packed DS layers of ``model`` record ``form`` (see ``PackedDSLinear.EXPORT_FORMS``) while exporting."""
    from stackcomp.nn.packed import PackedDSLinear

    if form not in PackedDSLinear.EXPORT_FORMS:
        raise OnnxError(f"DS export form must be one of {', '.join(PackedDSLinear.EXPORT_FORMS)}, got {form!r}")
    layers = [m for m in model.modules() if isinstance(m, PackedDSLinear)]
    before = [m.export_form for m in layers]
    for m in layers:
        m.export_form = form
    try:
        yield
    finally:
        for m, f in zip(layers, before):
            m.export_form = f


def export_onnx(model: nn.Module, path: str | Path, example: dict[str, torch.Tensor], opset: int = OPSET,
                ds_form: str = "weight") -> Path:
    """Write ``model`` (a Hugging Face classifier) to ``path``; batch and sequence axes are dynamic."""
    require_onnx()
    import onnx

    from stackcomp.onnx_ops import translations

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unknown = set(example) - set(INPUT_NAMES) - {"labels"}
    if unknown:
        raise OnnxError(f"ONNX export takes the inputs {INPUT_NAMES}; the batch also has {sorted(unknown)}")
    example = {k: example[k].cpu().contiguous() for k in INPUT_NAMES if k in example}
    dyn = torch.export.Dim.DYNAMIC
    wrapper = _Logits(model.cpu()).eval()
    try:
        with torch.no_grad(), ds_export_form(model, ds_form):
            torch.onnx.export(wrapper, (), str(path), kwargs=example, dynamo=True, opset_version=opset,
                              input_names=list(example), output_names=["logits"], external_data=False,
                              dynamic_shapes={k: {0: dyn, 1: dyn} for k in example}, verbose=False,
                              custom_translation_table=translations())
    except OnnxError:
        raise
    except Exception as e:  # the exporter raises many kinds; report it as one
        raise OnnxError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {str(e)[:500]}") from e
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    onnx.save(proto, str(path))
    return path


def write_onnx_folder(folder: str | Path, model: nn.Module, tokenizer: Any = None) -> Path:
    """Put ``config.json`` (a plain one: the graph needs no stackcomp layers) and the tokenizer
    files beside ``folder/model.onnx``, the layout optimum's ``ORTModelFor*.from_pretrained`` reads."""
    folder = Path(folder)
    config = getattr(model, "config", None)
    if config is not None:
        config = copy.deepcopy(config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def graph_summary(path: str | Path) -> dict[str, Any]:
    """What the report says about a graph: its bytes and how many nodes of each integer-GEMM kind."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {"bytes": Path(path).stat().st_size,
            "int8_matmuls": sum(1 for o in ops if o in ("MatMulInteger", "QLinearMatMul")),
            "fp32_matmuls": sum(1 for o in ops if o in ("MatMul", "Gemm"))}


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


def ort_session(path: str | Path, threads: int | None = None, *, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session. ``spinning=False``: its worker threads sleep between runs instead
    of spinning (ONNX Runtime's default keeps them busy-waiting for a while after each run, which
    takes the cores from whatever runs next in the process: torch models timed side by side)."""
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def measure_ort_latency(path: str | Path | Any, batches: list[dict[str, torch.Tensor]], *,
                        threads: int | None = None, warmup: int = 2, repeats: int = 3) -> dict[str, float]:
    """ONNX Runtime's median wall time per batch of ``path`` (a graph file, ``threads`` intra-op
    threads, or an open session), measured like :func:`stackcomp.evaluate.measure_latency` (same
    batches, warmup and repeats)."""
    session = ort_session(path, threads) if isinstance(path, (str, Path)) else path
    names = {i.name for i in session.get_inputs()}
    feeds = [{k: v.cpu().numpy() for k, v in b.items() if k in names} for b in batches]
    for f in feeds[: max(1, warmup)]:
        session.run(["logits"], f)
    per_batch: list[float] = []
    for _ in range(repeats):
        for f in feeds:
            t0 = time.perf_counter()
            session.run(["logits"], f)
            per_batch.append(time.perf_counter() - t0)
    n_seq = sum(int(b["input_ids"].shape[0]) for b in batches) / max(1, len(batches))
    med = statistics.median(per_batch)
    return {"ort_latency_ms_per_batch": med * 1e3, "ort_latency_ms_per_sequence": med * 1e3 / n_seq,
            "ort_latency_threads": session.get_session_options().intra_op_num_threads}


def upstream_onnx(parent_reports: dict[str, dict], upstream_dirs: dict[str, Path]) -> dict[str, Path]:
    """The graphs the nearest upstream ``pack target: onnx`` stage wrote: ``{"onnx": model.onnx}``,
    plus ``"onnx_int8"`` where it also wrote ONNX Runtime's int8 model; {} when there is none."""
    for name, report in parent_reports.items():
        onnx = report.get("onnx") if isinstance(report, dict) else None
        if not (isinstance(onnx, dict) and isinstance(onnx.get("path"), str) and name in upstream_dirs):
            continue
        graphs = {"onnx": onnx["path"]}
        if isinstance(onnx.get("int8"), dict) and isinstance(onnx["int8"].get("path"), str):
            graphs["onnx_int8"] = onnx["int8"]["path"]
        found = {k: Path(upstream_dirs[name]) / v for k, v in graphs.items()}
        return {k: v for k, v in found.items() if v.is_file()}
    return {}


class OrtClassifier(nn.Module):
    """An ONNX Runtime session called like the torch classifier (``model(**batch)["logits"]``), so the
    training loop's ``evaluate`` scores the graph itself on the dev split."""

    def __init__(self, session: Any):
        super().__init__()
        self.session = session
        self.register_buffer("_device", torch.zeros(0))  # where batches go: the CPU

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": run_session(self.session, batch)}


def onnx_metrics(ctx: Any, *, batches: list[dict[str, torch.Tensor]] | None = None, threads: int | None = None,
                 repeats: int = 3, eval_loader: Any = None) -> dict[str, Any]:
    """For each graph an upstream ``pack target: onnx`` wrote (``ctx``: a ``PassContext``): with
    ``batches``, ONNX Runtime's latency on them (the torch timing's; ``ort_latency_*`` for
    ``model.onnx``, ``ort_int8_latency_*`` for ONNX Runtime's int8 model); with ``eval_loader``, the
    task metrics of the graph itself (``ort_accuracy``, ``ort_int8_accuracy``, ...). {} when there is none."""
    from stackcomp.train import evaluate

    graphs = upstream_onnx(ctx.parent_reports, ctx.upstream_dirs)
    out: dict[str, Any] = {}
    for kind, path in graphs.items():
        prefix = "ort" if kind == "onnx" else "ort_int8"
        session = ort_session(path, threads)  # one load of the graph for the timing and the scoring
        if batches is not None:
            ctx.log.info("timing ONNX Runtime on %s (%s threads)", path, threads)
            timing = measure_ort_latency(session, batches, repeats=repeats)
            out.update({k.replace("ort_", f"{prefix}_", 1): v for k, v in timing.items()})
        if eval_loader is not None:
            ctx.log.info("scoring %s in ONNX Runtime on the dev split", path)
            scores = evaluate(OrtClassifier(session), eval_loader, ctx.data.compute_metrics)
            out.update({f"{prefix}_{k}": v for k, v in scores.items() if k != "eval_loss"})
    return out
