"""Measuring a model: exact size accounting and CPU latency.

Sizes count every stored tensor once (shared weights, like ALBERT's layer or tied
embeddings, count once) at its real width. A layer's exact storage comes from
:func:`stackcomp.nn.conversions.layer_storage` (``nn.Linear``; compressed layers answer with their
``storage()``; a plugin may register a class it does not own), so that e.g. uint8 indices count
one byte and a plugin layer counts at the bytes it declares. Layers that stand in for an
embedding (``replaces != "linear"``, e.g. ``Int8Embedding``) count at their exact storage in the
whole model, not among the linears. Byte formulas: :mod:`stackcomp.factorize.budget`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from stackcomp.factorize.budget import FP32_BYTES, tensor_bytes
from stackcomp.nn.base import CompressedLayer, LayerStorage
from stackcomp.nn.conversions import layer_storage


def linear_storage(module: nn.Module) -> LayerStorage | None:
    """Exact storage of a linear-like module, or None if it is not one."""
    if getattr(module, "replaces", "linear") != "linear":
        return None
    st = layer_storage(module)
    if st is not None:
        return st
    storage = getattr(module, "storage", None)  # e.g. quantized layers that report themselves
    if callable(storage):
        result = storage()
        if isinstance(result, LayerStorage):
            return result
    return None


def size_report(model: nn.Module) -> dict[str, Any]:
    """Parameters and bytes: linear layers, whole model, and their dense fp32 equivalents."""
    lin_params = lin_bytes = lin_dense_params = lin_dense_bytes = 0.0
    other_params = other_bytes = other_dense_bytes = 0.0
    counted: set[int] = set()
    n_layers = 0
    for _, module in model.named_modules():
        if isinstance(module, CompressedLayer) and module.replaces != "linear":
            # e.g. int8 embeddings: exact storage (int8 tables are not floating buffers), not a linear
            st = layer_storage(module)
            other_params += st.params
            other_bytes += st.bytes
            other_dense_bytes += st.dense_bytes
            counted.update(id(t) for t in list(module.parameters()) + list(module.buffers()))
            continue
        st = linear_storage(module)
        if st is None:
            continue
        n_layers += 1
        lin_params += st.params
        lin_bytes += st.bytes
        lin_dense_params += st.dense_params
        lin_dense_bytes += st.dense_bytes
        counted.update(id(t) for t in list(module.parameters()) + list(module.buffers()))
    seen: set[int] = set()
    params = list(model.parameters())
    # integer buffers outside compressed layers are index helpers (position_ids), not weights
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    for t in params + buffers:
        if id(t) in counted or id(t) in seen:
            continue
        seen.add(id(t))
        other_params += t.numel()
        other_bytes += tensor_bytes(t)
        other_dense_bytes += t.numel() * FP32_BYTES  # fp32 reference for the rest
    total_bytes = lin_bytes + other_bytes
    dense_total = lin_dense_bytes + other_dense_bytes
    return {
        "linear_layers": n_layers,
        "linear_params": int(lin_params),
        "linear_bytes": int(round(lin_bytes)),
        "linear_dense_params": int(lin_dense_params),
        "linear_dense_bytes": int(round(lin_dense_bytes)),
        "linear_ratio_bytes": lin_dense_bytes / lin_bytes if lin_bytes else None,
        "linear_ratio_params": lin_dense_params / lin_params if lin_params else None,
        "model_params": int(lin_params + other_params),
        "model_bytes": int(round(total_bytes)),
        "model_dense_bytes": int(round(dense_total)),
        "model_ratio_bytes": dense_total / total_bytes if total_bytes else None,
    }


def unpacked_ds_layers(model: nn.Module) -> list[str]:
    """DS layers (fp32 or int8) that ``pack`` has not turned into kernels: their forward is the
    per-block reference product, slower than the ``nn.Linear`` it replaced, so a latency measured
    on them says little about the packed stack."""
    from stackcomp.nn.ds_linear import DSLinear
    from stackcomp.nn.quantized import Int8DSLinear

    return [name for name, m in model.named_modules() if isinstance(m, (DSLinear, Int8DSLinear))]


@torch.inference_mode()
def measure_latency(model: nn.Module, batches: list[dict[str, torch.Tensor]], *, warmup: int = 2,
                    repeats: int = 3) -> dict[str, float]:
    """Median wall time per batch over ``repeats`` passes through ``batches``, after warmup."""
    model.eval()
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    for b in inputs[: max(1, warmup)]:
        model(**b)
    per_batch: list[float] = []
    for _ in range(repeats):
        for b in inputs:
            t0 = time.perf_counter()
            model(**b)
            per_batch.append(time.perf_counter() - t0)
    n_seq = sum(int(b["input_ids"].shape[0]) for b in inputs) / max(1, len(inputs))
    med = statistics.median(per_batch)
    return {
        "latency_ms_per_batch": med * 1e3,
        "latency_ms_per_sequence": med * 1e3 / n_seq,
        "latency_batch_size": n_seq,
        "latency_batches": len(inputs),
        "latency_threads": torch.get_num_threads(),
    }
