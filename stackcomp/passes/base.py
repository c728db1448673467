"""The pass contract and the registry of passes.

A pass is a class with a string ``name``, a pydantic ``Params`` model, and one to three methods,
each given the model and a :class:`PassContext`; the engine calls them in this order:

- ``analyze(model, ctx) -> dict | Analysis``: reads, never changes the model (sizes, errors,
  what to do). A dict is the report (saved in ``report.json``); an :class:`Analysis` adds
  ``state``, Python objects handed on to the next two methods and never saved;
- ``transform(model, ctx) -> model``: the structural change; ``ctx.analysis`` holds what
  ``analyze`` returned;
- ``finetune(model, ctx) -> model``: training that belongs to the pass, with
  :func:`stackcomp.train.train_on_task` and training callbacks (optional).

A pass keeps no state on ``self`` between the methods: everything travels in ``ctx.analysis``
(or on the model). Subclassing :class:`Pass` gives defaults for everything left out; a class
that does not subclass it is accepted too if it has a ``name`` and one of the methods (it then
gets the same defaults). ``Params`` is validated strictly (unknown keys are errors) whatever its
base class. A pass raises :class:`stackcomp.errors.PassError` (or any ``StackcompError``) for a
mistake the user can fix: the run reports its message in one line, without a traceback.

Passes register by entry point (group ``stackcomp.passes``; the entry point's name is the pass's
``name``) or are named in a recipe as ``module.path:ClassName`` (allowed only when the recipe
lists them under ``allow_plugins``). An installed entry point that fails to import or does not
fit the contract is listed by ``stackcomp passes list`` with the reason and affects only the
recipes that use it. A pass declares what it needs (``needs``) and where it may stand
(``must_be_last``, ``forbid_after``); the plan checks these before anything runs.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

from stackcomp.errors import PlanError
from stackcomp.progress import NULL_PROGRESS, Progress

ENTRY_POINT_GROUP = "stackcomp.passes"
#: ``package.module:ClassName`` as a recipe may name it (no relative imports, no attribute paths)
_PLUGIN_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")

#: What a pass may say it needs; the plan checks each before the run.
KNOWN_NEEDS = frozenset({"task", "teacher"})

KEY_OMIT_DEFAULT_MARK = "key_omit_default"
KEY_OMIT_DEFAULT = {KEY_OMIT_DEFAULT_MARK: True}
"""``Field(..., json_schema_extra=KEY_OMIT_DEFAULT)`` on a param added to a pass after artifacts
exist: while it has its default the pass does the same work as before, so the param stays out of
stage keys (stackcomp.plan) and those artifacts stay valid."""


KEY_INLINE_MARK = "key_inline"
KEY_INLINE = {KEY_INLINE_MARK: True}
"""``Field(..., json_schema_extra=KEY_INLINE)`` on a nested config (``train:``) whose fields were
once the pass's own top-level params: stage keys see them at the top level, as before, so cached
artifacts stay valid; and a recipe may still give them flat (``lr: 1e-4`` for ``train: {lr: 1e-4}``)."""


def _marked(field_info: Any, mark: str) -> bool:
    extra = field_info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(mark))


class PassParams(BaseModel):
    """Base for every pass's parameters: unknown keys and NaN/Inf numbers are errors, not silently used."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _fold_inline(cls, data: Any) -> Any:
        """Flat keys of a ``KEY_INLINE`` config (``epochs: 2``) move into it (``train: {epochs: 2}``)."""
        if not isinstance(data, dict):
            return data
        for name, info in cls.model_fields.items():
            inner = info.annotation
            if not (_marked(info, KEY_INLINE_MARK) and isinstance(inner, type) and issubclass(inner, BaseModel)):
                continue
            flat = [k for k in data if k in inner.model_fields and k not in cls.model_fields]
            if not flat:
                continue
            nested = data.get(name) or {}
            if isinstance(nested, BaseModel):
                nested = nested.model_dump(exclude_unset=True)
            if not isinstance(nested, dict):
                return data  # let validation report the bad `train` value
            both = [k for k in flat if k in nested]
            if both:
                raise ValueError(f"{', '.join(both)}: given both at the top level and under `{name}:`; give it once "
                                 f"(under `{name}:`)")
            data = {k: v for k, v in data.items() if k not in flat} | {name: {**nested, **{k: data[k] for k in flat}}}
        return data


