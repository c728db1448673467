"""``int8``: int8 weights (per-row scales) for linears and for the dense parts of factorized layers.

Each targeted module becomes its int8 form (:mod:`stackcomp.nn.quantized`): ``nn.Linear`` ->
``Int8Linear``, ``DSLinear`` -> ``Int8DSLinear`` (dictionary per atom, code values per output
row), ``LowRankLinear`` -> ``Int8LowRankLinear`` (both factors). Other compressed layers have no
int8 form yet and are left as they are (listed in the report). ``backend`` picks who runs the
int8 arithmetic: ``bitsandbytes`` or ``torch`` (PyTorch's dynamic int8 linear, faster on CPU:
fbgemm, and oneDNN's AMX kernel for calls of many tokens where the CPU has AMX; the same numbers
either way, see ``stackcomp.nn.quantized.ONEDNN_MIN_WORK``), ``intmm`` or ``kernel`` (8-bit
activations per row, on ``torch._int_mm`` or on stackcomp's compiled CPU kernel).

``embeddings: true`` (or ``"int8"``) also turns the model's ``nn.Embedding`` tables (word,
position, token type) into ``Int8Embedding`` (per-row scales): for a small model they are most of
the bytes (MiniLM: 47 of 91 MB). ``embeddings: "int4"`` makes them ``Int4Embedding`` instead:
4-bit codes with an fp16 scale and offset per ``embedding_group_size`` entries of a row, about
4.5 bits per entry at 64 against int8's 8.1 (384-wide rows), at a larger error (MiniLM's word
table: relative error 0.090 with the default ``embedding_fit: minmax``, 0.081 with ``mse``
(least squares, clipping outliers; not yet measured on accuracy), against int8's 0.0073; the
report gives it per table). They are chosen apart from ``targets`` (whose default leaves
embeddings out); an explicit ``ignore`` still applies. A table tied to another weight (an LM
head) is left as it is. ``embedding_group_size`` and ``embedding_fit`` enter the stage key only
with ``"int4"`` (where they matter), and the default ``minmax`` never, so older stages keep their keys.

``fp16_targets`` (module patterns) stores the named ``nn.Linear`` layers with float16 weights instead
(:class:`~stackcomp.nn.half.HalfLinear`): half their fp32 bytes at a far smaller error than int8's,
for a layer where int8 costs more accuracy than its bytes are worth (a classifier's pooler, which the
default ``ignore`` leaves fp32). A layer may not be both an int8 and an fp16 target.

Which layers have an int8 form is the ``"int8"`` conversion registry's answer
(:mod:`stackcomp.nn.conversions`): a plugin layer joins by registering one; a targeted compressed
layer without one is listed under ``skipped``.

``analyze`` quantizes every layer (handed to ``transform`` in ``Analysis.state``) and reports per layer the relative
error of the weight and of the layer's output on real activations (one calibration batch when
the recipe has a task, Gaussian inputs otherwise), with the bytes before and after.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer
from torch import nn

from stackcomp.errors import PlanError
from stackcomp.factorize.budget import tensor_bytes
from stackcomp.nn.base import CompressedLayer
from stackcomp.nn.conversions import Int8Config, Keep, convert, convertible_types, find_conversion, layer_storage
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.nn.half import HalfLinear
from stackcomp.nn.quantized import Int4Embedding, Int8Embedding, QuantizationError, get_backend
from stackcomp.passes.base import KEY_OMIT_DEFAULT, Analysis, Pass, PassContext, PassParams, as_analysis
from stackcomp.targets import matches, select_modules, set_module, why_none_selected


class Int8Params(PassParams):
    backend: Literal["bitsandbytes", "torch", "intmm", "kernel"] = Field(
        default="bitsandbytes", description="who runs the int8 arithmetic: bitsandbytes (CPU, CUDA), torch (CPU: "
        "fbgemm, 7-bit per-tensor activations; large calls on oneDNN's AMX kernel where the CPU has AMX, "
        "same arithmetic), intmm (CPU: torch._int_mm, 8-bit per-row activations) or kernel (CPU: intmm's "
        "arithmetic in stackcomp's compiled kernel, AVX-512 VNNI or AMX)")
    targets: list[str] | None = Field(default=None,
                                      description="module globs / re: patterns (default: encoder linears); [] "
                                                  "quantizes no linear, only the tables (with embeddings)")
    ignore: list[str] | None = Field(default=None, description="patterns left as they are (default: heads, embeddings)")
    embeddings: bool | Literal["int8", "int4"] = Field(
        default=False, description="also quantize the nn.Embedding tables (word, position, token type): true or "
                                   "int8 (per-row scales), int4 (4-bit codes, fp16 scale + offset per group)")
    embedding_group_size: int = Field(default=64, ge=1, description="int4 embeddings: entries of a row sharing one "
                                                                    "scale and offset (must divide the row length)")
    embedding_fit: Literal["minmax", "mse"] = Field(
        default="minmax", description="int4 embeddings: how a group's scale and offset are fitted: mse (least squared "
                                   "error, clipping outliers) or minmax (the group's full range)")
    fp16_targets: list[str] | None = Field(
        default=None, description="module patterns whose nn.Linear weights are stored in float16 instead "
        "(HalfLinear): layers where int8 costs more accuracy than their bytes are worth, e.g. a pooler",
        json_schema_extra=KEY_OMIT_DEFAULT)
    error_tokens: int = Field(default=256, ge=1, description="tokens per layer used to measure the output error")
    calibration_sequences: int = Field(default=8, ge=1, description="sequences run to capture real activations")
    seed: int = Field(default=0, ge=0, lt=2**32, description="seed of the calibration picks (0 to 2**32-1)")

    @property
    def embedding_format(self) -> str | None:
        """None (tables kept), "int8" or "int4"."""
        if self.embeddings is False:
            return None
        return "int8" if self.embeddings is True else self.embeddings

    def conversion_config(self) -> Int8Config:
        """What the registered int8 conversions are told."""
        return Int8Config(backend=self.backend, embedding_format=self.embedding_format or "int8",
                          embedding_group_size=self.embedding_group_size, embedding_fit=self.embedding_fit)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict:
        # the group size and fit only shape int4 tables: elsewhere they stay out of the dump (and the stage
        # key); so does the default fit "minmax", which every int4 stage used before "mse" came
        data = handler(self)
        if self.embedding_format != "int4":
            data.pop("embedding_group_size", None)
        if self.embedding_format != "int4" or self.embedding_fit == "minmax":
            data.pop("embedding_fit", None)
        if self.fp16_targets is None:  # added later: unset, stages keep their dumps and keys
            data.pop("fp16_targets", None)
        return data


def quantize_module(module: nn.Module, backend: str) -> nn.Module:
    """The int8 form of one module, by its registered ``"int8"`` conversion."""
    q = convert("int8", module, Int8Config(backend=backend))
    if not isinstance(q, nn.Module):
        why = q.reason if isinstance(q, Keep) else "no int8 form"
        raise QuantizationError(f"int8: {type(module).__name__}: {why}")
    return q


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    d = float(b.norm())
    return float((a - b).norm()) / d if d > 0 else float((a - b).norm())


class Int8Pass(Pass):
    """int8 weights with per-row scales (bitsandbytes or torch) for linears, DS and low-rank layers; embeddings too."""

    name = "int8"
    version = "1"
    Params = Int8Params
    forbid_after = {"int8": "the model is already int8; quantize once"}

    def _layers(self, model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str]]:
        """Targeted layers with an int8 conversion, and targeted compressed layers without one."""
        p = self.params
        if p.targets == []:  # the tables only (checked against `embeddings` in analyze)
            return [], []
        candidates = tuple(t for t in convertible_types("int8") if not issubclass(t, nn.Embedding))
        chosen = [(n, m) for n, m in select_modules(model, p.targets, p.ignore, types=candidates + (CompressedLayer,))
                  if not _is_table(m)]
        layers = [(n, m) for n, m in chosen if find_conversion("int8", m) is not None]
        skipped = [f"{n} ({type(m).__name__}: no int8 form)" for n, m in chosen if find_conversion("int8", m) is None]
        if not layers:
            raise PlanError("int8: no linear, DS or low-rank layer matches "
                            f"{why_none_selected(model, p.targets, p.ignore)}")
        stf = [n for n, m in layers if getattr(m, "stf", False)]
        if stf:
            raise QuantizationError(f"int8: DS layer {stf[0]} is still in STF training mode; quantize the frozen "
                                    "factors (ds_factorize freezes them at its end)")
        return layers, skipped

    def _halves(self, model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Linear]]:
        """The ``nn.Linear`` modules ``fp16_targets`` names (none of them also an int8 target)."""
        p = self.params
        if not p.fp16_targets:
            return []
        halves = list(select_modules(model, p.fp16_targets, [], types=(nn.Linear,)))
        if not halves:
            raise PlanError(f"int8: fp16_targets {p.fp16_targets} match no nn.Linear of the model")
        both = sorted({n for n, _ in halves} & {n for n, _ in layers})
        if both:
            raise PlanError(f"int8: {both[0]} is both an int8 target and an fp16 target; add it to `ignore` or "
                            "drop it from fp16_targets")
        return halves

    def _embeddings(self, model: nn.Module, ctx: PassContext) -> tuple[list[tuple[str, nn.Embedding]], list[str]]:
        """The embedding tables to quantize, and those left as they are: tied to another weight, or
        never looked up by token id in a forward (their ``.weight`` is read directly, as DeBERTa's
        relative position table is, and an int8 table there would be read as raw codes)."""
        if self.params.embedding_format is None:
            return [], []
        ignore = self.params.ignore or ()
        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.Embedding) and not any(matches(n, pat) for pat in ignore)]
        if not found:
            raise PlanError(f"int8: embeddings: {self.params.embeddings}, but the model has no nn.Embedding outside "
                            f"ignore={ignore}")
        owners: dict[int, list[str]] = {}
        for pname, t in model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(t), []).append(pname)
        looked_up = _tables_looked_up(model, found, self._probe_batch(model, ctx))
        chosen, skipped = [], []
        for n, m in found:
            others = [o for o in owners.get(id(m.weight), []) if o != f"{n}.weight"]
            if others:
                skipped.append(f"{n} (Embedding: weight tied to {others[0]})")
            elif n not in looked_up:
                skipped.append(f"{n} (Embedding: never looked up by id in a forward, its weight is read directly; "
                               "kept as it is)")
            else:
                chosen.append((n, m))
        return chosen, skipped

    def _probe_batch(self, model: nn.Module, ctx: PassContext) -> dict[str, torch.Tensor]:
        """One batch to watch a forward with: the task's calibration sequences, else random token ids."""
        p = self.params
        if ctx.data is not None:
            batch = ctx.data.calibration_batches(p.calibration_sequences, p.calibration_sequences, seed=p.seed)[0]
            return {k: v for k, v in batch.items() if k != "labels"}
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000))
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(p.seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _inputs(self, model: nn.Module, layers: list[tuple[str, nn.Module]],
                ctx: PassContext) -> dict[str, torch.Tensor]:
        """Up to ``error_tokens`` real input rows per layer from one calibration batch (empty if no task)."""
        if ctx.data is None:
            return {}
        p = self.params
        captured: dict[str, torch.Tensor] = {}

        def hook(name):
            def grab(_m, args):
                if name not in captured:
                    x = args[0].detach()
                    captured[name] = x.reshape(-1, x.shape[-1])[: p.error_tokens].float().cpu()
            return grab

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
        try:
            batch = ctx.data.calibration_batches(p.calibration_sequences, p.calibration_sequences, seed=p.seed)[0]
            dev = next(model.parameters()).device
            with torch.no_grad():
                model(**{k: v.to(dev) for k, v in batch.items() if k != "labels"})
        finally:
            for h in handles:
                h.remove()
        return captured

    def analyze(self, model: nn.Module, ctx: PassContext) -> Analysis:
        p = self.params
        backend = get_backend(p.backend)
        ok, why = backend.available(torch.device("cpu"))
        if not ok and p.backend == "bitsandbytes":
            raise QuantizationError(f"int8: backend bitsandbytes is not usable here: {why}")
        dev_ok, dev_why = backend.available(ctx.device)
        layers, skipped = self._layers(model)
        if not layers and p.embedding_format is None and not p.fp16_targets:
            raise PlanError("int8: targets: [] quantizes no linear; set embeddings: int8 or int4 to quantize only "
                            "the embedding tables")
        halves = self._halves(model, layers)
        embeddings, tied = self._embeddings(model, ctx)
        skipped += tied
        inputs = self._inputs(model, layers, ctx)
        gen = torch.Generator().manual_seed(p.seed)
        config = p.conversion_config()
        quantized: dict[str, nn.Module] = {}
        rows = {}
        with ctx.progress.bar("int8", total=len(layers) + len(embeddings)) as bar:
            for name, module in layers:
                q = convert("int8", module, config)
                if not isinstance(q, nn.Module):  # the conversion declined this one
                    skipped.append(f"{name} ({type(module).__name__}: {q.reason if q is not None else 'no int8 form'})")
                    bar.advance()
                    continue
                quantized[name] = q
                x = inputs.get(name)
                if x is None:
                    x = torch.randn(p.error_tokens, module.in_features, generator=gen)
                with torch.no_grad():
                    ref = _run(module, x)
                    out = _run(q, x)
                    row = {"type": type(q).__name__, "shape": [module.out_features, module.in_features],
                           "weight_error": _rel(q.to_dense().float().cpu(), _dense_weight(module).cpu()),
                           "output_error": _rel(out, ref),
                           "activations": "calibration" if name in inputs else "gaussian",
                           "bytes_before": _bytes(module), "bytes_after": _bytes(q)}
                    if isinstance(module, DSLinear) and hasattr(q, "dequantized"):
                        d, v, _, _ = q.dequantized()
                        row["dictionary_error"] = _rel(d.cpu(), module.dictionary.detach().float().cpu())
                        row["values_error"] = _rel(v.cpu(), module.values.detach().float().cpu())
                rows[name] = row
                bar.advance()
            if layers and not rows:
                raise PlanError(f"int8: no targeted layer has an int8 form (skipped: {skipped})")
            half_rows = {}
            for name, module in halves:
                quantized[name] = HalfLinear.from_linear(module)
                half_rows[name] = {"type": "HalfLinear", "shape": [module.out_features, module.in_features],
                                   "weight_error": _rel(quantized[name].to_dense().cpu(), module.weight.detach().cpu()),
                                   "bytes_before": _bytes(module), "bytes_after": _bytes(quantized[name])}
            emb_rows = {}
            for name, module in embeddings:
                q = _quantize_table(module, config, name)
                quantized[name] = q
                emb_rows[name] = _embedding_row(module, q)
                bar.advance()
        errs = sorted(r["output_error"] for r in rows.values())
        before = sum(r["bytes_before"] for r in rows.values())
        after = sum(r["bytes_after"] for r in rows.values())
        report = {
            "backend": p.backend, "layers": rows, "skipped": skipped,
            "median_output_error": errs[len(errs) // 2] if errs else None, "max_output_error": max(errs, default=None),
            "worst_layer": max(rows, key=lambda n: rows[n]["output_error"]) if rows else None,
            "bytes_before": before, "bytes_after": after, "ratio": before / after if after else None,
        }
        if half_rows:
            report["fp16_layers"] = half_rows
        if p.embedding_format is not None:
            report["embedding_format"] = p.embedding_format
            if p.embedding_format == "int4":
                report["embedding_group_size"] = p.embedding_group_size
                report["embedding_fit"] = p.embedding_fit
            eb = sum(r["bytes_before"] for r in emb_rows.values())
            ea = sum(r["bytes_after"] for r in emb_rows.values())
            report["embeddings"] = emb_rows
            report["embedding_bytes_before"], report["embedding_bytes_after"] = eb, ea
            if emb_rows:
                report["embedding_max_weight_error"] = max(r["weight_error"] for r in emb_rows.values())
        if not dev_ok:
            report["warning"] = f"backend {p.backend} cannot run on {ctx.device} ({dev_why}): layers compute with " \
                                "their dequantized weights there"
            ctx.log.warning("%s", report["warning"])
        return Analysis(report=report, state={"quantized": quantized})

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        state = ctx.analysis.state
        if "quantized" not in state:  # called without the engine's analyze (scripts, benches)
            state = as_analysis(self.analyze(model, ctx)).state
        quantized = state["quantized"]
        for name, q in quantized.items():
            set_module(model, name, q.to(ctx.device))
        ctx.report["quantized_layers"] = len(quantized)
        ctx.report["backend"] = self.params.backend
        return model


def quantize_embedding(module: nn.Embedding, fmt: str, group_size: int = 64,
                       name: str = "embedding", fit: str = "minmax") -> Int8Embedding | Int4Embedding:
    """The ``fmt`` ("int8" or "int4") form of one table; a group size that does not fit names the table."""
    return _quantize_table(module, Int8Config(embedding_format=fmt, embedding_group_size=group_size,
                                              embedding_fit=fit), name)


def _quantize_table(module: nn.Embedding, config: Int8Config, name: str) -> nn.Module:
    try:
        q = convert("int8", module, config)
    except QuantizationError as e:
        if config.embedding_format == "int8":
            raise
        raise QuantizationError(f"int8: embedding {name} ({module.num_embeddings} x {module.embedding_dim}), "
                                f"embedding_group_size={config.embedding_group_size}: {e}") from None
    if not isinstance(q, nn.Module):
        raise QuantizationError(f"int8: embedding {name}: {q.reason if q is not None else 'no int8 form'}")
    return q


def _tables_looked_up(model: nn.Module, tables: list[tuple[str, nn.Embedding]],
                      batch: dict[str, torch.Tensor]) -> set[str]:
    """Names of the ``tables`` whose forward (a lookup by id) runs in one forward of ``model`` on ``batch``."""
    called: set[str] = set()
    handles = [m.register_forward_hook(lambda *_a, n=n: called.add(n)) for n, m in tables]
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(**{k: v.to(dev) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
    return called


def _is_table(module: nn.Module) -> bool:
    """An embedding table (or its quantized form): chosen by ``embeddings``, not by ``targets``."""
    return isinstance(module, nn.Embedding) or getattr(module, "replaces", "linear") != "linear"


def _dense_weight(module: nn.Module) -> torch.Tensor:
    to_dense = getattr(module, "to_dense", None)
    return (to_dense() if callable(to_dense) else module.weight).detach().float()


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    dev = next(iter(list(module.parameters()) + list(module.buffers()))).device
    return module(x.to(dev)).float().cpu()


def _embedding_row(module: nn.Embedding, q: Int8Embedding | Int4Embedding) -> dict:
    """Errors of one quantized table: whole-table relative, worst row relative, worst entry in scale steps."""
    with torch.no_grad():
        w = module.weight.detach().float().cpu()
        err = q.to_dense().float().cpu() - w
        norms = w.norm(dim=1)
        row_err = err.norm(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))
        step = q.weight_scale.float().cpu()  # int8: one per row; int4: one per group of a row
        step = step.unsqueeze(1) if step.dim() == 1 else step.repeat_interleave(q.group_size, dim=1)
        steps = (err.abs() / step).amax(dim=1)
    extra = {"group_size": q.group_size} if isinstance(q, Int4Embedding) else {}
    return {"type": type(q).__name__, "shape": [module.num_embeddings, module.embedding_dim], **extra,
            "weight_error": _rel(w + err, w), "max_row_error": float(row_err.max()),
            "max_error_in_steps": float(steps.max()),
            "bytes_before": tensor_bytes(module.weight), "bytes_after": _bytes(q)}


def _bytes(module: nn.Module) -> float:
    st = layer_storage(module)
    return st.bytes if st is not None else tensor_bytes(*module.state_dict(keep_vars=True).values())
