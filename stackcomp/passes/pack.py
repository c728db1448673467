"""``pack``: turn every compressed layer into its inference form and pick its kernel. Must be last.

* ``DSLinear`` / ``Int8DSLinear`` -> ``PackedDSLinear`` in the target's layout (fp32, or int8 for
  int8 DS layers; ``dtype`` overrides), run by the compiled CPU kernel, Triton on CUDA, or the
  torch path where neither is available (the report says which and why).
* Linears whose weight is 2:4 sparse along the input (N:M-pruned) -> ``Sparse24Linear`` on a
  CUDA device with 2:4 support; on CPU they stay dense nn.Linear and the report says so.
* int8 layers, low-rank and other factorized layers already are GEMM forms: kept, listed.
* ``fuse_ffn: true`` (CPU, off by default): each transformer block's FFN whose two linears are
  ``nn.Linear`` or ``Int8Linear`` and whose activation is a GELU becomes one fused int8 op
  (:class:`~stackcomp.nn.fused.FusedInt8FFN`, per-row 8-bit activations); other FFNs stay and the
  report says why. Fusing must not make the outputs (the task's logits, or a bi-encoder's pooled
  embeddings; padded positions left out) worse than the unfused FFNs do, both measured against
  the exact arithmetic of the same int8 weights (``fuse_ffn_tolerance``).
* ``fuse_qkv: true`` (off by default): each attention block whose query, key and value linears are
  ``Int8Linear`` becomes one int8 GEMM over the stacked weights
  (:class:`~stackcomp.nn.fused_qkv.FusedInt8QKV`): the input is quantized once instead of three
  times. The arithmetic is the same, so the outputs must match the unfused model's to
  ``FUSE_QKV_TOLERANCE``.
* ``fuse_norm: true`` (CPU, off by default): each BERT-style block output (``SelfOutput`` /
  ``Output``: ``LayerNorm(dense(h) + input)``) becomes a :class:`~stackcomp.nn.fused_norm.FusedResidualNorm`,
  whose residual add and LayerNorm run as one C++ pass per row; its ``dense`` (int8, a fused FFN) is
  kept. The numbers are the same up to float rounding, which the int8 layers after it may turn into a
  rounding step: the outputs must match the unfused model's to ``FUSE_NORM_TOLERANCE``.
* ``unpad: true`` (CPU, off by default): the encoder runs on each batch's real tokens only, packed
  without padding, and attention runs each sequence at its own length in the C++ kernel
  (:mod:`stackcomp.nn.unpadded`). A model it cannot apply to is a plan-time error naming why. The
  answers must match the padded model's to ``UNPAD_TOLERANCE`` on batches with padding.
* ``native_blocks: true`` (CPU, with ``unpad``, ``fuse_qkv``, ``fuse_norm`` and ``fuse_ffn``; off by
  default): each encoder block whose layers the fusions made int8 kernels runs as one C++ call
  (:mod:`stackcomp.nn.native_blocks`), without the module glue that dominates a single sentence's
  time. Blocks that do not qualify run their modules and the report says why; none qualifying is an
  error. The answers must match the module path's to ``NATIVE_TOLERANCE``, on padded batches and on
  single sequences.

What becomes what is the ``"pack"`` conversion registry's answer (:mod:`stackcomp.nn.conversions`;
the built-in ones are in :mod:`stackcomp.nn.packed`): a plugin layer joins by registering one. A
compressed layer without one is kept and listed. ``analyze`` converts (the new layers reach
``transform`` in ``Analysis.state``); ``transform`` swaps them in.

``target``: ``cpu``, ``cuda``, ``auto`` (cuda if this machine has one), or ``onnx``: pack for CPU,
then export the model through ``torch.onnx`` into the artifact's ``onnx/`` folder (``model.onnx``,
``config.json`` and the tokenizer: what optimum's ``ORTModel`` classes load), optionally with
ONNX Runtime's int8 (``onnx_int8``), and check that ONNX Runtime's logits match the torch model's
(``onnx_tolerance``, relative to max |logit|). int8 layers export as their backend's integer
arithmetic (``MatMulInteger``), DS layers as a weight rebuilt from the factors at session load
(:mod:`stackcomp.onnx_export`); an ``evaluate`` stage after it also times ONNX Runtime.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from stackcomp.errors import PassError, PlanError
from stackcomp.kernels.dispatch import choose_kernel
from stackcomp.nn.base import CompressedLayer
from stackcomp.nn.conversions import Keep, PackConfig, find_conversion
from stackcomp.nn.packed import PackedDSLinear, Sparse24Linear
from stackcomp.passes.base import KEY_OMIT_DEFAULT, Analysis, Pass, PassContext, PassParams, as_analysis
from stackcomp.targets import set_module


class PackParams(PassParams):
    target: Literal["cpu", "cuda", "auto", "onnx"] = Field(default="auto", description="where the model will run")
    dtype: Literal["auto", "fp32", "int8"] = Field(
        default="auto", description="DS values: auto keeps each layer's (int8 after the int8 pass, else fp32)")
    sparse24: bool = Field(default=True, description="use 2:4 semi-structured kernels for 2:4-sparse linears (CUDA)")
    onnx_int8: bool = Field(default=False, description="target onnx: also write ONNX Runtime's dynamic int8 model")
    onnx_tolerance: float = Field(default=1e-3, gt=0, description="target onnx: max |torch - ORT| / max|logit| (fp32)")
    onnx_opset: int = Field(default=18, ge=13)
    parity_sequences: int = Field(default=8, ge=1, description="dev sequences in the parity checks (onnx, fuse_ffn, "
                                  "fuse_qkv, fuse_norm, unpad)")
    fuse_ffn: bool = Field(default=False, description="CPU: fuse each FFN (linear, GELU, linear; nn.Linear or "
                           "Int8Linear) into one int8 kernel call with per-row activation scales",
                           json_schema_extra=KEY_OMIT_DEFAULT)
    fuse_ffn_tolerance: float = Field(default=5e-2, gt=0, description="fuse_ffn: how much larger the fused model's "
                                      "relative output error may be than the unfused one's, both against the exact "
                                      "arithmetic of the int8 weights (logits, or a bi-encoder's embeddings)",
                                      json_schema_extra=KEY_OMIT_DEFAULT)
    fuse_qkv: bool = Field(default=False, description="fuse each attention block's query, key and value Int8Linear "
                           "into one int8 GEMM (the input quantized once)", json_schema_extra=KEY_OMIT_DEFAULT)
    fuse_norm: bool = Field(default=False, description="CPU: run each BERT-style block output's residual add and "
                            "LayerNorm as one kernel pass (its dense layer kept)", json_schema_extra=KEY_OMIT_DEFAULT)
    unpad: bool = Field(default=False, description="CPU: run the encoder on each batch's real tokens only (no "
                        "padding; attention per sequence in the C++ kernel)", json_schema_extra=KEY_OMIT_DEFAULT)
    native_blocks: bool = Field(default=False, description="CPU, with unpad and the fusions: run each fused int8 "
                                "encoder block as one C++ call (no per-module Python)",
                                json_schema_extra=KEY_OMIT_DEFAULT)


#: fuse_qkv computes what the three int8 linears did (the same input rounding): only float summation
#: order may differ, so the outputs must agree to this (relative, Frobenius, over the parity batches)
FUSE_QKV_TOLERANCE = 1e-4
#: fuse_norm computes the same sums in another float order; an int8 layer after it may round a changed
#: value one step the other way, so the bound is looser than fuse_qkv's, and far under what a module
#: that computes something else than LayerNorm(dense(h) + input) gives (order 1)
FUSE_NORM_TOLERANCE = 1e-2
#: unpad computes every real token's answer from the same numbers in another float order (attention
#: sums, and the per-tensor activation scale of torch-backend int8 linears, which no longer sees pad
#: positions): like fuse_norm, an int8 layer may round a changed value one step the other way
UNPAD_TOLERANCE = 2e-2
#: native blocks call the kernels the modules call, in the same order (padded batches: the same answers);
#: without padding the module path runs SDPA where the native block runs the varlen kernel (another float
#: order, which an int8 layer after it may round one step the other way), as unpadding does
NATIVE_TOLERANCE = UNPAD_TOLERANCE


class PackPass(Pass):
    """Pack compressed layers into their inference kernels (CPU C++, Triton, 2:4, or ONNX); must be last."""

    name = "pack"
    version = "1"
    Params = PackParams
    must_be_last = True

    def _layout(self) -> str:
        t = self.params.target
        if t == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cpu" if t == "onnx" else t

    def analyze(self, model: nn.Module, ctx: PassContext) -> Analysis:
        """What is packed, with which kernel, and what stays as it is (and why)."""
        layout = self._layout()
        kernel = choose_kernel(layout)
        why = _kernel_reason(layout, kernel)
        cpu_variant = _cpu_variant(layout, kernel)
        config = PackConfig(layout=layout, dtype=self.params.dtype, kernel=kernel, sparse24=self.params.sparse24)
        plan: dict[str, dict] = {}
        packed: dict[str, nn.Module] = {}
        for name, m in model.named_modules():
            fn = find_conversion("pack", m)
            if fn is None:
                if isinstance(m, CompressedLayer):
                    plan[name] = {"from": type(m).__name__, "to": type(m).__name__,
                                  "kept": "already an inference form (dense GEMMs / int8 backend)"}
                continue
            new = fn(m, config)
            if isinstance(new, Keep):
                plan[name] = {"from": type(m).__name__, "to": type(m).__name__, new.key: new.reason}
            elif new is not None:
                if isinstance(new, PackedDSLinear) and new.meta["target"] == "cpu":
                    new.cpu_variant = cpu_variant  # in its manifest: loading where less runs warns
                packed[name] = new
                plan[name] = {"from": type(m).__name__, "to": type(new).__name__, **_details(new, config)}
        ffn = self._plan_ffn(model, layout, plan) if self.params.fuse_ffn else None
        qkv = self._plan_qkv(model, plan) if self.params.fuse_qkv else None
        norm = self._plan_norm(model, layout, plan) if self.params.fuse_norm else None
        unpad = self._plan_unpad(model, layout) if self.params.unpad else None
        n24_dense = [r["kept_dense"] for r in plan.values() if "kept_dense" in r]
        report = {"target": self.params.target, "layout": layout, "ds_kernel": kernel, "ds_kernel_reason": why,
                  "cpu_variant": cpu_variant, "layers": plan,
                  "packed_ds": sum(1 for r in plan.values() if r["to"] == "PackedDSLinear"),
                  "sparse24": sum(1 for r in plan.values() if r["to"] == "Sparse24Linear"),
                  "sparse24_kept_dense": len(n24_dense)}
        if n24_dense:
            report["sparse24_note"] = f"{len(n24_dense)} 2:4-sparse linear(s) kept dense: {n24_dense[0]}"
            ctx.log.info("%s", report["sparse24_note"])
        state = {"packed": packed}
        for key, fusion, what in (("ffn", ffn, "FFN(s)"), ("qkv", qkv, "attention projection(s)"),
                                  ("norm", norm, "residual add + LayerNorm(s)")):
            if fusion is None:
                continue
            report[f"fuse_{key}"] = fusion["report"]
            report[f"{key}_fused"] = len(fusion["modules"])
            state[key] = fusion["modules"]
            ctx.log.info("fuse_%s: %d %s fused, %d left unfused", key, report[f"{key}_fused"], what,
                         len(fusion["report"]["unfused"]))
        if unpad is not None:
            report["unpad"] = unpad
            state["unpad"] = True
        if self.params.native_blocks:
            self._plan_native(layout)
            state["native_blocks"] = True
        return Analysis(report=report, state=state)

    def _plan_qkv(self, model: nn.Module, plan: dict[str, dict]) -> dict:
        """The attention projections to fuse (their new modules by query name) and the report."""
        from stackcomp.nn.fused_qkv import find_qkvs, fused_qkv_modules

        sites = find_qkvs(model)
        modules: dict[str, dict[str, nn.Module]] = {}
        unfused: dict[str, str] = {}
        for site in sites:
            if site.reason is not None:
                unfused[site.query] = site.reason
                continue
            modules[site.query] = new = fused_qkv_modules(model, site)
            for name, m in new.items():
                plan[name] = {"from": type(model.get_submodule(name)).__name__, "to": type(m).__name__}
        report = {"fused": sorted(modules), "unfused": unfused}
        if not sites:
            report["note"] = "no attention projections of a known structure (query/key/value, q_lin/k_lin/v_lin)"
        return {"modules": modules, "report": report}

    def _not_cpu(self, layout: str, what: str, onnx_why: str) -> str | None:
        """Why a CPU-side fusion does not apply to this pack as a whole (None: it may)."""
        if layout != "cpu":
            return f"{what} runs on CPU; this pack's layout is {layout}"
        if self.params.target == "onnx":
            return f"target onnx: {onnx_why}"
        return None

    def _plan_norm(self, model: nn.Module, layout: str, plan: dict[str, dict]) -> dict:
        """The block outputs whose residual add + LayerNorm to fuse (built in ``transform``, after the
        other fusions, so each keeps its final ``dense``) and the report."""
        from stackcomp.nn.fused_norm import find_residual_norms

        sites = find_residual_norms(model)
        why_not = self._not_cpu(layout, "the fused residual LayerNorm",
                                "the graph keeps LayerNorm as its own op (ONNX Runtime fuses it itself)")
        fuse, unfused = _split_sites(sites, lambda site: site.name, why_not)
        modules: dict[str, dict[str, nn.Module]] = {site.name: {} for site in fuse}  # made in transform
        for site in fuse:
            plan[site.name] = {"from": type(model.get_submodule(site.name)).__name__, "to": "FusedResidualNorm"}
        report = {"fused": sorted(modules), "unfused": unfused}
        if not sites:
            report["note"] = ("no block output of a known structure (a dense and a LayerNorm child, forward(hidden_states, "
                              "input_tensor): BERT, RoBERTa, ELECTRA, XLM-R, DeBERTa-v2)")
        return {"modules": modules, "report": report}

    def _plan_unpad(self, model: nn.Module, layout: str) -> dict:
        """Whether the encoder can run unpadded here: a PlanError naming why not (it was asked for)."""
        from stackcomp.nn.unpadded import unpad_unsupported

        why = self._not_cpu(layout, "unpadding", "the exported graph takes padded batches") or unpad_unsupported(model)
        if why is not None:
            raise PlanError(f"pack unpad: {why}; drop `unpad: true` from this stage")
        return {"attention": "packed sequences, stackcomp's varlen kernel"}

    def _plan_native(self, layout: str) -> None:
        """Native blocks are built from what unpad and the fusions make: a PlanError names what is missing."""
        p = self.params
        why = self._not_cpu(layout, "native blocks", "the exported graph runs ONNX Runtime's own kernels")
        missing = [name for name in ("unpad", "fuse_qkv", "fuse_norm", "fuse_ffn") if not getattr(p, name)]
        if why is None and missing:
            why = (f"native blocks run the fused int8 layers on the unpadded layout; this stage also needs "
                   f"{', '.join(f'`{m}: true`' for m in missing)}")
        if why is not None:
            raise PlanError(f"pack native_blocks: {why}")

    def _plan_ffn(self, model: nn.Module, layout: str, plan: dict[str, dict]) -> dict:
        """The FFNs to fuse (their new modules by site) and the report: fused sites, the rest with why."""
        from stackcomp.kernels import ds_cpu
        from stackcomp.kernels.ffn import ffn_kernel
        from stackcomp.nn.fused import find_ffns, fused_modules

        sites = find_ffns(model)
        why_not = self._not_cpu(layout, "the fused FFN kernel",
                                "the graph keeps the int8 linears (MatMulInteger); the fused op is a torch-side kernel")
        if why_not is None and not ffn_kernel(ds_cpu.get_extension()):
            why_not = ("the loaded C++ kernel has no fused FFN (" + (ds_cpu.build_error() or "built before it existed; "
                       "rebuild: python setup.py build_ext --inplace") + ")")
        elif why_not is None and not ds_cpu.get_extension().ffn_has_vnni():
            why_not = (f"this CPU runs the {ds_cpu.variant()} build: the fused FFN has no AVX-512 VNNI path there "
                       "(its portable loop is slower than the int8 backend)")
        fuse, unfused = _split_sites(sites, lambda site: site.second, why_not)
        modules: dict[str, dict[str, nn.Module]] = {}
        for site in fuse:
            new = fused_modules(model, site)
            modules[site.second] = new
            for name, m in new.items():
                old = model.get_submodule(name)
                plan[name] = {"from": type(old).__name__, "to": type(m).__name__,
                              **({"activation": m.activation, "kernel": "fused_ffn"} if name == site.second else {})}
        report = {"fused": sorted(modules), "unfused": unfused}
        if not sites:
            report["note"] = "no FFN of a known structure (BERT intermediate/output, DistilBERT ffn, ALBERT ffn)"
        return {"modules": modules, "report": report}

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        state = ctx.analysis.state
        if "packed" not in state:  # called without the engine's analyze (scripts, benches)
            state = as_analysis(self.analyze(model, ctx)).state
        for name, new in state["packed"].items():
            set_module(model, name, new)
        model.eval()
        if state.get("ffn"):
            self._fuse_ffn(model, ctx, state["ffn"])
        if state.get("qkv"):
            self._fuse_qkv(model, ctx, state["qkv"])
        if state.get("norm"):
            self._fuse_norm(model, ctx, state["norm"])
        if state.get("unpad"):
            self._unpad(model, ctx)
        if state.get("native_blocks"):
            self._native_blocks(model, ctx)
        if self.params.target == "onnx":
            self._export(model, ctx)
        return model

    def _fuse_ffn(self, model: nn.Module, ctx: PassContext, sites: dict[str, dict[str, nn.Module]]) -> None:
        """Swap the fused FFNs in, checking that fusing does not make the model's outputs (the
        task's logits, or a bi-encoder's embeddings) worse than the FFNs it replaces.

        Both are measured against the exact arithmetic of the fused weights (fp32 sums over the
        same int8 numbers, no activation rounding): the unfused int8 FFNs round their inputs too
        (the torch backend to 7 bits per tensor), so the fused and unfused outputs may differ more
        from each other than either differs from the exact ones. The check fails when the fused
        error exceeds the unfused error by more than ``fuse_ffn_tolerance``."""
        p = self.params
        batches, unfused, answers = self._swap_in(model, ctx, sites)
        fused = [a for a, _ in answers]
        for second, modules in sites.items():  # the exact arithmetic of the same int8 weights
            set_module(model, second, modules[second].dense_module())
        exact = [_outputs(model, b, ctx.task)[0] for b in batches]
        for second, modules in sites.items():
            set_module(model, second, modules[second])
        model.eval()
        err_fused, err_unfused = _rel_error(fused, exact), _rel_error(unfused, exact)
        ctx.report["fuse_ffn_parity"] = {
            "error_fused": err_fused, "error_unfused": err_unfused, "fused_vs_unfused": _rel_error(fused, unfused),
            "tolerance": p.fuse_ffn_tolerance, "batches": len(batches), "ffn_fused": len(sites),
            "compared": answers[0][1]}
        ctx.log.info("fuse_ffn parity (%s, relative error against the exact int8-weight arithmetic): fused %.3g, "
                     "unfused %.3g", answers[0][1], err_fused, err_unfused)
        if not err_fused <= err_unfused + p.fuse_ffn_tolerance:
            raise PassError(f"stage {ctx.stage!r}: with {len(sites)} fused FFN(s) the {answers[0][1]} are off by "
                            f"{err_fused:.3g} (relative) where the unfused FFNs are off by {err_unfused:.3g}, more "
                            f"than fuse_ffn_tolerance {p.fuse_ffn_tolerance} worse")

    def _swap_in(self, model: nn.Module, ctx: PassContext, sites: dict[str, dict[str, nn.Module]]) -> tuple:
        """(parity batches, the outputs before, (outputs, what they are) after) around setting every
        site's new modules into ``model``."""
        batches = _parity_batches(model, ctx, self.params.parity_sequences)
        before = [_outputs(model, b, ctx.task)[0] for b in batches]
        for modules in sites.values():
            for name, new in modules.items():
                set_module(model, name, new)
        model.eval()
        return batches, before, [_outputs(model, b, ctx.task) for b in batches]

    def _fuse_qkv(self, model: nn.Module, ctx: PassContext, sites: dict[str, dict[str, nn.Module]]) -> None:
        """Swap the fused projections in; the outputs must not change (``FUSE_QKV_TOLERANCE``)."""
        batches, unfused, answers = self._swap_in(model, ctx, sites)
        err = _rel_error([a for a, _ in answers], unfused)
        ctx.report["fuse_qkv_parity"] = {"fused_vs_unfused": err, "tolerance": FUSE_QKV_TOLERANCE,
                                         "batches": len(batches), "compared": answers[0][1]}
        if not err <= FUSE_QKV_TOLERANCE:
            raise PassError(f"stage {ctx.stage!r}: with {len(sites)} fused QKV projection(s) the {answers[0][1]} "
                            f"differ from the unfused model's by {err:.3g} (relative; at most {FUSE_QKV_TOLERANCE})")

    def _fuse_norm(self, model: nn.Module, ctx: PassContext, sites: dict[str, dict[str, nn.Module]]) -> None:
        """Swap the fused residual LayerNorms in; the outputs must not change (``FUSE_NORM_TOLERANCE``)."""
        from stackcomp.nn.fused_norm import ResidualNormSite, residual_norm_module

        built = {name: {name: residual_norm_module(model, ResidualNormSite(name, None))} for name in sites}
        batches, unfused, answers = self._swap_in(model, ctx, built)
        err = _rel_error([a for a, _ in answers], unfused)
        ctx.report["fuse_norm_parity"] = {"fused_vs_unfused": err, "tolerance": FUSE_NORM_TOLERANCE,
                                          "batches": len(batches), "compared": answers[0][1]}
        if not err <= FUSE_NORM_TOLERANCE:
            raise PassError(f"stage {ctx.stage!r}: with {len(sites)} fused residual LayerNorm(s) the {answers[0][1]} "
                            f"differ from the unfused model's by {err:.3g} (relative; at most {FUSE_NORM_TOLERANCE}): "
                            f"a block output that does not compute LayerNorm(dense(h) + input)?")

    def _unpad(self, model: nn.Module, ctx: PassContext) -> None:
        """Run the encoder unpadded; on batches with padding, each real token's answers must not change
        (``UNPAD_TOLERANCE``)."""
        from stackcomp.nn.unpadded import apply_unpadding

        batches = [_with_padding(b) for b in _parity_batches(model, ctx, self.params.parity_sequences)]
        padded = [_real_outputs(model, b, ctx.task) for b in batches]
        apply_unpadding(model)
        answers = [_real_outputs(model, b, ctx.task) for b in batches]
        what = answers[0][1]
        err = _rel_error([a for a, _ in answers], [p for p, _ in padded])
        ctx.report["unpad_parity"] = {"unpadded_vs_padded": err, "tolerance": UNPAD_TOLERANCE,
                                      "batches": len(batches), "compared": what,
                                      "real_token_share": _real_share(batches)}
        ctx.log.info("unpad parity (%s): %.3g relative to the padded model's", what, err)
        if not err <= UNPAD_TOLERANCE:
            raise PassError(f"stage {ctx.stage!r}: unpadded, the {what} differ from the padded model's by {err:.3g} "
                            f"(relative; at most {UNPAD_TOLERANCE}): does {type(model).__name__} mix tokens "
                            "outside its attention, or read positions inside its blocks?")

    def _native_blocks(self, model: nn.Module, ctx: PassContext) -> None:
        """Run the qualifying blocks natively; their answers must match the module path's
        (``NATIVE_TOLERANCE``) on padded batches and on single sequences."""
        from stackcomp.nn.native_blocks import apply_native_blocks, native_blocks_report, native_model_report

        blocks = native_blocks_report(model)
        why_not = {name: why for name, why in blocks.items() if why is not None}
        if len(why_not) == len(blocks):
            first = next(iter(why_not.items()), ("the model", "it has no stack of transformer blocks"))
            raise PassError(f"stage {ctx.stage!r}: native_blocks: no block can run natively ({first[0]}: {first[1]})")
        batches = [_with_padding(b) for b in _parity_batches(model, ctx, self.params.parity_sequences)]
        batches += [_first_sequence(b) for b in batches]  # single sentences: what native blocks are for
        modules = [_real_outputs(model, b, ctx.task) for b in batches]
        native = apply_native_blocks(model)
        answers = [_real_outputs(model, b, ctx.task) for b in batches]
        what = answers[0][1]
        err = _rel_error([a for a, _ in answers], [m for m, _ in modules])
        whole = native_model_report(model)
        ctx.report["native_blocks"] = {"native": native, "not_native": why_not,
                                       "whole_model": "embeddings and blocks in one call" if whole is None else whole}
        ctx.report["native_parity"] = {"native_vs_modules": err, "tolerance": NATIVE_TOLERANCE,
                                       "batches": len(batches), "compared": what}
        ctx.log.info("native blocks: %d of %d; parity (%s) %.3g relative to the module path", len(native),
                     len(native) + len(why_not), what, err)
        if not err <= NATIVE_TOLERANCE:
            raise PassError(f"stage {ctx.stage!r}: with native blocks the {what} differ from the module path's by "
                            f"{err:.3g} (relative; at most {NATIVE_TOLERANCE})")

    def _export(self, model: nn.Module, ctx: PassContext) -> None:
        from stackcomp.onnx_export import (
            OnnxError,
            export_onnx,
            graph_summary,
            ort_session,
            parity,
            quantize_onnx_int8,
            write_onnx_folder,
        )

        p = self.params
        batches = _parity_batches(model, ctx, p.parity_sequences)
        device = next(iter(list(model.parameters()) + list(model.buffers()))).device
        path = export_onnx(model, ctx.work_dir / "onnx" / "model.onnx", batches[0], opset=p.onnx_opset)
        write_onnx_folder(path.parent, model, ctx.tokenizer)
        check = parity(model, ort_session(path), batches)
        ctx.report["onnx"] = {"path": "onnx/model.onnx", "opset": p.onnx_opset, "parity": check,
                              "tolerance": p.onnx_tolerance, **graph_summary(path)}
        ctx.log.info("ONNX parity: max |diff| %.3g (%.3g of max |logit|)", check["max_abs_diff"], check["max_rel_diff"])
        if check["max_rel_diff"] > p.onnx_tolerance:
            raise OnnxError(f"stage {ctx.stage!r}: ONNX Runtime's logits differ from the torch model's by "
                            f"{check['max_rel_diff']:.3g} of max |logit| (onnx_tolerance {p.onnx_tolerance})")
        if p.onnx_int8:
            qpath, fp32_nodes = quantize_onnx_int8(path, ctx.work_dir / "onnx" / "model.int8.onnx")
            ctx.report["onnx"]["int8"] = {"path": "onnx/model.int8.onnx", "nodes_left_fp32": len(fp32_nodes),
                                          "parity": parity(model, ort_session(qpath), batches)}
        model.to(device)


