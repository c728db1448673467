"""Task data: GLUE task specs, splits from local TSVs or the hub, tokenized loaders, metrics."""

from stackcomp.data.augment import AugmentOptions
from stackcomp.data.glue import TaskSpec, get_task, list_tasks, load_split
from stackcomp.data.loaders import DataOptions, TaskData
from stackcomp.data.metrics import compute_metrics

__all__ = ["AugmentOptions", "DataOptions", "TaskData", "TaskSpec", "compute_metrics", "get_task", "list_tasks",
           "load_split"]
