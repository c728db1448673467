"""The ``glue`` kind: GLUE sequence classification and regression (``glue/sst2``, ``glue/stsb``...).

The task facts live in :mod:`stackcomp.data.glue` (names, columns, label order, metrics) and the
loaders in :class:`stackcomp.data.TaskData`; this module puts them behind the task interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stackcomp.data.glue import (
    TaskSpec,
    check_splits_available,
    default_data_dir,
    local_path,
    resolve_split,
)
from stackcomp.data.glue import get_task as get_spec
from stackcomp.data.glue import list_tasks as glue_names
from stackcomp.tasks.base import Task, register_task_kind


class GlueTask(Task):
    """A GLUE task: one sentence or a pair in, a label or a score out."""

    kind = "glue"
    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.name = spec.name
        self.metrics = spec.metrics
        self.main_metric = spec.main_metric

    # what passes and reports read of a GLUE task
    num_labels = property(lambda self: self.spec.num_labels)
    label_names = property(lambda self: self.spec.label_names)
    is_regression = property(lambda self: self.spec.is_regression)

    @property
    def short_name(self) -> str:
        return self.spec.glue_dir

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_labels": self.spec.num_labels}
        if self.spec.is_regression:
            kwargs["problem_type"] = "regression"
        elif self.spec.label_names:
            kwargs["id2label"] = dict(enumerate(self.spec.label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(self.spec.label_names)}
        return kwargs

    def build_data(self, tokenizer: Any, options: Any):
        from stackcomp.data.loaders import TaskData

        return TaskData(self.spec, tokenizer, options)

    def data_files(self, splits: list[str], data_dir: str | Path | None) -> dict[str, Path] | None:
        data_dir = data_dir if data_dir is not None else default_data_dir()
        if data_dir is None:
            return None
        return {resolve_split(self.spec, s): local_path(self.spec, s, data_dir) for s in splits}

    def hub_source(self) -> tuple[str, str | None]:
        return self.spec.hub

    def check_data(self, splits: list[str], data_dir: str | Path | None) -> None:
        check_splits_available(self.spec, splits, data_dir)

    def __repr__(self) -> str:
        return f"GlueTask({self.name})"


def glue_task(dataset: str) -> GlueTask:
    """``sst2``, ``SST-2``, ``glue/sst2``: error messages name the task as ``glue/<dataset>``."""
    return GlueTask(get_spec(dataset if dataset.lower().startswith(("glue", "nyu-mll")) else f"glue/{dataset}"))


glue_task.known = glue_names  # type: ignore[attr-defined]
register_task_kind("glue", glue_task)