def _split_sites(sites: list, name_of, why_not: str | None) -> tuple[list, dict[str, str]]:
    """The fusable sites, and name -> reason for the others (their own reason, else the pack-wide one)."""
    fuse, unfused = [], {}
    for site in sites:
        reason = site.reason or why_not
        if reason is None:
            fuse.append(site)
        else:
            unfused[name_of(site)] = reason
    return fuse, unfused


def _details(new: nn.Module, config: PackConfig) -> dict:
    """What the report says about a built-in packed form besides from/to."""
    if isinstance(new, PackedDSLinear):
        details = {"dtype": new.meta["dtype"], "layout": new.meta["target"], "kernel": config.kernel}
        if new.cpu_variant is not None:
            details["cpu_variant"] = new.cpu_variant
        return details
    if isinstance(new, Sparse24Linear):
        return {"kernel": "semi_structured_24"}
    return {}


def _cpu_variant(layout: str, kernel: str) -> str | None:
    """The ISA variant of the compiled CPU kernel the packed layers run here (None: not that kernel)."""
    if layout != "cpu" or kernel != "cpu":
        return None
    from stackcomp.kernels import ds_cpu

    return ds_cpu.variant()


def _kernel_reason(layout: str, kernel: str) -> str:
    if layout == "cpu":
        from stackcomp.kernels import ds_cpu

        if kernel == "cpu":
            vnni8 = ds_cpu.build_int8_kernel(ds_cpu.get_extension()) == "vnni8"
            int8 = "vnni8 (8-bit activations, AVX-512 VBMI + VNNI)" if vnni8 else "q15 (16-bit activations)"
            return (f"compiled C++ kernel (ds_cpu.cpp), its {ds_cpu.variant()} build (the best this CPU runs); "
                    f"int8 layers above {ds_cpu.SMALL_MAX_TOKENS} tokens: {int8}")

        return f"torch path: the C++ kernel is unavailable ({ds_cpu.build_error() or 'not built'})"
    if kernel == "triton":
        return "Triton kernels (CUDA)"
    return "torch path: Triton is not available here (no CUDA device or triton not installed)"


