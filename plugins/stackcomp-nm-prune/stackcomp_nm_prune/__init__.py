"""N:M magnitude pruning as a stackcomp pass (an example plugin).

It shows the whole pass contract: ``analyze`` chooses the masks and hands them on
(``Analysis.state``), ``transform`` applies them, and ``finetune`` trains on the task with
stackcomp's training library, re-applying the masks after every optimizer step through a
training callback, so the sparsity survives training.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from stackcomp.errors import PassError
from stackcomp.passes.base import Analysis, Pass, PassContext, PassParams
from stackcomp.targets import select_modules
from stackcomp.train import TrainCallback, TrainConfig, TrainState, train_on_task


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the n largest |w| in each group of m consecutive inputs (rows of W)."""
    out_f, in_f = weight.shape
    if in_f % m:
        raise PassError(f"input width {in_f} is not a multiple of m={m}")
    groups = weight.detach().abs().reshape(out_f, in_f // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


class NMPruneParams(PassParams):
    n: int = Field(default=2, ge=1, description="weights kept per group")
    m: int = Field(default=4, ge=2, description="group size along the input dimension")
    targets: list[str] | None = Field(default=None, description="module globs or re: patterns (default: encoder linears)")
    ignore: list[str] | None = Field(default=None, description="patterns to leave dense")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=0),
                               description="fine-tune with the masks held (stackcomp.train.TrainConfig; "
                                           "default epochs 0: none)")

    @model_validator(mode="after")
    def _n_below_m(self):
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        return self


class ReapplyMasks(TrainCallback):
    """After every optimizer step, zero the pruned weights again (the update moved them)."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    def on_optimizer_step(self, state: TrainState) -> None:
        with torch.no_grad():
            for name, mask in self.masks.items():
                weight = state.model.get_submodule(name).weight
                weight.mul_(mask.to(weight.device))


class NMPrunePass(Pass):
    """Prune encoder linears to N:M sparsity by magnitude (2:4 by default), optionally fine-tune."""

    name = "nm_prune"
    version = "2"  # 2: fine-tune settings under `train:`
    Params = NMPruneParams

    def _layers(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        p = self.params
        return [(n, mod) for n, mod in select_modules(model, p.targets, p.ignore) if mod.in_features % p.m == 0]

    def analyze(self, model: nn.Module, ctx: PassContext) -> Analysis:
        p, rows, masks = self.params, {}, {}
        for name, lin in self._layers(model):
            w = lin.weight.detach()
            masks[name] = nm_mask(w, p.n, p.m)
            pruned = w * masks[name]
            rows[name] = {"relative_error": float((w - pruned).norm() / w.norm().clamp_min(1e-12)),
                          "density": p.n / p.m}
        return Analysis(report={"layers": rows}, state={"masks": masks})

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        masks = ctx.analysis.state["masks"]
        with torch.no_grad():
            for name, mask in masks.items():
                model.get_submodule(name).weight.mul_(mask)
        ctx.report["pruned_layers"] = len(masks)
        return model

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        if not self.params.train.trains:
            return model
        callback = ReapplyMasks(ctx.analysis.state["masks"])
        return train_on_task(model, ctx, self.params.train, callbacks=[callback]).model
