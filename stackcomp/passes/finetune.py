"""``finetune``: task training of the whole model, on the shared training loop."""

from __future__ import annotations

from torch import nn

from stackcomp.data.augment import AugmentOptions
from stackcomp.passes.base import Pass, PassContext
from stackcomp.train import TrainConfig, train


class FinetuneParams(TrainConfig):
    """The training loop's settings (stackcomp.train.TrainConfig)."""


class FinetunePass(Pass):
    """Fine-tune the model on the recipe's task (AdamW, warmup/decay, eval and best checkpoint)."""

    name = "finetune"
    version = "1"
    Params = FinetuneParams
    needs = frozenset({"task"})

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        result = train_on_task(model, ctx, self.params)
        return result.model


def train_on_task(model: nn.Module, ctx: PassContext, config: TrainConfig, *, augment: AugmentOptions | None = None,
                  **train_kwargs):
    """Train ``model`` on ctx's task data (plus perturbed copies with ``augment``) and record what
    the loop measured in ctx.metrics."""
    data = ctx.data
    result = train(
        model,
        data.train_loader(config.batch_size, seed=config.seed, augment=augment),
        config,
        eval_loader=data.eval_loader(config.eval_batch_size),
        compute_metrics=data.compute_metrics,
        main_metric=ctx.task.main_metric,
        progress=ctx.progress,
        log=ctx.log,
        **train_kwargs,
    )
    ctx.metrics.update({
        "main_metric": ctx.task.main_metric,
        **(result.best_metrics or {}),
        "train_steps": result.steps,
        "train_seconds": result.seconds,
    })
    ctx.report["train_history"] = result.history
    return result