@dataclass
class Analysis:
    """What ``analyze`` found, handed by the engine to ``transform`` and ``finetune`` as ``ctx.analysis``.

    ``report`` is JSON and is saved in the stage's ``report.json``; ``state`` holds whatever
    Python objects the later methods need (chosen layers, fitted tables, calibration batches)
    and is never saved. A pass keeps no state on ``self`` between its methods.
    ``analyze`` may also return a plain dict: it is the report, with an empty state.
    """

    report: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def as_analysis(found: Any, where: str = "analyze") -> Analysis:
    """``analyze``'s return value as an :class:`Analysis` (None and dicts are accepted)."""
    if found is None:
        return Analysis()
    if isinstance(found, Analysis):
        return found
    if isinstance(found, dict):
        return Analysis(report=found)
    raise PlanError(f"{where} returned {type(found).__name__}; expected a dict (the report) or an Analysis")


@dataclass
class PassContext:
    """Everything a pass may use besides the model. A pass never sees the engine."""

    stage: str
    work_dir: Path
    #: the recipe's task (stackcomp.tasks.Task: head, metric, KD outputs); a task name or a GLUE
    #: TaskSpec given here is turned into its Task
    task: Any = None
    tokenizer: Any = None
    data: Any = None  # the task's data (stackcomp.tasks.TaskDataLike): loaders, calibration batches, metrics
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("stackcomp"))
    progress: Progress = NULL_PROGRESS
    #: reports of the upstream stages, by stage name, nearest parent first
    parent_reports: dict[str, dict] = field(default_factory=dict)
    #: artifact folders of the upstream stages, by stage name (files a pass wrote beside the model,
    #: e.g. ``pack``'s ``onnx/``), read-only
    upstream_dirs: dict[str, Path] = field(default_factory=dict)
    #: loads the teacher model (from an upstream stage's artifact or a model id), once
    load_teacher: Callable[[], nn.Module] | None = None
    #: the recipe as it runs (resolved YAML) and its lock (``stackcomp.lock.build_lock``, built
    #: when asked): what a model card or an export records for reproduction
    recipe_yaml: str | None = None
    load_lock: Callable[[], dict[str, Any]] | None = None
    #: what the stage measured (task metrics, latency, sizes); saved as metrics.json
    metrics: dict[str, Any] = field(default_factory=dict)
    #: what the pass reports besides ``analyze`` (choices made, per-layer results); saved in report.json
    report: dict[str, Any] = field(default_factory=dict)
    #: what this stage's ``analyze`` returned; set by the engine before ``transform`` runs
    analysis: Analysis = field(default_factory=Analysis)
    _teacher: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.task is not None and not hasattr(self.task, "kd_outputs"):
            from stackcomp.tasks import get_task

            self.task = get_task(self.task if isinstance(self.task, str) else self.task.name)

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            if self.load_teacher is None:
                raise PlanError(f"stage {self.stage!r}: this pass needs a teacher; set params.teacher")
            self._teacher = self.load_teacher()
            self._teacher.eval().requires_grad_(False)
        return self._teacher