def _rel_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """The largest relative (Frobenius) error of ``got`` against ``ref`` over the batches."""
    return max(float((g - r).norm() / r.norm().clamp(min=1e-12)) for g, r in zip(got, ref))


@torch.no_grad()
def _outputs(model: nn.Module, batch: dict[str, torch.Tensor], task: Any = None) -> tuple[torch.Tensor, str]:
    """(what the model answers with, its name): the task's logits (padded positions left out),
    or a bi-encoder's pooled embeddings; without a task, the logits or first output."""
    device = next(iter(list(model.parameters()) + list(model.buffers()))).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if task is not None:
        out = task.kd_outputs(model, batch)
        for name in ("logits", "embeddings"):
            if out.get(name) is not None:
                return out[name].float().cpu(), name
    out = model(**batch)
    return (out.logits.float().cpu(), "logits") if hasattr(out, "logits") else (out[0].float().cpu(), "first output")


def _with_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` if its attention mask has padding, else a copy whose rows after the first lose their last
    tokens (at least one kept): unpad's parity must see padded rows."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[0] < 2 or not bool(mask.all()):
        return batch
    mask = mask.clone()
    width = mask.shape[1]
    for row in range(1, mask.shape[0]):
        mask[row, max(1, width - row * max(1, width // (2 * mask.shape[0]))):] = 0
    return {**batch, "attention_mask": mask}


def _first_sequence(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's first row alone, its padding dropped (a batch of one as a single sentence comes)."""
    mask = batch.get("attention_mask")
    keep = mask[0].bool() if mask is not None and mask.dim() == 2 else None
    return {k: (v[:1][:, keep] if keep is not None and v.dim() == 2 and v.shape[1] == keep.numel() else v[:1])
            for k, v in batch.items()}


def _real_share(batches: list[dict[str, torch.Tensor]]) -> float:
    masks = [b["attention_mask"] for b in batches if b.get("attention_mask") is not None]
    return float(sum(int(m.sum()) for m in masks) / max(1, sum(m.numel() for m in masks)))


def _real_outputs(model: nn.Module, batch: dict[str, torch.Tensor], task: Any = None) -> tuple[torch.Tensor, str]:
    """:func:`_outputs` with per-token answers (batch, length, ...) kept at real tokens only."""
    out, what = _outputs(model, batch, task)
    mask = batch.get("attention_mask")
    if mask is not None and out.dim() >= 3 and tuple(out.shape[:2]) == tuple(mask.shape):
        out = out[mask.bool().cpu()]
    return out, what


def _parity_batches(model: nn.Module, ctx: PassContext, n: int) -> list[dict[str, torch.Tensor]]:
    """Dev batches from the task (two of different shapes), else random token ids."""
    if ctx.data is not None:
        b = ctx.data.calibration_batches(n, max(1, n // 2), seed=ctx.seed)
        return [{k: v for k, v in x.items() if k != "labels"} for x in b[:2]]
    g = torch.Generator().manual_seed(ctx.seed)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000))
    out = []
    for bs, t in ((2, 11), (3, 7)):
        ids = torch.randint(0, vocab, (bs, t), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
