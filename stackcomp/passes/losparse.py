"""``losparse``: LoSparse (Li et al., ICML 2023), ``W = U V + S`` with ``S`` pruned by whole rows.

Each targeted linear becomes a :class:`SparseLowRankLinear` initialised from a truncated SVD
(``U V``, singular values split evenly) plus the dense residual ``S = W - U V``, so the model
starts exactly where it was. During the fine-tune (``train``) rows of ``S`` are pruned by
PLATON importance (``|s * grad|`` averaged over windows of ``delta_t`` steps, EMA ``beta1``,
uncertainty with ``beta2 < 1``), scored per row (mean), ranked over all layers together
(``scope: global``, the paper's) on the cubic schedule from keeping everything to the final
fraction: nothing is pruned during the first ``prune_warmup`` of the steps, every step masks
during the last ``prune_final``. At the end only the kept rows are stored
(:meth:`SparseLowRankLinear.prune_rows`), so inference runs ``U V`` plus the kept rows.

Size: native ``low_rank_ratio`` (the low-rank part holds that fraction of the layer's dense
parameters, the authors' ``low_rank_parameter_ratio``) and ``sparse_ratio`` (fraction of the
entries of ``S`` kept, the authors' ``final_threshold``); or ``ratio``: ``rank_share`` of the
byte budget goes to the low-rank parts (the authors' 0.05 of 0.20 is 0.25), the rest to rows of
``S`` at their exact bytes (values and row indices), so the pruned layers meet the budget.
Without training, rows are kept by the magnitude of ``S`` (no gradients to score them with).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from stackcomp.errors import FactorizeError
from stackcomp.factorize.allocate import Knob, allocate
from stackcomp.factorize.budget import sparse_row_bytes
from stackcomp.factorize.losparse import Importance, KeepSchedule, losparse_init, losparse_rank, row_scores, select_rows
from stackcomp.nn.lowrank import SparseLowRankLinear
from stackcomp.passes.base import PassContext
from stackcomp.passes.factorizer_common import (
    Built,
    FactorizerParams,
    FactorizerPass,
    FactorizerWork,
    LayerStats,
    _need_exactly_one,
    dense_bytes_of,
    relative_errors,
)
from stackcomp.passes.lowrank import lowrank_cost
from stackcomp.targets import set_module
from stackcomp.train import train_on_task, training_batches


class LoSparseParams(FactorizerParams):
    low_rank_ratio: float | None = Field(default=None, gt=0, le=1, description="low-rank part's share of the dense "
                                         "parameters (authors: 0.05); with sparse_ratio, instead of ratio")
    sparse_ratio: float | None = Field(default=None, gt=0, le=1, description="fraction of S's entries kept at the "
                                       "end (authors: 0.15); with low_rank_ratio, instead of ratio")
    rank_share: float = Field(default=0.25, gt=0, lt=1, description="with ratio: fraction of the byte budget for "
                              "the low-rank parts")
    beta1: float = Field(default=0.85, ge=0, lt=1, description="EMA of the importance")
    beta2: float = Field(default=1.0, gt=0, le=1, description="EMA of the uncertainty (1: off, the authors' default)")
    delta_t: int = Field(default=10, ge=1, description="steps per importance window and between masks")
    prune_warmup: float = Field(default=0.05, ge=0, lt=1, description="fraction of the steps before any pruning")
    prune_final: float = Field(default=0.25, ge=0, lt=1, description="fraction of the steps at the final keep, "
                               "masking every step")
    scope: Literal["global", "layer"] = Field(default="global", description="rank rows over all layers (paper) or "
                                              "keep the same fraction in each")
    row_score: Literal["mean", "sum", "max", "min"] = Field(default="mean", description="row score from entries")

    @model_validator(mode="after")
    def _size(self):
        _need_exactly_one(self, {"low_rank_ratio": self.low_rank_ratio, "sparse_ratio": self.sparse_ratio},
                          "low_rank_ratio and sparse_ratio")
        if self.ratio is None and (self.low_rank_ratio is None or self.sparse_ratio is None):
            raise ValueError("give both low_rank_ratio and sparse_ratio (or ratio)")
        if self.prune_warmup + self.prune_final >= 1:
            raise ValueError(f"prune_warmup + prune_final must be < 1, got {self.prune_warmup} + {self.prune_final}")
        return self


def _row_bytes(lin: nn.Module) -> int:
    """Bytes one kept row of S costs (``factorize.budget.sparse_row_bytes``)."""
    return sparse_row_bytes(lin.in_features, lin.out_features)


class LoSparsePass(FactorizerPass):
    """LoSparse: low rank U V plus a row-sparse S, rows pruned by PLATON importance during fine-tuning."""

    name = "losparse"
    version = "1"
    Params = LoSparseParams

    def uses_gram(self):
        return "optional"

    # ------------------------------------------------------------------ sizes

    def knob(self, name: str, lin: nn.Linear, share: float) -> Knob:
        o, i, b = lin.out_features, lin.in_features, lin.bias is not None
        return Knob(name, lambda r: lowrank_cost(o, i, r, b), 1, min(o, i), share)

    def native_knob(self, name: str, lin: nn.Linear) -> int:
        return losparse_rank(lin.out_features, lin.in_features, self.params.low_rank_ratio, name=name)

    def _plan(self, layers: list[tuple[str, nn.Linear]], work: FactorizerWork) -> dict[str, int]:
        """Ranks, then the final keep fraction of S (``work.extra["keep"]``) and the row widths it
        is counted in (``work.extra["widths"]``)."""
        p = self.params
        if p.ratio is None:
            ranks = {n: self.native_knob(n, lin) for n, lin in layers}
            work.extra["widths"] = {n: lin.in_features for n, lin in layers}  # entries, as the authors count
            work.extra["keep"] = p.sparse_ratio
            return ranks
        budget = sum(dense_bytes_of(lin) for _, lin in layers) / p.ratio
        ranks = allocate([self.knob(n, lin, p.rank_share * dense_bytes_of(lin) / p.ratio) for n, lin in layers],
                         p.rank_share * budget)
        lowrank_bytes = sum(lowrank_cost(lin.out_features, lin.in_features, ranks[n], lin.bias is not None)
                            for n, lin in layers)
        widths = work.extra["widths"] = {n: _row_bytes(lin) for n, lin in layers}
        full = sum(lin.out_features * widths[n] for n, lin in layers)
        # select_rows keeps at least keep * full and less than one row more per ranking: leave that room
        slack = max(widths.values()) if p.scope == "global" else sum(widths.values())
        keep = work.extra["keep"] = (budget - lowrank_bytes - slack) / full
        if keep <= 0:
            raise FactorizeError(f"losparse: at {p.ratio:g}x the low-rank parts (rank_share {p.rank_share}) leave no "
                                 "bytes for rows of S; lower rank_share or the ratio")
        return ranks

    def build_layer(self, name: str, lin: nn.Linear, k: int, stats: LayerStats) -> Built:
        W = lin.weight.detach().float().cpu()
        U, V, S = losparse_init(W, k, name=name)
        bias = None if lin.bias is None else lin.bias.detach().float().cpu()
        lowrank_err = relative_errors(W, U @ V, stats.gram)
        row = {"rank": k, "lowrank_weight_error": lowrank_err["weight_error"]}
        if lowrank_err["output_error"] is not None:
            row["lowrank_output_error"] = lowrank_err["output_error"]
        return Built(SparseLowRankLinear.from_factors(U, V, S, bias), row)

    # ------------------------------------------------------------------ row selection

    def _select(self, scores: dict[str, torch.Tensor], keep: float, work: FactorizerWork) -> dict[str, torch.Tensor]:
        return select_rows({n: s.detach().float().cpu() for n, s in scores.items()}, min(keep, 1.0),
                           widths=work.extra["widths"], scope=self.params.scope)

    def _magnitude_scores(self, layers: dict[str, SparseLowRankLinear]) -> dict[str, torch.Tensor]:
        return {n: row_scores(m.sparse.detach().abs().float(), self.params.row_score) for n, m in layers.items()}

    def refine_report(self, built: dict[str, Built], ctx: PassContext, work: FactorizerWork) -> None:
        """Report each layer as it would be at the budget with rows kept by magnitude (no training)."""
        masks = self._select(self._magnitude_scores({n: b.layer for n, b in built.items()}), work.extra["keep"], work)
        for n, b in built.items():
            small = b.layer.prune_rows(masks[n])
            st = small.storage()
            lin_shape = b.row["shape"]
            # with every row of S the layer is W itself (up to one rounding)
            errs = relative_errors(b.layer.to_dense().detach(), small.to_dense().detach(),
                                   b.stats.gram if b.stats else None)
            b.row.update({"rows_kept": small.n_rows, "rows": lin_shape[0], "bytes": st.bytes,
                          "ratio": b.row["dense_bytes"] / st.bytes, "selection": "magnitude (at init)",
                          **{k: v for k, v in errs.items() if v is not None}})

    # ------------------------------------------------------------------ training

    def _total_steps(self, ctx: PassContext) -> int:
        t = self.params.train
        if t.max_steps:
            return t.max_steps
        batches = len(training_batches(ctx, t, augment=None, has_loss=True))
        return max(1, math.ceil(t.epochs * math.ceil(batches / t.grad_accum)))

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        p = self.params
        work = self._work(model, ctx)
        names, final_keep = work.names, work.extra["keep"]
        layers = {n: model.get_submodule(n) for n in names}
        if not self.trains():
            return self._prune(model, layers, self._magnitude_scores(layers), "magnitude (no training)", ctx, work)
        if ctx.data is None:
            return super().finetune(model, ctx)  # raises the shared "needs a task" error
        total = self._total_steps(ctx)
        schedule = KeepSchedule(total, math.floor(p.prune_warmup * total), math.floor(p.prune_final * total),
                                final_keep=min(final_keep, 1.0), delta_t=p.delta_t)
        pruning = RowPruningCallback(self, work, layers, schedule)
        model = train_on_task(model, ctx, p.train, callbacks=[pruning]).model
        layers = {n: model.get_submodule(n) for n in names}
        scores = self._importance_scores(pruning.importance)
        how = "PLATON importance"
        if scores is None:
            scores, how = self._magnitude_scores(layers), "magnitude (training shorter than one importance window)"
        ctx.report["losparse"] = {"total_steps": total, "masking_steps": pruning.masks_applied,
                                  "final_keep": final_keep}
        return self._prune(model, layers, scores, how, ctx, work, evaluate_after=True)

    def _importance_scores(self, importance: dict[str, Importance]) -> dict[str, torch.Tensor] | None:
        if any(imp.ema is None or not bool(imp.ema.any()) for imp in importance.values()):
            return None
        return {n: row_scores(imp.score(), self.params.row_score) for n, imp in importance.items()}

    def _prune(self, model: nn.Module, layers: dict[str, SparseLowRankLinear], scores: dict[str, torch.Tensor],
               how: str, ctx: PassContext, work: FactorizerWork, evaluate_after: bool = False) -> nn.Module:
        """Keep the final rows only (compact layers), and re-measure the task if the model changed."""
        masks = self._select(scores, work.extra["keep"], work)
        kept: dict[str, Any] = {}
        for n, layer in layers.items():
            small = layer.prune_rows(masks[n])
            set_module(model, n, small)
            kept[n] = small.n_rows
        ctx.report["rows_kept"] = kept
        ctx.report["row_selection"] = how
        if evaluate_after and ctx.data is not None:
            from stackcomp.train import evaluate

            before = {k: v for k, v in ctx.metrics.items() if k not in ("main_metric", "train_steps", "train_seconds")}
            after = evaluate(model, ctx.data.eval_loader(self.params.train.eval_batch_size), ctx.data.compute_metrics,
                             predict=ctx.data.predict)
            ctx.report["metrics_before_final_prune"] = before
            ctx.metrics.update(after)
        return model


class RowPruningCallback:
    """LoSparse's training events: after each optimizer step, update every layer's PLATON importance
    from the accumulated gradient of S and zero the rows of S below the keep schedule."""

    def __init__(self, owner: LoSparsePass, work: FactorizerWork, layers: dict[str, SparseLowRankLinear],
                 schedule: KeepSchedule):
        p = owner.params
        self.owner, self.work, self.layers, self.schedule = owner, work, layers, schedule
        self.importance = {n: Importance(p.beta1, p.beta2, p.delta_t) for n in layers}
        self.grads: dict[str, torch.Tensor] = {}
        self.masks_applied = 0
        self._hooks: list[Any] = []

    def on_train_begin(self, state: Any) -> None:
        def keep_grad(name: str):
            def fn(param: torch.Tensor) -> None:
                self.grads[name] = param.grad  # the accumulated grad; zero_grad later drops the param's reference only
            return fn

        self._hooks = [layer.sparse.register_post_accumulate_grad_hook(keep_grad(n)) for n, layer in self.layers.items()]

    def on_train_end(self, state: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def on_optimizer_step(self, state: Any) -> None:
        step = state.step
        for n, layer in self.layers.items():
            if n in self.grads:
                self.importance[n].update(step, layer.sparse, self.grads[n])
        keep, mask_now = self.schedule(step)
        scores = self.owner._importance_scores(self.importance) if mask_now else None
        if scores is not None:  # no mask before the first importance window has closed
            masks = self.owner._select(scores, keep, self.work)
            for n, layer in self.layers.items():
                layer.zero_rows_(masks[n].to(layer.sparse.device))
            self.masks_applied += 1