class Pass:
    """Base class for passes. Subclasses set ``name`` and ``Params`` and override methods."""

    name: ClassVar[str]
    #: bump when the pass's results change for the same params: it invalidates cached stages
    version: ClassVar[str] = "1"
    Params: ClassVar[type[PassParams]] = PassParams
    needs: ClassVar[frozenset[str]] = frozenset()
    #: nothing may follow this pass (e.g. ``pack``)
    must_be_last: ClassVar[bool] = False
    #: pass names that must not appear upstream of this one, with the reason
    forbid_after: ClassVar[dict[str, str]] = {}
    #: the params field that names a teacher (stage name or model id), if any
    teacher_param: ClassVar[str | None] = None
    #: True if the pass produces a model (False for e.g. evaluate, which only measures)
    changes_model: ClassVar[bool] = True
    #: False if the pass never reads the task's data (``ctx.data``): its stage key then leaves out
    #: the data files' checksums, so changed data does not recompute it (e.g. ``export``)
    reads_data: ClassVar[bool] = True
    #: what a stage of this pass asks a cluster for (Ray: num_cpus, num_gpus, memory in bytes);
    #: a recipe stage's ``resources:`` overrides it. Not in the stage key.
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1}

    def __init__(self, params: PassParams | dict | None = None):
        if isinstance(params, self.Params):
            self.params = params
        else:
            self.params = self.Params.model_validate(params or {})

    def analyze(self, model: nn.Module, ctx: PassContext) -> dict:
        return {}

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        return model

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        return model

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or "").strip()


def run_pass(the_pass: Pass, model: nn.Module, ctx: PassContext, timings: dict[str, float] | None = None,
             where: str | None = None) -> nn.Module:
    """``analyze``, then ``transform`` and ``finetune`` with ``ctx.analysis`` set: what the engine
    does with a pass (it then saves the result), and what tests and notebooks call. ``timings``
    receives the seconds each method took; ``where`` names the caller in a bad-return error."""
    import time

    timings = {} if timings is None else timings
    t = time.perf_counter()
    ctx.analysis = as_analysis(the_pass.analyze(model, ctx), f"{where or the_pass.name}.analyze")
    timings["analyze"] = time.perf_counter() - t
    for method in ("transform", "finetune"):
        t = time.perf_counter()
        model = getattr(the_pass, method)(model, ctx)
        timings[method] = time.perf_counter() - t
    return model


# ----------------------------------------------------------------------------- registry

#: the methods of the contract; a pass class defines at least one of them
METHODS = ("analyze", "transform", "finetune")

_REGISTRY: dict[str, type[Pass]] | None = None
#: installed entry points that cannot be used, by name: why (import error, contract not met)
_BROKEN: dict[str, str] = {}
#: where each registered pass comes from (``package.module:Class`` or "registered in this process")
_ORIGIN: dict[str, str] = {}


def _discover() -> dict[str, type[Pass]]:
    """Load every ``stackcomp.passes`` entry point once. One that fails to import or does not
    fit the contract is remembered in ``_BROKEN`` with the reason, never raised here: a broken
    plugin only affects recipes that use it."""
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, type[Pass]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            where = f"entry point {ep.name!r} ({ep.value})"
            try:
                cls = as_pass_class(ep.load(), where)
            except PlanError as e:
                _BROKEN[ep.name] = str(e)
                continue
            except Exception as e:  # the plugin's own import failed: its bug, reported with its reason
                _BROKEN[ep.name] = f"{where} failed to import: {type(e).__name__}: {e}"
                continue
            if cls.name != ep.name:
                _BROKEN[ep.name] = f"{where}: the class's name is {cls.name!r}, not the entry point's {ep.name!r}"
                continue
            found[ep.name] = cls
            _ORIGIN[ep.name] = ep.value
        _REGISTRY = found
    return _REGISTRY


