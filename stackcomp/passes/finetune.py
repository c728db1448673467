"""``finetune``: task training of the whole model, on the shared training loop."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from stackcomp.passes.base import KEY_INLINE, Pass, PassContext, PassParams
from stackcomp.train import TrainConfig, train_on_task


class FinetuneParams(PassParams):
    """The training loop's settings under ``train:`` (flat keys such as ``lr: 1e-4`` are accepted too)."""

    train: TrainConfig = Field(default_factory=TrainConfig, json_schema_extra=KEY_INLINE,
                               description="training loop settings (stackcomp.train.TrainConfig)")


class FinetunePass(Pass):
    """Fine-tune the model on the recipe's task (AdamW, warmup/decay, eval and best checkpoint)."""

    name = "finetune"
    version = "1"
    Params = FinetuneParams
    needs = frozenset({"task"})

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        return train_on_task(model, ctx, self.params.train).model
