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
    result = train(
        model,
        data.train_loader(config.batch_size, seed=config.seed, augment=augment),
        config,
        eval_loader=data.eval_loader(config.eval_batch_size),
        compute_metrics=data.compute_metrics,
        main_metric=ctx.task.main_metric,
        progress=ctx.progress,
        log=ctx.log,
        callbacks=[*(callbacks or ()), *_EXTRA_CALLBACKS.get()],
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