def as_pass_class(obj: Any, where: str) -> type[Pass]:
    """``obj`` as a pass class, or a :class:`PlanError` saying what in the contract it misses.

    A :class:`Pass` subclass is used as it is. Any other class fits if it has a string ``name``
    and at least one of ``analyze``/``transform``/``finetune``, and, if it declares one, a
    pydantic ``Params`` model: it gets :class:`Pass`'s defaults for what it leaves out (a
    subclass of both is made). In both cases ``Params`` is made strict (unknown keys are errors)
    if the plugin's own model is not.
    """
    if not isinstance(obj, type):
        raise PlanError(f"{where} is a {type(obj).__name__}, not a pass class")
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        raise PlanError(f"{where}: pass class {obj.__name__} has no string `name`")
    params = getattr(obj, "Params", PassParams)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise PlanError(f"{where}: {obj.__name__}.Params must be a pydantic model class (BaseModel subclass), "
                        f"got {params!r}")
    if not issubclass(obj, Pass):
        missing = [m for m in METHODS if not callable(getattr(obj, m, None))]
        if len(missing) == len(METHODS):
            raise PlanError(f"{where}: {obj.__name__} is not a stackcomp pass: it defines none of "
                            f"{', '.join(METHODS)} (subclass stackcomp.passes.base.Pass, or define them)")
        obj = type(obj.__name__, (obj, Pass), {"__module__": obj.__module__, "__qualname__": obj.__qualname__,
                                               "__doc__": obj.__doc__})
    strict = _strict_params(obj.Params)
    if strict is not obj.Params:
        obj.Params = strict
    return obj


def _strict_params(params: type[BaseModel]) -> type[BaseModel]:
    """``params`` itself if it forbids unknown keys, else a subclass that does (a misspelled key
    must never be silently ignored, whatever base the plugin's model has)."""
    if params.model_config.get("extra") == "forbid":
        return params
    return type(params.__name__, (params,), {"__module__": params.__module__, "__qualname__": params.__qualname__,
                                             "__doc__": params.__doc__,
                                             "model_config": ConfigDict(**{**params.model_config, "extra": "forbid"})})


def register_pass(cls: type) -> type[Pass]:
    """Register a pass class in this process (tests, notebooks). Plugins use entry points.
    Returns the class as the registry holds it (see :func:`as_pass_class`)."""
    cls = as_pass_class(cls, f"class {getattr(cls, '__name__', cls)!r}")
    _discover()[cls.name] = cls
    _BROKEN.pop(cls.name, None)
    _ORIGIN[cls.name] = "registered in this process"
    return cls


def available_passes() -> dict[str, type[Pass]]:
    return dict(sorted(_discover().items()))


def broken_passes() -> dict[str, str]:
    """Installed passes that cannot be used, with the reason (shown by ``stackcomp passes list``)."""
    _discover()
    return dict(sorted(_BROKEN.items()))


def pass_origin(name: str) -> str:
    _discover()
    return _ORIGIN.get(name, "")


def get_pass(name: str, allow_plugins: tuple[str, ...] = ()) -> type[Pass]:
    """Resolve a pass by registered name, or by ``module:Class`` if the recipe allows it."""
    registry = _discover()
    if name in registry:
        return registry[name]
    if ":" in name:
        if name not in allow_plugins:
            raise PlanError(
                f"pass {name!r} is a module path, not a registered pass; importing it runs its code, so it is "
                f"refused unless the recipe lists it under `allow_plugins: [{name}]`"
            )
        if not _PLUGIN_PATH.fullmatch(name):
            raise PlanError(f"pass {name!r}: expected an absolute `package.module:ClassName` path")
        module_name, _, cls_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as e:
            raise PlanError(f"cannot import pass {name!r}: {e}") from None
        except Exception as e:  # the module's own code failed: a plugin bug, reported as such
            raise PlanError(f"importing pass {name!r} failed: {type(e).__name__}: {e}") from None
        return as_pass_class(cls, f"pass {name!r}")
    if name in _BROKEN:
        raise PlanError(f"pass {name!r} is installed but cannot be used: {_BROKEN[name]}")
    known = ", ".join(sorted(registry))
    raise PlanError(f"unknown pass {name!r}; known passes: {known}")
