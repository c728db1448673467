"""The pass contract and the registry of passes.

A pass is a class with a ``name``, a pydantic ``Params`` model and three methods, each given
the model and a :class:`PassContext`:

- ``analyze(model, ctx) -> dict``: reads, never changes (sizes, errors, warnings);
- ``transform(model, ctx) -> model``: the structural change;
- ``finetune(model, ctx) -> model``: training that belongs to the pass (optional).

Passes register by entry point (group ``stackcomp.passes``) or are named in a recipe as
``module.path:ClassName`` (allowed only when the recipe lists them under ``allow_plugins``).
A pass declares what it needs (``needs``) and where it may stand (``must_be_last``,
``forbid_after``); the plan checks these before anything runs.
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
from pydantic import BaseModel, ConfigDict
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


class PassParams(BaseModel):
    """Base for every pass's parameters: unknown keys and NaN/Inf numbers are errors, not silently used."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass
class PassContext:
    """Everything a pass may use besides the model. A pass never sees the engine."""

    stage: str
    work_dir: Path
    task: Any = None  # stackcomp.data.TaskSpec
    tokenizer: Any = None
    data: Any = None  # stackcomp.data.TaskData: train/eval loaders, calibration batches
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("stackcomp"))
    progress: Progress = NULL_PROGRESS
    #: reports of the upstream stages, by stage name, nearest parent first
    parent_reports: dict[str, dict] = field(default_factory=dict)
    #: loads the teacher model (from an upstream stage's artifact or a model id), once
    load_teacher: Callable[[], nn.Module] | None = None
    #: what the stage measured (task metrics, latency, sizes); saved as metrics.json
    metrics: dict[str, Any] = field(default_factory=dict)
    #: what the pass reports besides ``analyze`` (choices made, per-layer results); saved in report.json
    report: dict[str, Any] = field(default_factory=dict)
    _teacher: nn.Module | None = None

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


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Pass]] | None = None
_ENTRY_POINT_ERRORS: dict[str, str] = {}


def _discover() -> dict[str, type[Pass]]:
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, type[Pass]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = ep.load()
            except Exception as e:  # a broken plugin must not break every other pass
                _ENTRY_POINT_ERRORS[ep.name] = f"{type(e).__name__}: {e}"
                continue
            _check_pass_class(cls, f"entry point {ep.name!r} ({ep.value})")
            found[ep.name] = cls
        _REGISTRY = found
    return _REGISTRY


def _check_pass_class(cls: Any, where: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PlanError(f"{where} is not a stackcomp Pass subclass")
    if not isinstance(getattr(cls, "name", None), str):
        raise PlanError(f"{where}: pass class {cls.__name__} has no string `name`")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Register a pass class in this process (tests, notebooks). Plugins use entry points."""
    _check_pass_class(cls, f"class {cls.__name__}")
    _discover()[cls.name] = cls
    return cls


def available_passes() -> dict[str, type[Pass]]:
    return dict(sorted(_discover().items()))


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
        _check_pass_class(cls, f"pass {name!r}")
        return cls
    if name in _ENTRY_POINT_ERRORS:
        raise PlanError(f"pass {name!r} is installed but failed to load: {_ENTRY_POINT_ERRORS[name]}")
    known = ", ".join(sorted(registry))
    raise PlanError(f"unknown pass {name!r}; known passes: {known}")
