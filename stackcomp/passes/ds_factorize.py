"""``ds_factorize``: DSFormer dense-sparse factorization of linear layers, trained with STF.

Each targeted ``nn.Linear`` becomes a :class:`~stackcomp.nn.ds_linear.DSLinear`: per block of
``block`` input columns, a dictionary of ``atoms`` unit-norm atoms and exactly ``nnz`` codes per
output row (initialised by dictionary learning + OMP). With ``ratio`` instead of explicit
sizes, each layer gets the (B, K, s) of least reconstruction error that fits its byte budget.

Training (``finetune``): with ``stf: true`` (default) the straight-through factorizer trains
the latent dense weights and the dictionaries on the task, re-solving the codes by OMP in the
forward pass; at the end the supports are frozen. With ``stf: false`` (the task-unaware
baseline the paper compares against) the supports are frozen right after factorization and
only the code values and dictionaries are fine-tuned, with the same training budget. With
``teacher`` (an upstream stage, usually the fine-tuned model, or a model id) the training
loss is knowledge distillation against it (``kd`` weights, :mod:`stackcomp.distill.kd`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from stackcomp.distill.kd import KDLoss, KDWeights
from stackcomp.errors import PlanError
from stackcomp.factorize.budget import ds_bytes, search_ds_config, svd_rank_for_bytes
from stackcomp.factorize.dictionary import factorize_ds
from stackcomp.nn.ds_linear import DSLinear, STFCallback
from stackcomp.passes.base import Analysis, Pass, PassContext, PassParams
from stackcomp.passes.factorizer_common import FactorizerTrainConfig, select_targets
from stackcomp.targets import set_module
from stackcomp.train import default_param_groups, train_on_task

#: the fine-tune after factorization, shared with the other factorizers (0 epochs: none)
DSTrainConfig = FactorizerTrainConfig


class DSFactorizeParams(PassParams):
    block: int | None = Field(default=None, ge=1, description="block width B along the input (must divide it)")
    atoms: int | None = Field(default=None, ge=1, description="dictionary atoms K per block")
    nnz: int | None = Field(default=None, ge=1, description="non-zeros s per row of every block's codes")
    ratio: float | None = Field(default=None, gt=1, description="target compression of each targeted layer's "
                                "bytes (fp32 values, real index widths); the pass searches B, K, s per layer")
    candidates: list[list[int]] | None = Field(default=None, description="(B, K) or (B, K, s) tried with ratio")
    iters: int = Field(default=8, ge=0, description="dictionary-learning iterations at initialisation")
    method: Literal["mod", "ksvd"] = Field(default="mod", description="dictionary update rule")
    targets: list[str] | None = Field(default=None, description="module globs / re: patterns (default: encoder linears)")
    ignore: list[str] | None = Field(default=None, description="patterns left dense (default: heads, embeddings)")
    stf: bool = Field(default=True, description="straight-through factorizer; false: frozen-support fine-tune")
    refresh_every: int = Field(default=1, ge=1, description="STF: re-solve codes by OMP every N training steps")
    keep: int | None = Field(default=None, ge=0, description="STF: atoms of the last support kept as warm start "
                             "(default nnz // 2)")
    dict_lr: float | None = Field(default=None, gt=0, description="learning rate of the dictionaries (default: train.lr)")
    train: DSTrainConfig = Field(default_factory=DSTrainConfig, description="training loop settings")
    teacher: str | None = Field(default=None, description="train against this teacher (stage name or model id)")
    kd: KDWeights = Field(default_factory=KDWeights, description="distillation loss weights, with teacher")
    kd_temperature: float = Field(default=2.0, gt=0, description="softmax temperature of the soft losses")
    seed: int = Field(default=0, ge=0, lt=2**32, description="seed of the factorization (0 to 2**32-1)")

    @model_validator(mode="after")
    def _sizes_or_ratio(self):
        explicit = [self.block, self.atoms, self.nnz]
        if self.ratio is None and any(v is None for v in explicit):
            raise ValueError("give either ratio, or all of block, atoms and nnz")
        if self.ratio is not None and any(v is not None for v in explicit):
            raise ValueError("give either ratio or block/atoms/nnz, not both")
        if self.nnz is not None and self.atoms is not None and self.nnz > self.atoms:
            raise ValueError(f"nnz ({self.nnz}) cannot exceed atoms ({self.atoms})")
        return self


class DSFactorizePass(Pass):
    """Factorize linear layers into dense dictionaries x semi-structured sparse codes (DSFormer), train with STF."""

    name = "ds_factorize"
    # 2: STF re-solves codes on schedule under fused AdamW (v1 artifacts were trained wrong)
    # 3: no final OMP solve after training: the saved model is the one the loop evaluated/kept
    version = "3"
    Params = DSFactorizeParams
    forbid_after = {"int8": "factorize the fp32 weights first, then quantize the factors"}
    teacher_param = "teacher"

    def _layers(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        layers = select_targets(model, self.params.targets, self.params.ignore, self.name)
        if self.params.block:
            bad = [n for n, m in layers if m.in_features % self.params.block]
            if bad:
                raise PlanError(f"ds_factorize: block={self.params.block} does not divide the input width of "
                                f"{bad[0]} ({layers[[n for n, _ in layers].index(bad[0])][1].in_features})")
        return layers

    def analyze(self, model: nn.Module, ctx: PassContext) -> Analysis:
        """Factorize every layer (handed to ``transform`` as ``state["factors"]``) and compare with
        SVD at equal bytes."""
        p = self.params
        factors_of = {}
        rows = {}
        layers = self._layers(model)
        with ctx.progress.bar("factorize", total=len(layers)) as bar:
            for name, lin in layers:
                W = lin.weight.detach().float().cpu()
                has_bias = lin.bias is not None
                if p.ratio is not None:
                    cands = [tuple(c) for c in p.candidates] if p.candidates else None
                    choice = search_ds_config(W, p.ratio, cands, bias=has_bias, seed=p.seed, name=name)
                    B, K, s = choice.block, choice.atoms, choice.nnz
                    factors = factorize_ds(W, B, K, s, iters=p.iters, method=p.method, seed=p.seed, name=name)
                    ctx.log.info("%s: chose B=%d K=%d s=%d (%.2fx)", name, B, K, s, choice.ratio)
                else:
                    B, K, s = p.block, p.atoms, p.nnz
                    factors = factorize_ds(W, B, K, s, iters=p.iters, method=p.method, seed=p.seed, name=name)
                nbytes = ds_bytes(lin.out_features, lin.in_features, B, K, s, bias=has_bias)
                dense = (lin.out_features * lin.in_features + (lin.out_features if has_bias else 0)) * 4
                rank = svd_rank_for_bytes(lin.out_features, lin.in_features, nbytes, bias=has_bias)
                rows[name] = {
                    "shape": [lin.out_features, lin.in_features], "block": B, "atoms": K, "nnz": s,
                    "bytes": nbytes, "dense_bytes": dense, "ratio": dense / nbytes,
                    "ds_error": factors.error, "svd_rank": rank, "svd_error": _svd_error(W, rank),
                }
                rows[name]["error_ratio"] = rows[name]["ds_error"] / max(rows[name]["svd_error"], 1e-12)
                factors_of[name] = factors
                bar.advance()
        ratios = sorted(r["error_ratio"] for r in rows.values())
        total = sum(r["bytes"] for r in rows.values())
        dense_total = sum(r["dense_bytes"] for r in rows.values())
        report = {
            "layers": rows,
            "targeted_ratio": dense_total / total,
            "median_error_ratio_vs_svd": ratios[len(ratios) // 2],
            "worse_than_svd": [n for n, r in rows.items() if r["error_ratio"] > 1],
        }
        return Analysis(report=report, state={"factors": factors_of})

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        factors_of = ctx.analysis.state.get("factors")
        if factors_of is None:  # called without analyze (a direct call)
            factors_of = self.analyze(model, ctx).state["factors"]
        for name, lin in self._layers(model):
            f = factors_of[name]
            bias = None if lin.bias is None else lin.bias.detach()
            layer = DSLinear.from_factors(f.dictionary, f.values, f.indices, bias).to(lin.weight.device)
            layer.init_error = f.error
            layer._source_weight = lin.weight.detach()  # STF's latent weight starts from the dense one
            set_module(model, name, layer)
        ctx.report["factorized_layers"] = len(factors_of)
        return model

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        p = self.params
        ds_layers = [m for m in model.modules() if isinstance(m, DSLinear)]
        if p.train.epochs == 0 and p.train.max_steps is None:
            for m in ds_layers:
                m.freeze(train_values=True)
                _drop_source(m)
            return model
        if ctx.data is None:
            raise PlanError(f"stage {ctx.stage!r}: ds_factorize training needs a task; set `task:` or train.epochs: 0")
        for m in ds_layers:
            if p.stf:
                m.start_stf(refresh_every=p.refresh_every, keep=p.keep, weight=getattr(m, "_source_weight", None))
            else:
                m.freeze(train_values=True, train_dictionary=True)
            _drop_source(m)
        callbacks: list = [STFCallback(model)] if p.stf else []
        kd = None
        if p.teacher:
            kd = KDLoss(ctx.teacher, model, p.kd, temperature=p.kd_temperature, log=ctx.log, task=ctx.task)
            callbacks.append(kd)
        result = train_on_task(model, ctx, p.train, callbacks=callbacks,
                               optimizer_params=lambda m: _param_groups(m, ds_layers, p))
        model = result.model
        if kd is not None:
            ctx.report["kd"] = {"weights": p.kd.active(), "temperature": p.kd_temperature, **kd.summary()}
        for m in model.modules():
            if isinstance(m, DSLinear):
                # no final solve: keep the codes the loop evaluated (and restored, with keep_best)
                m.freeze(train_values=True, resolve=False)
        ctx.report["stf"] = p.stf
        return model


def _drop_source(layer: DSLinear) -> None:
    if hasattr(layer, "_source_weight"):
        del layer._source_weight


def _param_groups(model: nn.Module, ds_layers: list[DSLinear], p: DSFactorizeParams) -> list[dict]:
    """The loop's default groups, with the dictionaries in a group of their own (own lr, no decay)."""
    dict_ids = {id(m.dictionary) for m in ds_layers}
    groups = []
    for g in default_param_groups(model, p.train.weight_decay):
        rest = [q for q in g["params"] if id(q) not in dict_ids]
        if rest:
            groups.append({**g, "params": rest})
    dictionaries = [m.dictionary for m in ds_layers if m.dictionary.requires_grad]
    if dictionaries:
        groups.append({"params": dictionaries, "weight_decay": 0.0, "lr": p.dict_lr or p.train.lr})
    return groups


def _svd_error(W: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation (Eckart–Young)."""
    s = torch.linalg.svdvals(W.double())
    total = float((s**2).sum())
    if total == 0:
        return 0.0
    return math.sqrt(float((s[rank:] ** 2).sum()) / total)
