"""``export``: write the model to a folder that ``stackcomp.load(path)`` and transformers'
``AutoModelFor*.from_pretrained(path)`` (after ``import stackcomp``) reload, with a model card."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from stackcomp.artifacts import export_model
from stackcomp.errors import ArtifactError
from stackcomp.passes.base import Pass, PassContext, PassParams

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportParams(PassParams):
    path: str = Field(description="destination folder; replaced atomically if it exists")
    dense: bool = Field(default=False, description="write ordinary dense weights (every compressed layer rebuilt as "
                                                   "the nn.Linear/nn.Embedding it computes) that plain transformers "
                                                   "loads without stackcomp")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        default=None, description="float dtype of a dense export's weights (default float32)")
    measure: bool = Field(default=True, description="measure the task metric and latency on the dev split for the "
                                                    "model card (README.md); sizes are always there")

    @model_validator(mode="after")
    def _dtype_needs_dense(self) -> ExportParams:
        if self.dtype is not None and not self.dense:
            raise ValueError("dtype applies to a dense export: set dense: true (a compressed export keeps each "
                             "layer's stored dtypes)")
        return self


class ExportPass(Pass):
    """Save the model as safetensors + config (with stackcomp's quantization_config for compressed
    layers) + layer manifest + tokenizer + model card, with a CHECKSUMS.json that ``stackcomp.load``
    verifies before loading."""

    name = "export"
    # 3: config.json holds quantization_config and the head class; README.md model card; dense/dtype
    version = "3"
    Params = ExportParams
    changes_model = False
    reads_data = True  # the model card holds the dev metrics (measure: true)

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        from stackcomp.evaluate import size_report
        from stackcomp.model_card import render_card

        p = self.params
        dest = Path(p.path).expanduser()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"export: cannot write to {dest.parent}: {e.strerror}") from None
        out = model
        if p.dense:
            from stackcomp.nn.dense import densify

            out = densify(copy.deepcopy(model), _DTYPES[p.dtype or "float32"])
        measured = self._measure(out, ctx) if p.measure and ctx.data is not None else {}
        card = render_card(out, dest.name, dense=p.dense, sizes=size_report(out), metrics=measured, task=ctx.task,
                           stage=ctx.stage, upstream=list(reversed(ctx.parent_reports)),
                           params=p.model_dump(mode="json", exclude={"path"}), recipe=ctx.recipe_yaml,
                           lock=ctx.load_lock() if ctx.load_lock is not None else None)
        task = ctx.task
        export_model(out, dest, tokenizer=ctx.tokenizer, card=card,
                     extra_files=(lambda folder: task.write_export_files(out, folder)) if task is not None else None)
        # in the report, not the stage's metrics: an export is not a row of the leaderboard
        ctx.report.update(exported_to=str(dest.resolve()), dense=p.dense, card_metrics=measured)
        ctx.log.info("exported to %s", dest)
        return model

    @staticmethod
    def _measure(model: nn.Module, ctx: PassContext) -> dict:
        """What the ``evaluate`` pass measures (its defaults), on the model as exported."""
        from stackcomp.passes.evaluate import EvaluatePass

        scratch = dataclasses.replace(ctx, metrics={}, report={})
        EvaluatePass().analyze(model, scratch)
        return scratch.metrics
