"""The test pass the engine tests share: it scales the classifier weight, so every stage changes
the model in a way a test can check, records which stages ran, and fails where a test says."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from pydantic import Field

from stackcomp.passes.base import Pass, PassParams, register_pass


def make_scale_pass(name: str, calls: list[str], *, fail: Collection[str] | Mapping[str, BaseException] = (),
                    factor: float = 2.0, metric: str = "norm", note: str | None = None) -> type[Pass]:
    """Register a pass ``name`` that multiplies the classifier weight by ``params.factor``
    (default ``factor``), appends each stage it runs to ``calls`` and records the weight's norm as
    ``metrics[metric]``. A stage named in ``fail`` raises: the exception ``fail`` maps it to, or a
    RuntimeError. ``note`` goes into the stage's report."""

    default_factor = factor

    class ScaleParams(PassParams):
        factor: float = Field(default=default_factor)

    class ScalePass(Pass):
        """Test pass: scales the classifier weight."""

        Params = ScaleParams

        def transform(self, model, ctx):
            calls.append(ctx.stage)
            if ctx.stage in fail:
                ctx.log.warning("about to fail")
                raise fail[ctx.stage] if isinstance(fail, Mapping) else RuntimeError(f"boom in {ctx.stage}")
            with torch.no_grad():
                model.classifier.weight.mul_(self.params.factor)
            ctx.metrics[metric] = float(model.classifier.weight.detach().norm())
            if note is not None:
                ctx.report["note"] = note
            return model

    ScalePass.name = name
    ScalePass.__qualname__ = ScalePass.__name__ = f"ScalePass_{name}"
    return register_pass(ScalePass)
