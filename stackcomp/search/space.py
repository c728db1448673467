"""Search spaces: a recipe's fixed prefix plus a ``search:`` section, and how a trial's sampled
choices become an ordinary recipe.

A space file is a recipe (model, task, data, seed, ``stages:`` with e.g. a fine-tune; includes
and ``x-*`` anchors work as in recipes) with a ``search:`` section::

    search:
      after: ft                    # the searched chain starts from this prefix stage
      objectives: [metric, bytes]  # metric is maximized; bytes and latency minimized
      goal: {max_bytes: 20MB, metric_drop: 1.0}
      slots:                       # in order; each is at most one stage of the chain
        - name: factor
          optional: true           # the chain may skip it
          choices:
            lowrank: {params: {ratio: {low: 1.5, high: 4.0, log: true}}}
            ds_factorize: {params: {ratio: {low: 1.5, high: 4.0}, nnz: [4, 8]}}
        - name: pack
          choices: {pack: {params: {target: cpu}}}

A param value is a range ``{low, high, log?, step?}`` (ints when both bounds are ints), a list
of choices, ``{value: X}`` for a literal (a list-valued param), a nested mapping searched key by
key (``train: {epochs: {low: 0.25, high: 1}}``), or any other fixed value.

Parsing checks the space's own fields (strict, one-line errors naming the field) and the prefix
with the planner. Whether a sampled chain is valid (orders a pass forbids, needs) is the
planner's call at sampling time (:mod:`stackcomp.search.study`).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stackcomp.errors import RecipeError, StackcompError
from stackcomp.recipe import (
    STAGE_NAME,
    Goal,
    Recipe,
    _format_validation,
    _load_with_includes,
    recipe_from_dict,
)

#: objective name -> Optuna direction
OBJECTIVES = {"metric": "maximize", "bytes": "minimize", "latency": "minimize"}
#: the value of a slot's choice when an optional slot is left out of the chain
SKIP = "skip"


class SearchSpaceError(RecipeError):
    """The search space file is malformed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PassChoice(_Strict):
    """One pass a slot may hold, with its params: fixed values, ranges or lists of choices."""

    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class Slot(_Strict):
    """A place in the chain: one of ``choices`` (pass name -> params), or nothing if optional."""

    name: str = Field(min_length=1, description="the stage name of this slot in every trial recipe")
    optional: bool = False
    choices: dict[str, PassChoice | None] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _stage_name(cls, v: str) -> str:
        if not STAGE_NAME.match(v):
            raise ValueError(f"slot name {v!r} is a stage name: letters, digits and _ . - [ ] = , @ + only")
        return v

    @field_validator("choices")
    @classmethod
    def _filled(cls, v: dict[str, PassChoice | None]) -> dict[str, PassChoice]:
        if SKIP in v:
            raise ValueError(f"{SKIP!r} is reserved for a left-out optional slot; use optional: true")
        return {k: c or PassChoice() for k, c in v.items()}


class Pruning(_Strict):
    """When a trial's training is stopped as hopeless (see :mod:`stackcomp.search.pruning`)."""

    enabled: bool = True
    min_metric: float | None = Field(default=None, description="absolute floor of the metric (a fraction, 0.8 = 80%)")
    slack: float = Field(default=2.0, ge=0, description="points below the goal's floor still allowed while training")
    warmup_evals: int = Field(default=1, ge=1, description="evaluations of a stage before it may be pruned")


class SearchSpec(_Strict):
    """The ``search:`` section."""

    after: str = Field(min_length=1, description="prefix stage the searched chain starts from")
    slots: list[Slot] = Field(min_length=1)
    objectives: list[str] = Field(default_factory=lambda: ["metric", "bytes"], min_length=1)
    metric: str | None = Field(default=None, description="the task metric (default: the task's main metric)")
    goal: Goal | None = None
    evaluate: dict[str, Any] = Field(default_factory=dict, description="params of each trial's evaluate stage")
    pruning: Pruning = Field(default_factory=Pruning)
    startup_trials: int = Field(default=10, ge=1, description="random trials before TPE models the results")
    seed: int | None = Field(default=None, ge=0, description="sampler seed (default: the recipe's seed)")
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list,
        description="stacks the search tries first (e.g. hand-written ones, under the same caps): "
                    "slot -> pass, or slot -> {pass: {param: value}}; slots left out are skipped")

    @field_validator("objectives")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for o in v:
            if o not in OBJECTIVES:
                raise ValueError(f"unknown objective {o!r}; use {', '.join(OBJECTIVES)}")
        if len(set(v)) != len(v):
            raise ValueError("an objective is listed twice")
        return v

    @field_validator("pruning", mode="before")
    @classmethod
    def _bool(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _unique_slots(self) -> SearchSpec:
        names = [s.name for s in self.slots]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"slot names must differ: {', '.join(dup)} given twice")
        return self


