"""Task kinds: what a recipe's ``task:`` means (head, data, loss, metric, distillation targets).

``get_task("glue/sst2")``, ``get_task("embeddings/stsb")``, ``get_task("ner/conll2003")``,
``get_task("qa/squad")``; a plugin adds a kind with :func:`register_task_kind` or the
``stackcomp.tasks`` entry point group. See :mod:`stackcomp.tasks.base`.
"""

from stackcomp.tasks.base import (
    ENTRY_POINT_GROUP,
    Task,
    TaskDataLike,
    default_predict,
    get_task,
    list_tasks,
    register_task_kind,
    task_kinds,
)

__all__ = ["ENTRY_POINT_GROUP", "Task", "TaskDataLike", "default_predict", "get_task", "list_tasks",
           "register_task_kind", "task_kinds"]
