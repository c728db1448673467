"""Stopping hopeless trials from inside the training loop.

Optuna's ``trial.report``/``should_prune`` do not work for multi-objective studies, and "worse
than the best so far" means nothing there either: a trial with a lower metric may still be on
the Pareto front with fewer bytes. What can be judged during training is the metric against a
*floor* that no useful stack goes below:

- ``pruning.min_metric`` (an absolute value, a fraction: 0.80 = 80 %), and/or
- with a goal ``metric_drop``: the baseline (the metric of the ``search.after`` stage) minus
  ``metric_drop + slack`` points, ``slack`` (default 2) allowing for what training still gains.

The floor is the higher of the two that are set; with neither there is no pruning. A chain
stage is pruned at an evaluation, from its ``warmup_evals``-th on, whose metric is below the
floor. The prefix's own training is never judged: the pruner acts only once the ``after``
stage's artifact exists.

A pruned stage must not leave an artifact, or a later trial with the same stage key would take
the half-trained model from the cache as if it were finished. So the pruner does not set
``state.should_stop`` (the loop would return normally and the pass would commit its model): it
raises :class:`PrunedByRule`, which fails the stage like any error (the executor removes its
temporary folder, commits nothing, and skips the stages after it). The search then marks the
trial PRUNED with the pruner's message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PrunedByRule(Exception):
    """Raised in the training loop to stop a hopeless trial; fails its stage, commits nothing."""


class FloorPruner:
    """A training callback that raises :class:`PrunedByRule` when the metric falls below the floor.

    ``baseline()`` returns the ``after`` stage's metrics once its artifact exists, else None.
    """

    def __init__(self, *, metric: str | None, min_metric: float | None, metric_drop: float | None, slack: float,
                 warmup_evals: int, baseline: Callable[[], dict[str, Any] | None]):
        self.metric = metric
        self.min_metric = min_metric
        self.metric_drop = metric_drop
        self.slack = slack
        self.warmup_evals = warmup_evals
        self.baseline = baseline
        self.evals = 0
        self.verdict: str | None = None  # why the trial was pruned

    @property
    def active(self) -> bool:
        return self.min_metric is not None or self.metric_drop is not None

    def floor(self) -> tuple[float | None, str]:
        """The floor and how it was found, or (None, why not) before the chain trains."""
        base = self.baseline()
        if base is None:
            return None, "the prefix is still running"
        floors = []
        if self.min_metric is not None:
            floors.append((self.min_metric, f"min_metric {self.min_metric:g}"))
        name = self.metric or base.get("main_metric")
        value = base.get(name) if name else None
        if self.metric_drop is not None and isinstance(value, (int, float)):
            f = value - (self.metric_drop + self.slack) / 100.0
            floors.append((f, f"baseline {value:.4f} - ({self.metric_drop:g} + slack {self.slack:g}) points"))
        if not floors:
            return None, "no floor"
        return max(floors)

    def on_train_begin(self, state: Any) -> None:
        self.evals = 0

    def on_evaluate(self, state: Any) -> None:
        if not self.active:
            return
        self.evals += 1
        if self.evals < self.warmup_evals:
            return
        floor, why = self.floor()
        if floor is None:
            return
        name = self.metric or _main_metric_name(state.metrics, self.baseline())
        value = state.metrics.get(name) if name else None
        if isinstance(value, (int, float)) and value < floor:
            self.verdict = (f"{name} {value:.4f} at step {state.step} (evaluation {self.evals}) is below the "
                            f"floor {floor:.4f} ({why})")
            raise PrunedByRule(self.verdict)


def _main_metric_name(metrics: dict[str, Any], base: dict[str, Any] | None) -> str | None:
    name = (base or {}).get("main_metric")
    return name if name in metrics else None
