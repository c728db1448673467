"""``dsf``: double sparse factorization (Boza & Macko, ICLR 2025), ``W ~= P Q`` with both factors sparse.

Each targeted linear becomes a :class:`DoubleSparseLinear` (two CSR factors) from
:func:`stackcomp.factorize.dsf.dsf_factors`: Wanda-style input scaling by the calibration
inputs' feature norms, alternating ADMM for the two sparse least-squares problems with the
cubic ramp of the start penalty, then the Hessian refit of the outer factor on the calibration
inputs (``finalize``). With ``sequential: true`` (the authors' pipeline) layers are done in the
order the forward calls them, each from the inputs the already-compressed earlier layers
produce; layers reading one tensor (q, k, v) share it. Without calibration data (no task, or
``calibration_samples: 0``) the scaling is uniform and the refit is plain least squares.

Size: ``density`` (nonzeros of both factors over out*in) for every layer, or ``ratio`` for the
targeted layers together, counted at the layer's exact bytes (fp32 values, column indices at
their width, int32 row pointers, bias). Fine-tuning trains the stored values (fixed support).
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from stackcomp.errors import PlanError
from stackcomp.factorize.allocate import Knob
from stackcomp.factorize.budget import dsf_bytes
from stackcomp.factorize.dsf import dsf_budget, dsf_factors
from stackcomp.nn.lowrank import DoubleSparseLinear
from stackcomp.passes.base import Analysis, PassContext
from stackcomp.passes.factorizer_common import Built, FactorizerParams, FactorizerPass, LayerStats, _need_exactly_one


class DSFParams(FactorizerParams):
    density: float | None = Field(default=None, gt=0, le=1, description="nonzeros of both factors / (out*in), "
                                  "every layer (instead of ratio)")
    a_fraction: float | None = Field(default=None, gt=0, le=1, description="share of the square factor: "
                                     "a_fraction * min(out, in)^2 nonzeros (default 0.16 square, 0.25 rectangular)")
    iters: int = Field(default=40, ge=1, description="outer alternations (authors: 40)")
    inner_iters: int = Field(default=5, ge=1, description="ADMM steps per half-step (authors: 5)")
    prune_iters: int = Field(default=2, ge=0, description="ADMM steps that recompute the mask (authors: 2)")
    reg: float = Field(default=1e-2, gt=0, description="relative ridge of the ADMM solves (authors: 1e-2)")
    monotone: bool = Field(default=True, description="accept an alternation only if the objective does not grow")
    finalize: bool = Field(default=True, description="refit the outer factor on the calibration Hessian")
    sequential: bool = Field(default=True, description="compressed outputs feed the next layer's calibration")

    @model_validator(mode="after")
    def _size(self):
        _need_exactly_one(self, {"density": self.density}, "density")
        return self


#: bytes of a fp32 DoubleSparseLinear with ``nnz`` nonzeros (the formula lives in factorize.budget)
dsf_cost = dsf_bytes


class DSFPass(FactorizerPass):
    """Double sparse factorization W ~= P Q (both sparse), ADMM + Wanda scaling + Hessian refit, layer by layer."""

    name = "dsf"
    version = "1"
    Params = DSFParams

    def uses_gram(self):
        return "optional"

    def sequential(self) -> bool:
        return self.params.sequential

    def _a(self, lin: nn.Linear) -> int:
        m = min(lin.out_features, lin.in_features)
        a = self.params.a_fraction if self.params.a_fraction is not None else (
            0.16 if lin.out_features == lin.in_features else 0.25)
        return int(m * m * a)

    def knob(self, name: str, lin: nn.Linear, share: float) -> Knob:
        o, i, b, a = lin.out_features, lin.in_features, lin.bias is not None, self.params.a_fraction
        return Knob(name, lambda k: dsf_cost(o, i, k, a, b), self._a(lin) + 1, o * i - 1, share)

    def native_knob(self, name: str, lin: nn.Linear) -> int:
        nza, nzb = dsf_budget(lin.out_features, lin.in_features, self.params.density, self.params.a_fraction,
                              name=name)
        return nza + nzb

    def analyze(self, model: nn.Module, ctx: PassContext) -> Analysis:
        found = super().analyze(model, ctx)
        if found.state["work"].calibration is None:
            ctx.log.warning("dsf: no calibration data: uniform input scaling and a plain least-squares refit")
        return found

    def build_layer(self, name: str, lin: nn.Linear, k: int, stats: LayerStats) -> Built:
        p = self.params
        out_f, in_f = lin.out_features, lin.in_features
        if k >= out_f * in_f:
            raise PlanError(f"dsf: {k} nonzeros do not fit {name} ({out_f}x{in_f}) sparsely")
        density = (k + 0.5) / (out_f * in_f)  # dsf_budget takes int(density * out * in) == k
        res = dsf_factors(lin.weight.detach().float().cpu(), density=density, gram=stats.gram,
                          a_fraction=p.a_fraction, iters=p.iters, inner_iters=p.inner_iters,
                          prune_iters=p.prune_iters, reg=p.reg, monotone=p.monotone, finalize=p.finalize, name=name)
        bias = None if lin.bias is None else lin.bias.detach().float().cpu()
        layer = DoubleSparseLinear.from_factors(res.P, res.Q, bias)
        row = {"nnz_budget": k, "nnz": res.nnz, "density": res.nnz / (out_f * in_f),
               "objective_init": res.trace["objective"][0], "objective": res.trace["objective"][-1]}
        if "calib_before" in res.trace:
            row["calib_error_before_refit"] = res.trace["calib_before"][0]
            row["calib_error_after_refit"] = res.trace["calib_after"][0]
        return Built(layer, row)
