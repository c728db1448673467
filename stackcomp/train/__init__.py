"""stackcomp's training library: the shared accelerate loop, its events, and task training.

- :func:`train` — the loop (AdamW with warmup/decay, accumulation, clipping, evaluation with the
  best checkpoint kept, NaN guard), the same in one process or under ``accelerate launch``;
- :mod:`~stackcomp.train.callbacks` — the events a pass hooks into (:class:`TrainCallback`,
  :class:`TrainState`);
- :func:`train_on_task` — train on the recipe's task from inside a pass (:func:`training_batches`:
  the batches its ``train.batches`` names);
- :class:`TrainConfig` — the one ``train:`` config every training pass takes.
"""

from stackcomp.train.callbacks import EVENTS, TrainCallback, TrainState
from stackcomp.train.loop import (
    TrainConfig,
    TrainResult,
    default_param_groups,
    evaluate,
    make_accelerator,
    train,
)
from stackcomp.train.task import train_on_task, training_batches

__all__ = [
    "EVENTS",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "default_param_groups",
    "evaluate",
    "make_accelerator",
    "train",
    "train_on_task",
    "training_batches",
]
