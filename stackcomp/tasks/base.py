"""The task interface: what a recipe's ``task:`` brings to every pass.

A task is a *kind* (``glue``, ``embeddings``, ``ner``, ``qa``, or a plugin's) bound to a dataset
(``glue/sst2``, ``embeddings/stsb``, ``ner/conll2003``, ``qa/squad``). The kind owns everything
that differs between jobs, so passes never branch on it:

- the model head (:meth:`Task.load_model`): sequence classification, token classification,
  extractive QA, or a bare encoder whose pooled output is the embedding;
- the data (:meth:`Task.build_data`): an object with the :class:`TaskDataLike` methods — seeded
  train batches, fixed-order eval batches, calibration and latency batches the model can take
  as ``model(**batch)``, and the metrics;
- how evaluation turns a batch into predictions (``data.predict``) and scores them
  (``data.compute_metrics``), so the training loop can pick its best checkpoint on any kind;
- the training loss where the model's own ``loss`` is not it (``training_callbacks``: a
  ``compute_loss`` callback, e.g. CoSENT for a bi-encoder);
- what distillation compares (:meth:`Task.kd_outputs`): rows of logits that are distributions
  (per sentence, per token, per start/end position) and/or embeddings;
- the files that make its data, for the lock and the stage keys (:meth:`Task.data_files`), and
  the plan-time check that they are there (:meth:`Task.check_data`).

Kinds register by name with :func:`register_task_kind`, or from a plugin package through the
``stackcomp.tasks`` entry point group (``name = "pkg.module:factory"``), where ``factory(dataset)``
returns a :class:`Task` or raises :class:`~stackcomp.errors.DataError` naming the datasets it knows.
"""

from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from stackcomp.errors import DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

ENTRY_POINT_GROUP = "stackcomp.tasks"


class TaskDataLike(Protocol):
    """What passes and the training loop call on ``ctx.data`` (``stackcomp.data.TaskData`` is the GLUE one).

    Every batch is a dict of tensors. Batches from ``train_loader`` carry what the task's loss
    needs (``labels``, ``start_positions``...); ``calibration_batches`` and ``latency_batches``
    hold only model inputs, so ``model(**batch)`` runs on them.
    """

    def train_loader(self, batch_size: int, seed: int | None = None, group_by_length: bool | None = None, *,
                     num_workers: int = 0, drop_last: bool = False, augment: Any = None) -> Any: ...

    def eval_loader(self, batch_size: int, *, split: str | None = None, sort_by_length: bool = True,
                    num_workers: int = 0) -> Any: ...

    def calibration_batches(self, n: int, batch_size: int, *, seed: int | None = None) -> list[dict[str, Any]]: ...

    def latency_batches(self, batch_size: int, n_batches: int) -> list[dict[str, Any]]: ...

    def predict(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]: ...

    def compute_metrics(self, predictions: Any, labels: Any) -> dict[str, float]: ...


