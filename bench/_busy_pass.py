"""The CPU-bound pass of ``bench/executor.py``, in a module Ray workers import (PYTHONPATH=bench/):
a fixed number of single-precision matmuls on torch's threads, then a scaled classifier."""

from __future__ import annotations

import torch
from pydantic import Field

from stackcomp.passes.base import Pass, PassParams, register_pass


class BusyParams(PassParams):
    matmuls: int = Field(default=200, ge=0)
    size: int = Field(default=512, ge=1)
    factor: float = 2.0


class BusyPass(Pass):
    """Benchmark pass: a fixed amount of matmul work (the same work whatever the thread count)."""

    name = "_bench_busy"
    Params = BusyParams

    def transform(self, model, ctx):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(self.params.size, self.params.size, generator=g)
        b = torch.randn(self.params.size, self.params.size, generator=g) / self.params.size ** 0.5
        for _ in range(self.params.matmuls):
            a = a @ b
            a = a / a.norm()
        with torch.no_grad():
            model.classifier.weight.mul_(self.params.factor)
        ctx.metrics["checksum"] = float(a.sum())
        return model


register_pass(BusyPass)
