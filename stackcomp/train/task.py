"""Training a model on the recipe's task: the one call every training pass makes.

Besides the callbacks a pass hands over, :func:`train_on_task` adds those registered with
:func:`extra_training_callbacks` for the block that runs the stages: how a caller outside the
pass (``stackcomp search``'s pruner) watches every training loop the passes start, without
the passes knowing. The registration is per context (a ``ContextVar``), so it never leaks into
other threads or runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torch import nn

from stackcomp.distributed import process_count
from stackcomp.train.loop import TrainConfig, TrainResult, train

_EXTRA_CALLBACKS: ContextVar[tuple[Any, ...]] = ContextVar("stackcomp_extra_training_callbacks", default=())


@contextmanager
def extra_training_callbacks(callbacks: Iterable[Any]) -> Iterator[None]:
    """While the block runs, every :func:`train_on_task` call also hands ``callbacks`` to the
    loop, after the pass's own. Blocks nest (the inner adds to the outer). Only training that
    goes through ``train_on_task`` sees them (a pass calling ``train`` directly does not)."""
    token = _EXTRA_CALLBACKS.set((*_EXTRA_CALLBACKS.get(), *callbacks))
    try:
        yield
    finally:
        _EXTRA_CALLBACKS.reset(token)


def train_on_task(model: nn.Module, ctx: Any, config: TrainConfig, *, callbacks: Iterable[Any] | None = None,
                  augment: Any = None, **train_kwargs: Any) -> TrainResult:
    """Train ``model`` on ``ctx``'s task data with ``config``, handing ``callbacks`` to the loop.

    ``ctx`` is the pass's :class:`~stackcomp.passes.base.PassContext`: its data gives the train
    and eval loaders (plus teacher-labelled perturbed copies with ``augment``, see
    :mod:`stackcomp.data.augment`), its task the metric, its progress and log the display. What
    the loop measured is recorded in ``ctx.metrics`` (best eval metrics, steps, seconds) and the
    history in ``ctx.report["train_history"]``. Other ``train`` keywords (``optimizer_params``,
    ``loss_fn``) pass through. Callbacks registered with :func:`extra_training_callbacks`
    run after ``callbacks``.
    """
    data = ctx.data
    if data is None:
        from stackcomp.errors import PlanError

        raise PlanError(f"stage {ctx.stage!r}: training needs a task; set `task:` in the recipe")
    callbacks = [*(callbacks or ()), *_EXTRA_CALLBACKS.get()]
    has_loss = any(callable(getattr(c, "compute_loss", None)) for c in callbacks) or "loss_fn" in train_kwargs
    callbacks += _task_callbacks(ctx.task, model, has_loss=has_loss)
    result = train(
        model,
        training_batches(ctx, config, augment=augment, has_loss=has_loss),
        config,
        eval_loader=data.eval_loader(config.eval_batch_size),
        compute_metrics=data.compute_metrics,
        predict=getattr(data, "predict", None),
        main_metric=ctx.task.main_metric,
        greater_is_better=getattr(ctx.task, "greater_is_better", None),
        progress=ctx.progress,
        log=ctx.log,
        callbacks=callbacks,
        **train_kwargs,
    )
    ctx.metrics.update({
        "main_metric": ctx.task.main_metric,
        **(result.best_metrics or {}),
        "train_steps": result.steps,
        "train_seconds": result.seconds,
        "train_processes": process_count(),
    })
    if getattr(data, "split_note", None):  # e.g. SQuAD offline: an article split of dev
        ctx.metrics["data_note"] = data.split_note
    ctx.report["train_history"] = result.history
    return result


def training_batches(ctx: Any, config: TrainConfig, *, augment: Any, has_loss: bool) -> Any:
    """The loader ``config.batches`` names: the task's train split, or its unlabeled text (which
    only a pass's own loss, a distillation loss, can learn from)."""
    from stackcomp.errors import PlanError

    if config.batches == "train":
        return ctx.data.train_loader(config.batch_size, seed=config.seed, augment=augment)
    where = f"stage {ctx.stage!r}: train.batches: unlabeled"
    unlabeled_loader = getattr(ctx.data, "unlabeled_loader", None)
    if unlabeled_loader is None:
        raise PlanError(f"{where}: task {ctx.task.name} has no unlabeled batches (embeddings and single-sentence "
                        "glue tasks have)")
    if not has_loss:
        raise PlanError(f"{where}: there are no labels to learn from; use it with a teacher (distill, or a "
                        "factorizer's kd) whose losses need no labels (kd.hard: 0)")
    if augment is not None:
        raise PlanError(f"{where}: augment perturbs labelled examples; remove one of the two")
    return unlabeled_loader(config.batch_size, seed=config.seed)


def _task_callbacks(task: Any, model: nn.Module, *, has_loss: bool) -> list[Any]:
    """The task kind's training callbacks (its loss, for a kind whose model returns none). A
    pass's own loss (a KD loss, a ``loss_fn``) wins: it gets the task's loss through
    ``task.kd_outputs``, so the kind's ``compute_loss`` callback is left out then."""
    extra = list(getattr(task, "training_callbacks", lambda m: [])(model))
    if has_loss:
        extra = [c for c in extra if not callable(getattr(c, "compute_loss", None))]
    return extra