def default_predict(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{"predictions": logits, "labels": labels, "loss": loss}`` from one forward pass (keys
    absent when the model or batch has none): what classification-like tasks gather."""
    out = model(**batch)
    logits = out["logits"] if isinstance(out, Mapping) else out.logits
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    result = {"predictions": logits}
    if batch.get("labels") is not None:
        result["labels"] = batch["labels"]
    if loss is not None:
        result["loss"] = loss
    return result


class Task(ABC):
    """One task kind bound to one dataset. Subclasses set the class attributes and implement
    the abstract methods; the rest have defaults that suit a Hugging Face head with its own loss."""

    #: the kind, the part of ``task:`` before the slash
    kind: ClassVar[str] = ""
    #: the transformers auto class of the head, e.g. "AutoModelForTokenClassification"
    auto_class: ClassVar[str] = "AutoModelForSequenceClassification"

    #: canonical name, e.g. "ner/conll2003"; what stage keys and reports use
    name: str
    #: keys ``compute_metrics`` returns
    metrics: tuple[str, ...]
    #: what model selection and ``compare`` rank by
    main_metric: str
    greater_is_better: bool = True

    @property
    def short_name(self) -> str:
        """A short label for plots and tables (the dataset part of the name)."""
        return self.name.split("/", 1)[-1]

    def describe_metric(self) -> str:
        """One line for reports: which metric ranks this kind, on which split."""
        return f"{self.main_metric} on {self.name}"

    # ------------------------------------------------------------------ model

    def model_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` keywords for the head (``num_labels``, ``id2label``...)."""
        return {}

    def load_model(self, path: str, **kwargs: Any) -> nn.Module:
        """The model at ``path`` with this task's head (a head the checkpoint lacks is initialised
        from the caller's RNG state). ``kwargs`` are ``from_pretrained``'s (trust_remote_code...)."""
        import transformers

        cls = getattr(transformers, self.auto_class)
        return cls.from_pretrained(path, **self.model_kwargs(), **kwargs)

    def model_from_config(self, config: Any, reference: nn.Module) -> nn.Module:
        """A randomly initialised model of ``config`` with this task's head, taking the task
        settings ``reference`` carries (its label set): a distillation student built from a config."""
        import transformers

        ref = reference.config
        if getattr(ref, "id2label", None) and self.auto_class != "AutoModel":
            config.num_labels = ref.num_labels
            config.id2label, config.label2id = dict(ref.id2label), dict(ref.label2id)
        return getattr(transformers, self.auto_class).from_config(config)

    # ------------------------------------------------------------------ data

    @abstractmethod
    def build_data(self, tokenizer: Any, options: Any) -> TaskDataLike:
        """The task's data for ``tokenizer`` (``options``: the recipe's ``data:``, a DataOptions)."""

    @abstractmethod
    def data_files(self, splits: list[str], data_dir: str | Path | None) -> dict[str, Path] | None:
        """The local file behind each split (split -> path, whether or not it exists), or None
        when the data comes from the hub (``data_dir`` None and no default)."""

    def hub_source(self) -> tuple[str, str | None]:
        """(dataset id, config) the hub loads this task from; the lock records it."""
        return (self.name, None)

    def check_data(self, splits: list[str], data_dir: str | Path | None) -> None:
        """Raise the DataError loading would raise for a missing split, without loading it."""
        files = self.data_files(splits, data_dir)
        for split, path in (files or {}).items():
            if not Path(path).is_file():
                raise DataError(f"{self.name} {split}: no file at {path}")

    def write_export_files(self, model: nn.Module, folder: Path) -> None:
        """Add what other tools need to load an exported model of this task (e.g. a
        sentence-transformers layout for embeddings) to ``folder``; nothing by default."""

    # ------------------------------------------------------------------ training

    def training_callbacks(self, model: nn.Module) -> list[Any]:
        """Callbacks the training loop gets for this task (e.g. a ``compute_loss`` for a
        bi-encoder); none when the model's own loss is the task's loss."""
        return []

    def kd_outputs(self, model: nn.Module, batch: Mapping[str, Any], *, output_hidden_states: bool = False,
                   output_attentions: bool = False) -> dict[str, Any]:
        """One forward pass of ``model`` (student or teacher) on a training batch, and what
        distillation compares: ``logits`` as rows of class scores (M, C) — one row per sentence,
        per real token, or per start/end distribution, padded positions left out or at -1e4 —
        and/or ``embeddings`` (M, D); plus ``loss`` (the task loss on gold labels, if the batch
        has them), ``hidden_states`` and ``attentions`` when asked for."""
        out = model(**forward_inputs(model, batch, drop=()), output_hidden_states=output_hidden_states,
                    output_attentions=output_attentions)
        get = (lambda k: out.get(k)) if isinstance(out, Mapping) else (lambda k: getattr(out, k, None))
        return {"logits": get("logits"), "loss": get("loss"), "hidden_states": get("hidden_states"),
                "attentions": get("attentions")}


_SIGNATURES: dict[type, frozenset[str] | None] = {}


def forward_inputs(model: nn.Module, batch: Mapping[str, Any], drop: Sequence[str] = ("labels",)) -> dict[str, Any]:
    """The batch entries that ``model.forward`` names explicitly (``**kwargs`` swallow, not use)."""
    model = getattr(model, "module", model)  # DDP and similar wrappers
    cls = type(model)
    if cls not in _SIGNATURES:
        params = inspect.signature(model.forward).parameters.values()
        named = frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        _SIGNATURES[cls] = named
    named = _SIGNATURES[cls]
    return {k: v for k, v in batch.items() if k in named and k not in drop}


def local_data_folder(data_dir: str | Path | None, subdir: str, *,
                      is_the_folder: Callable[[Path], bool]) -> Path | None:
    """Where a task's local files are: ``<data dir>/<subdir>`` (the data dir is ``data.data_dir``,
    else ``$STACKCOMP_DATA_DIR``), or the data dir itself when it is that folder
    (``is_the_folder(data_dir)``); None when no data dir is set (the hub)."""
    from stackcomp.data.glue import default_data_dir

    data_dir = data_dir if data_dir is not None else default_data_dir()
    if data_dir is None:
        return None
    root = Path(data_dir).expanduser()
    if not (root / subdir).is_dir() and is_the_folder(root):
        return root
    return root / subdir


def require_hub_cache(task_name: str, hub_id: str, local_files: str) -> None:
    """Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), a task with no data dir can only read the
    hub dataset from the local cache: raise the DataError a load would hit when it is not there,
    saying which local files would do instead."""
    from stackcomp.data.glue import _offline, hub_dataset_revision

    if _offline() and hub_dataset_revision(hub_id) is None:
        raise DataError(f"{task_name}: offline (HF_HUB_OFFLINE) and {hub_id} is not in the local cache; set "
                        f"STACKCOMP_DATA_DIR (or data.data_dir) to a folder holding {local_files}")


# ----------------------------------------------------------------------------- registry

TaskFactory = Callable[[str], Task]
_KINDS: dict[str, TaskFactory] = {}
_DEFAULT_KIND = "glue"


def register_task_kind(kind: str, factory: TaskFactory) -> None:
    """Make ``task: <kind>/<dataset>`` build ``factory(dataset)``."""
    if "/" in kind or not kind:
        raise ValueError(f"a task kind is one word without '/', got {kind!r}")
    _KINDS[kind.lower()] = factory


def _load_builtin_kinds() -> None:
    if _KINDS.get("glue") is not None:
        return
    import importlib

    for module in ("stackcomp.tasks.glue", "stackcomp.tasks.embeddings", "stackcomp.tasks.ner", "stackcomp.tasks.qa"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # a kind whose module is not there (yet) is simply unknown
            if e.name != module:
                raise


def _entry_point_kinds() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def task_kinds() -> list[str]:
    """Every kind known: built in and from plugins."""
    _load_builtin_kinds()
    return sorted({*_KINDS, *_entry_point_kinds()})


def _factory(kind: str) -> TaskFactory | None:
    _load_builtin_kinds()
    if kind in _KINDS:
        return _KINDS[kind]
    ep = _entry_point_kinds().get(kind)
    if ep is None:
        return None
    try:
        factory = ep.load()
    except Exception as e:  # a broken plugin names itself, it does not crash the run
        raise DataError(f"task kind {kind!r} from plugin {ep.value!r} failed to load: {type(e).__name__}: {e}") from None
    _KINDS[kind] = factory
    return factory


def get_task(name: str | Task) -> Task:
    """The task ``name`` names: ``kind/dataset`` (``ner/conll2003``), or a bare GLUE name
    (``sst2``, ``SST-2``, ``glue/sst-2``) for the GLUE kind."""
    if isinstance(name, Task):
        return name
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"task must be a name like 'glue/sst2' or 'ner/conll2003', got {name!r}")
    kind, sep, dataset = name.strip().partition("/")
    factory = _factory(kind.lower()) if sep else None
    if factory is None:
        if sep and kind.lower() not in ("nyu-mll",):
            known = task_kinds()
            close = difflib.get_close_matches(kind.lower(), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            if kind.lower() not in known and not _looks_like_glue(name):
                raise DataError(f"unknown task kind {kind!r} in task {name!r}; {hint}known kinds: {', '.join(known)}")
        factory, dataset = _factory(_DEFAULT_KIND), name
    return factory(dataset)


def _looks_like_glue(name: str) -> bool:
    """``glue:sst2`` and ``nyu-mll/glue/sst2`` are GLUE names with a prefix the GLUE kind strips."""
    return name.lower().startswith(("glue", "nyu-mll/glue"))


def list_tasks() -> list[str]:
    """Canonical names of the tasks the built-in kinds know by name (plugins may know more)."""
    _load_builtin_kinds()
    names: list[str] = []
    for factory in _KINDS.values():
        names.extend(getattr(factory, "known", lambda: [])())
    return names
