"""N:M magnitude pruning as a stackcomp pass (an example plugin)."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from stackcomp.passes.base import Pass, PassContext, PassParams
from stackcomp.targets import select_modules


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the n largest |w| in each group of m consecutive inputs (rows of W)."""
    out_f, in_f = weight.shape
    if in_f % m:
        raise ValueError(f"input width {in_f} is not a multiple of m={m}")
    groups = weight.detach().abs().reshape(out_f, in_f // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


class NMPruneParams(PassParams):
    n: int = Field(default=2, ge=1, description="weights kept per group")
    m: int = Field(default=4, ge=2, description="group size along the input dimension")
    targets: list[str] | None = Field(default=None, description="module globs or re: patterns (default: encoder linears)")
    ignore: list[str] | None = Field(default=None, description="patterns to leave dense")
    epochs: float = Field(default=0.0, ge=0, description="fine-tuning epochs with the mask held (0: none)")
    lr: float = Field(default=3e-5, gt=0)
    batch_size: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _n_below_m(self):
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        return self


class NMPrunePass(Pass):
    """Prune encoder linears to N:M sparsity by magnitude (2:4 by default), optionally fine-tune."""

    name = "nm_prune"
    version = "1"
    Params = NMPruneParams

    def _layers(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        p = self.params
        return [(n, mod) for n, mod in select_modules(model, p.targets, p.ignore) if mod.in_features % p.m == 0]

    def analyze(self, model: nn.Module, ctx: PassContext) -> dict:
        p, out = self.params, {}
        for name, lin in self._layers(model):
            w = lin.weight.detach()
            pruned = w * nm_mask(w, p.n, p.m)
            out[name] = {"relative_error": float((w - pruned).norm() / w.norm().clamp_min(1e-12)),
                         "density": p.n / p.m}
        return {"layers": out}

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        self._masks = {}
        with torch.no_grad():
            for name, lin in self._layers(model):
                mask = nm_mask(lin.weight, self.params.n, self.params.m)
                lin.weight.mul_(mask)
                self._masks[name] = mask
        ctx.report["pruned_layers"] = len(self._masks)
        return model

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        if self.params.epochs <= 0:
            return model
        from stackcomp.passes.finetune import train_on_task
        from stackcomp.train import TrainConfig

        masks = self._masks

        def remask(step: int, trained: nn.Module) -> None:
            with torch.no_grad():
                for name, mask in masks.items():
                    trained.get_submodule(name).weight.mul_(mask.to(trained.get_submodule(name).weight.device))

        config = TrainConfig(epochs=self.params.epochs, lr=self.params.lr, batch_size=self.params.batch_size,
                             seed=ctx.seed)
        return train_on_task(model, ctx, config, on_step_end=remask).model