class SearchSpace:
    """A parsed space: the prefix recipe (as raw data and validated), the ``search:`` section."""

    def __init__(self, prefix: dict[str, Any], spec: SearchSpec, source: str):
        self.prefix = prefix
        self.spec = spec
        self.source = source
        self.recipe: Recipe = recipe_from_dict(prefix, source=source)
        self.name = self.recipe.name
        self.enqueued: list[dict[str, Any]] = []  # search.enqueue as Optuna params (set by _check)

    @property
    def goal(self) -> Goal | None:
        return self.spec.goal or self.recipe.goal

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.spec.objectives]

    def trial_recipe(self, number: int, chain: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
        """The recipe of a trial: the prefix stages ``after`` needs, the chain ``(slot, pass,
        params)`` after it, and an evaluate leaf."""
        raw = copy.deepcopy(self.prefix)
        raw["name"] = f"{self.name}-t{number}"
        raw["stages"] = {n: s for n, s in raw["stages"].items() if n in self._kept}
        if self.goal is not None:
            raw["goal"] = self.goal.model_dump(exclude_none=True)
        parent = self.spec.after
        for slot, pass_name, params in chain:
            raw["stages"][slot] = {"pass": pass_name, "after": parent, "params": params}
            parent = slot
        raw["stages"][f"{parent}.eval"] = {"pass": "evaluate", "after": parent, "params": dict(self.spec.evaluate)}
        return raw

    def _check(self) -> None:
        from stackcomp.passes.base import get_pass
        from stackcomp.plan import build_plan

        spec = self.spec
        if spec.after not in self.recipe.stages:
            raise SearchSpaceError(f"{self.source}: search.after: no stage {spec.after!r} in the prefix "
                                   f"(stages: {', '.join(self.recipe.stages)})")
        for slot in spec.slots:
            if slot.name in self.recipe.stages:
                raise SearchSpaceError(f"{self.source}: search.slots: slot {slot.name!r} has the name of a prefix "
                                       "stage; give it another")
            for pass_name, choice in slot.choices.items():
                where = f"{self.source}: search.slots.{slot.name}.choices.{pass_name}"
                try:
                    cls = get_pass(pass_name, tuple(self.recipe.allow_plugins))
                except StackcompError as e:
                    raise SearchSpaceError(f"{where}: {e}") from None
                for param in choice.params:
                    if param not in cls.Params.model_fields:
                        near = difflib.get_close_matches(param, list(cls.Params.model_fields), n=1)
                        hint = f" (did you mean {near[0]!r}?)" if near else ""
                        raise SearchSpaceError(f"{where}.params.{param}: pass {pass_name} has no such param{hint}")
                _check_values(choice.params, f"{where}.params")
        plan = build_plan(self.recipe)  # the prefix must be a valid plan on its own
        self._kept = set(plan.select([spec.after]).stages)
        self.enqueued = [enqueued_params(self, entry, f"{self.source}: search.enqueue[{i}]")
                         for i, entry in enumerate(spec.enqueue)]

    @property
    def slot_names(self) -> list[str]:
        return [s.name for s in self.spec.slots]


def load_space(path: str | Path) -> SearchSpace:
    """Read a space file (includes resolved), validate ``search:`` and the prefix."""
    path = Path(path)
    raw = _load_with_includes(path, stack=())
    return space_from_dict(raw, source=str(path))


def space_from_dict(raw: dict[str, Any], source: str = "<space>") -> SearchSpace:
    raw = dict(raw)
    section = raw.pop("search", None)
    if section is None:
        raise SearchSpaceError(f"{source}: a search space needs a `search:` section (after, slots, objectives, goal)")
    if not isinstance(section, dict):
        raise SearchSpaceError(f"{source}: search: expected a mapping, got {type(section).__name__}")
    try:
        spec = SearchSpec.model_validate(section)
    except ValidationError as e:
        raise SearchSpaceError(f"{source}: {_format_validation(e, prefix='search', model=SearchSpec)}") from None
    if spec.goal is not None and raw.get("goal"):
        raise SearchSpaceError(f"{source}: goal: given both at the top and under search:; keep one")
    space = SearchSpace(raw, spec, source)
    space._check()
    return space


# ----------------------------------------------------------------------------- param specs


def is_range(v: Any) -> bool:
    return isinstance(v, dict) and {"low", "high"} <= set(v) and set(v) <= {"low", "high", "log", "step"}


def is_int_range(v: dict[str, Any]) -> bool:
    """A range sampled as integers: both bounds integers and no float step."""
    return isinstance(v["low"], int) and isinstance(v["high"], int) and not isinstance(v.get("step", 1), float)


def is_literal(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"value"}


def _check_values(params: dict[str, Any], where: str) -> None:
    for k, v in params.items():
        if is_range(v):
            lo, hi = v["low"], v["high"]
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)) or lo > hi:
                raise SearchSpaceError(f"{where}.{k}: a range needs numbers low <= high, got {v!r}")
            if v.get("log") and lo <= 0:
                raise SearchSpaceError(f"{where}.{k}: a log range needs low > 0, got {lo!r}")
        elif isinstance(v, list) and not v:
            raise SearchSpaceError(f"{where}.{k}: an empty list of choices")
        elif isinstance(v, dict) and not is_literal(v):
            _check_values(v, f"{where}.{k}")


