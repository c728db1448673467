"""``lowrank``: each targeted linear becomes two thin linears ``U V`` (:class:`LowRankLinear`).

``method`` picks the error the factors minimise (closed forms in :mod:`stackcomp.factorize.lowrank`):

* ``svd``   -- ``||W - UV||_F``, truncated SVD (Eckart-Young);
* ``fwsvd`` -- ``||diag(d)(W - UV)||_F`` with ``d_i^2`` the Fisher information of output row
  ``i`` plus ``fisher_eps``, from squared task gradients over ``fisher_batches`` training
  batches (Hsu et al., ICLR 2022);
* ``drone`` -- ``||(W - UV) X^T||_F`` for the layer's calibration inputs ``X`` (Chen et al.,
  NeurIPS 2021), through the Gram ``X^T X`` collected by forward hooks.

Size: ``rank`` for every layer, or ``ratio`` for the targeted layers together (ranks per layer
from the equal-budget solver). Then the shared fine-tune (``train``), optionally ``staged``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from stackcomp.errors import PlanError
from stackcomp.factorize.allocate import Knob
from stackcomp.factorize.budget import svd_bytes
from stackcomp.factorize.lowrank import drone_factors, fwsvd_factors, svd_factors
from stackcomp.nn.lowrank import LowRankLinear
from stackcomp.passes.factorizer_common import Built, FactorizerParams, FactorizerPass, LayerStats, _need_exactly_one


class LowRankParams(FactorizerParams):
    method: Literal["svd", "fwsvd", "drone"] = Field(default="svd", description="which error the factors minimise")
    rank: int | None = Field(default=None, ge=1, description="rank of every targeted layer (instead of ratio)")
    fisher_batches: int = Field(default=32, ge=1, description="fwsvd: training batches for the Fisher estimate")
    fisher_batch_size: int = Field(default=32, ge=1, description="fwsvd: sequences per Fisher batch")
    fisher_eps: float = Field(default=1e-5, gt=0, description="fwsvd: added to each row's Fisher (authors: 1e-5)")
    damp: float = Field(default=0.0, ge=0, description="drone: add damp * mean(diag(X^T X)) * I to the Gram")
    split: Literal["sqrt", "left", "right"] = Field(default="sqrt", description="how singular values are split "
                                                    "between U and V (sqrt suits training both)")

    @model_validator(mode="after")
    def _size(self):
        _need_exactly_one(self, {"rank": self.rank}, "rank")
        return self


def lowrank_cost(out_f: int, in_f: int, rank: int, bias: bool) -> float:
    """Bytes of a fp32 :class:`LowRankLinear` (``factorize.budget.svd_bytes``)."""
    return float(svd_bytes(out_f, in_f, rank, bias=bias))


class LowRankPass(FactorizerPass):
    """Replace linears by rank-r factors U V: truncated SVD, Fisher-weighted SVD (FWSVD) or data-aware DRONE."""

    name = "lowrank"
    version = "1"
    Params = LowRankParams

    def uses_gram(self):
        return "required" if self.params.method == "drone" else "optional"

    def uses_fisher(self) -> bool:
        return self.params.method == "fwsvd"

    def knob(self, name: str, lin: nn.Linear, share: float) -> Knob:
        o, i, b = lin.out_features, lin.in_features, lin.bias is not None
        return Knob(name, lambda r: lowrank_cost(o, i, r, b), 1, min(o, i), share)

    def native_knob(self, name: str, lin: nn.Linear) -> int:
        top = min(lin.out_features, lin.in_features)
        if self.params.rank > top:
            raise PlanError(f"lowrank: rank {self.params.rank} exceeds min(out, in) = {top} of {name} "
                            f"({lin.out_features}x{lin.in_features})")
        return self.params.rank

    def build_layer(self, name: str, lin: nn.Linear, k: int, stats: LayerStats) -> Built:
        p = self.params
        W = lin.weight.detach().float().cpu()
        if p.method == "svd":
            U, V = svd_factors(W, k, split=p.split, name=name)
        elif p.method == "fwsvd":
            U, V = fwsvd_factors(W, k, stats.fisher, eps=p.fisher_eps, split=p.split, name=name)
        else:
            U, V = drone_factors(W, k, gram=stats.gram, damp=p.damp, split=p.split, name=name)
        bias = None if lin.bias is None else lin.bias.detach().float().cpu()
        return Built(LowRankLinear.from_factors(U, V, bias), {"rank": k})
