"""Training events: what a pass hands to the loop to act at fixed points of training.

In the spirit of Hugging Face's ``TrainerCallback`` and llm-compressor's modifier events: a
callback is any object with some of the methods below (subclassing :class:`TrainCallback` is
optional; it only provides no-op defaults). The loop calls them, in the order the callbacks
were given, with the one :class:`TrainState`:

========================  ===================================================================
``on_init``               once, before the optimizer is built: modules or parameters added to
                          ``state.model`` here (a KD projection) are trained with it
``on_train_begin``        once, after the optimizer and loaders are prepared, before step 1
``on_step_begin``         before the first micro-batch of each optimizer step
``compute_loss``          per micro-batch: return the loss (at most one callback may define it;
                          it replaces the model's own loss and ``train(loss_fn=...)``)
``on_optimizer_step``     right after each optimizer update (re-mask pruned weights, mark a
                          new step for layers that re-solve their codes)
``on_step_end``           after the step's bookkeeping (logging); ``state.step`` is 1-based
``on_evaluate``           after each evaluation, with its metrics in ``state.metrics``
``on_train_end``          once, after training: also when it stops early, and after an error
                          (``state.failed`` is then True), so it is the place to undo ``on_init``
========================  ===================================================================

A callback stops training by setting ``state.should_stop = True`` (a search pruner, a budget):
the loop finishes the current step, evaluates if it has an eval set, and returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stackcomp.errors import StackcompError

__all__ = ["TrainCallback", "TrainState", "EVENTS", "CallbackList"]

EVENTS = ("on_init", "on_train_begin", "on_step_begin", "on_optimizer_step", "on_step_end", "on_evaluate", "on_train_end")


@dataclass
class TrainState:
    """What the loop knows at an event. Callbacks read it; ``should_stop`` is theirs to set."""

    #: the model being trained, unwrapped (not the DDP wrapper)
    model: nn.Module
    optimizer: Any = None
    #: optimizer steps done so far (1-based inside ``on_step_*`` and ``on_optimizer_step``)
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    #: learning rate of the first parameter group for the current step
    lr: float = 0.0
    #: metrics of the latest evaluation (set before ``on_evaluate``)
    metrics: dict[str, float] = field(default_factory=dict)
    #: the loop's history so far: logged steps and evaluations
    history: list[dict] = field(default_factory=list)
    #: the accelerate ``Accelerator`` (process index, device, reductions)
    accelerator: Any = None
    is_main_process: bool = True
    #: set by a callback to end training after the current step
    should_stop: bool = False
    #: True in ``on_train_end`` when training ended by an exception
    failed: bool = False


class TrainCallback:
    """Optional base: no-op defaults for every event. Any object with some of the methods works."""

    def on_init(self, state: TrainState) -> None:
        pass

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def on_step_begin(self, state: TrainState) -> None:
        pass

    def on_optimizer_step(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState) -> None:
        pass

    def on_evaluate(self, state: TrainState) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


class CallbackList:
    """The callbacks of one training run, dispatching each event to those that define it."""

    def __init__(self, callbacks: Iterable[Any] | None):
        self.callbacks = [c for c in (callbacks or ()) if c is not None]
        for c in self.callbacks:
            if not any(callable(getattr(c, name, None)) for name in (*EVENTS, "compute_loss")):
                raise StackcompError(
                    f"training callback {type(c).__name__}: defines none of {', '.join(EVENTS)}, compute_loss")
        losses = [c for c in self.callbacks if callable(getattr(c, "compute_loss", None))]
        if len(losses) > 1:
            raise StackcompError("training callbacks: more than one defines compute_loss ("
                                 + ", ".join(type(c).__name__ for c in losses) + "); give one")
        self.loss_callback = losses[0] if losses else None

    def fire(self, event: str, state: TrainState) -> None:
        for c in self.callbacks:
            hook = getattr(c, event, None)
            if hook is not None:
                hook(state)

    def compute_loss(self, state: TrainState, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.loss_callback.compute_loss(state, model, batch)