def sample_params(trial: Any, prefix: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with every range and list replaced by the trial's pick (named ``prefix.key``)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        name = f"{prefix}.{k}"
        if is_range(v):
            if is_int_range(v):
                out[k] = trial.suggest_int(name, v["low"], v["high"], log=bool(v.get("log")), step=v.get("step") or 1)
            else:
                out[k] = trial.suggest_float(name, float(v["low"]), float(v["high"]), log=bool(v.get("log")),
                                             step=v.get("step"))
        elif is_literal(v):
            out[k] = copy.deepcopy(v["value"])
        elif isinstance(v, list):
            if all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
                out[k] = trial.suggest_categorical(name, v)
            else:  # Optuna stores plain values only: pick an index among lists/mappings
                out[k] = copy.deepcopy(v[trial.suggest_categorical(name, list(range(len(v))))])
        elif isinstance(v, dict):
            out[k] = sample_params(trial, name, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def sample_chain(space: SearchSpace, trial: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """The trial's chain: for each slot a pass (or nothing) and its params."""
    chain = []
    for slot in space.spec.slots:
        options = list(slot.choices) + ([SKIP] if slot.optional else [])
        pick = trial.suggest_categorical(slot.name, options) if len(options) > 1 else options[0]
        if pick == SKIP:
            continue
        chain.append((slot.name, pick, sample_params(trial, f"{slot.name}.{pick}", slot.choices[pick].params)))
    return chain


# ----------------------------------------------------------------------------- enqueued stacks

_FIXED = object()  # a param the space fixes: nothing to enqueue


def searched_dims(prefix: str, params: dict[str, Any]) -> dict[str, Any]:
    """The dimensions ``sample_params`` asks the sampler for, by Optuna name, with their specs
    (a range or a list); fixed values map to ``("fixed", value)``."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        name = f"{prefix}.{k}"
        if is_range(v) or isinstance(v, list):
            out[name] = v
        elif is_literal(v):
            out[name] = ("fixed", v["value"])
        elif isinstance(v, dict):
            out.update(searched_dims(name, v))
        else:
            out[name] = ("fixed", v)
    return out


def _flatten(values: Any, prefix: str, dims: dict[str, Any]) -> dict[str, Any]:
    """``{student: {cut: {num_layers: 3}}}`` and ``{student.cut.num_layers: 3}`` -> dotted names;
    a mapping stays whole where the space has one dimension for it (a list of mappings)."""
    if not isinstance(values, dict) or prefix in dims:
        return {prefix: values}
    out: dict[str, Any] = {}
    for k, v in values.items():
        out.update(_flatten(v, f"{prefix}.{k}", dims))
    return out


def _dim_value(name: str, spec: Any, value: Any, where: str) -> Any:
    """The value Optuna stores for ``name`` when a stack asks for ``value`` (an index for a list
    of lists or mappings), or a clear error when the space does not hold it."""
    if isinstance(spec, tuple):
        if value != spec[1]:
            raise SearchSpaceError(f"{where}: {name} is fixed at {spec[1]!r} in the space; {value!r} cannot be tried")
        return _FIXED
    if is_range(spec):
        ints = is_int_range(spec)
        ok_type = isinstance(value, int) if ints else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not spec["low"] <= value <= spec["high"]:
            kind = "an integer" if ints else "a number"
            raise SearchSpaceError(f"{where}: {name} = {value!r}: expected {kind} in [{spec['low']}, {spec['high']}]")
        return value
    if all(x is None or isinstance(x, (bool, int, float, str)) for x in spec):
        if value not in spec:
            raise SearchSpaceError(f"{where}: {name} = {value!r}: not one of the space's choices {spec!r}")
        return value
    for i, choice in enumerate(spec):
        if choice == value:
            return i
    raise SearchSpaceError(f"{where}: {name} = {value!r}: not one of the space's choices {spec!r}")


def enqueued_params(space: SearchSpace, entry: Any, where: str) -> dict[str, Any]:
    """A stack of ``search.enqueue`` as the Optuna params of a trial (``study.enqueue_trial``):
    each named slot's pass and the values given for its searched params. What the entry leaves
    open is sampled as usual; a slot it leaves out is skipped (an error for a required slot)."""
    if not isinstance(entry, dict):
        raise SearchSpaceError(f"{where}: expected a mapping slot -> pass, got {type(entry).__name__}")
    slots = {s.name: s for s in space.spec.slots}
    unknown = sorted(set(entry) - set(slots))
    if unknown:
        raise SearchSpaceError(f"{where}: no slot {unknown[0]!r} (slots: {', '.join(slots)})")
    out: dict[str, Any] = {}
    for slot in space.spec.slots:
        given = entry.get(slot.name)
        options = list(slot.choices) + ([SKIP] if slot.optional else [])
        if given is None or given == SKIP:
            if not slot.optional:
                raise SearchSpaceError(f"{where}: slot {slot.name!r} is required; name one of "
                                       f"{', '.join(slot.choices)}")
            out[slot.name] = SKIP
            continue
        if isinstance(given, str):
            pass_name, values = given, {}
        elif isinstance(given, dict) and len(given) == 1:
            (pass_name, values), = given.items()
            values = values or {}
        else:
            raise SearchSpaceError(f"{where}.{slot.name}: write a pass name or {{pass: {{param: value}}}}, "
                                   f"got {given!r}")
        if pass_name not in slot.choices:
            raise SearchSpaceError(f"{where}.{slot.name}: {pass_name!r} is not a choice of this slot "
                                   f"(choices: {', '.join(slot.choices)})")
        if len(options) > 1:
            out[slot.name] = pass_name
        head = f"{slot.name}.{pass_name}"
        dims = searched_dims(head, slot.choices[pass_name].params)
        for name, value in _flatten(values, head, dims).items():
            if name not in dims:
                near = difflib.get_close_matches(name, list(dims), n=1)
                hint = f" (did you mean {near[0][len(head) + 1:]!r}?)" if near else ""
                raise SearchSpaceError(f"{where}.{slot.name}.{pass_name}: {name[len(head) + 1:]!r} is not a param "
                                       f"of this choice in the space{hint}")
            stored = _dim_value(name, dims[name], value, f"{where}.{slot.name}.{pass_name}")
            if stored is not _FIXED:
                out[name] = stored
    return out
