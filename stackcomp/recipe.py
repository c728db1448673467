"""Recipes: YAML files that describe a compression DAG, parsed into pydantic models.

Parsing runs nothing and loads no model. What happens here:

- ``yaml.safe_load`` (tags that build Python objects are refused);
- ``include:`` of other recipe files (paths relative to the including file), deep-merged
  under the including recipe;
- ``key=value`` overrides from the command line (``stages.ft.params.lr=3e-5``), values
  parsed as YAML scalars or flow lists;
- sweeps: an override whose value is a comma list (``stages.ds.params.nnz=4,8``) turns the
  stage and everything downstream of it into sibling branches, one per value;
- validation into :class:`Recipe`, with errors that name the file and the field.

Pass parameters are checked later, by the plan, against each pass's own ``Params`` model.
"""

from __future__ import annotations

import copy
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stackcomp.errors import RecipeError

MAX_INCLUDE_DEPTH = 16
MAX_SWEEP_BRANCHES = 256
MAX_RECIPE_BYTES = 4 * 2**20
STAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-\[\]=,@+]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StageResources(Strict):
    """What one stage asks a cluster for (the pass's ``resources`` fill the rest); not in its key."""

    num_cpus: float | None = Field(default=None, gt=0)
    num_gpus: float | None = Field(default=None, ge=0)
    memory: float | None = Field(default=None, gt=0, description="bytes, e.g. 4GiB")
    processes: int | None = Field(default=None, ge=1, description="processes a training stage runs as "
                                  "(accelerate, DDP); default: one per GPU asked (num_gpus), else 1")

    @field_validator("memory", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> Any:
        return parse_bytes(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_gpu_each(self) -> StageResources:
        if (self.processes or 1) > 1 and self.num_gpus and self.processes > self.num_gpus:
            raise ValueError(f"processes ({self.processes}) is more than num_gpus ({self.num_gpus:g}): "
                             "each process trains on a GPU of its own")
        return self


class ExecutorSpec(Strict):
    """Where stages run: ``local`` (this process, one at a time) or ``ray`` (a Ray cluster, every
    ready stage at once). Not in any key: both give the same artifacts."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(default=None, description="auto, ray://host:port or host:port; none: a local Ray")


class StageSpec(Strict):
    """One stage: which pass, after which stages, with which parameters."""

    pass_name: str = Field(alias="pass", min_length=1)
    after: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    resources: StageResources | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("after", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class Goal(Strict):
    """What a stack must meet to count (read by ``stackcomp compare``)."""

    metric_drop: float | None = Field(default=None, ge=0, description="max drop of the task metric, in points")
    max_bytes: float | None = Field(default=None, gt=0, description="max whole-model bytes, e.g. 20MB or 1.5GiB")
    max_latency_ms: float | None = Field(default=None, gt=0, description="max CPU latency per evaluate batch")

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> Any:
        return parse_bytes(v) if isinstance(v, str) else v


_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> float:
    """``"20MB"`` -> 2e7; decimal units (kB, MB, GB) and binary ones (KiB, MiB, GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 20MB, 1.5GB, 512KiB or a number of bytes")
    return float(m.group(1)) * _BYTE_UNITS[unit]


class Recipe(Strict):
    """A whole recipe after includes, overrides and sweeps."""

    name: str = Field(min_length=1, max_length=200)
    model: str = Field(min_length=1, description="hub id, local directory, or the alias minilm-l6")
    task: str | None = Field(default=None, description="e.g. glue/sst2")
    data: dict[str, Any] = Field(default_factory=dict, description="stackcomp.data.DataOptions fields")
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(default=False, description="allow loading pickle (.bin) weights")
    allow_plugins: list[str] = Field(default_factory=list, description="module:Class passes allowed to be imported")
    evaluate_leaves: bool = Field(default=True, description="add an evaluate stage under every leaf that has none")
    goal: Goal | None = None
    executor: ExecutorSpec | None = None
    stages: dict[str, StageSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _run_folder_name(cls, name: str) -> str:
        """The name is the run's folder (``runs/<name>``): it must stay one folder inside ``runs/``."""
        if any(c in "/\\" or unicodedata.category(c) == "Cc" for c in name) or not name.strip("."):
            raise ValueError(f"recipe name {name!r} names the run folder runs/<name>: it may not hold / or \\ or "
                             "control characters, nor be only dots (like '..')")
        return name

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        for name in stages:
            if not STAGE_NAME.match(str(name)):
                raise ValueError(f"stage name {name!r} may use only letters, digits and _ . - [ ] = , @ +")
        return stages

    @model_validator(mode="after")
    def _data_options(self) -> Recipe:
        from stackcomp.data import DataOptions

        try:
            DataOptions.model_validate(self.data)
        except ValidationError as e:
            raise ValueError(_format_validation(e, prefix="data", model=DataOptions)) from None
        return self

    def data_options(self) -> Any:
        from stackcomp.data import DataOptions

        # the recipe's seed drives sample caps and shuffling unless data: sets its own
        return DataOptions.model_validate({"seed": self.seed, **self.data})

    def to_yaml(self) -> str:
        raw = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, include, override, sweep and validate a recipe file."""
    path = Path(path)
    raw = _load_with_includes(path, stack=())
    if isinstance(raw, dict) and "search" in raw:
        raise RecipeError(f"{path}: a search space (it has `search:`), not a recipe; run `stackcomp search {path}`")
    return recipe_from_dict(raw, overrides, source=str(path))


def recipe_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "<recipe>") -> Recipe:
    # top-level x-* keys hold YAML anchors for reuse (as in docker-compose); they are not fields
    raw = {k: copy.deepcopy(v) for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}
    sweeps: list[tuple[list[str], list[Any]]] = []
    for item in overrides:
        keys, values = parse_override(item)
        keys = _join_stage_name(keys, raw.get("stages"))
        if len(values) == 1:
            _set_path(raw, keys, values[0], item)
        else:
            sweeps.append((keys, values))
    if sweeps:
        raw = _expand_sweeps(raw, sweeps)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_format_validation(e, model=Recipe)}") from None


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (the first would be silently dropped)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if path.exists() and not path.is_dir() and not path.is_file():
            raise RecipeError(f"recipe path is not a regular file (a device or pipe?): {path}")
        if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path} is larger than {MAX_RECIPE_BYTES // 2**20} MiB; recipes are small files")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe path is a directory, expected a YAML file: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.constructor.ConstructorError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        if "constructor for the tag" in (e.problem or ""):
            raise RecipeError(
                f"{path}:{where} YAML tag refused ({e.problem}); recipes are plain data, tags that build objects "
                "are not allowed (write the value without the !tag)"
            ) from None
        raise RecipeError(f"{path}:{where} invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}:{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, model, stages; got {type(data).__name__}")
    return data


def _load_with_includes(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise RecipeError(f"include cycle: {chain}")
    if len(stack) >= MAX_INCLUDE_DEPTH:
        raise RecipeError(f"{path}: includes nested deeper than {MAX_INCLUDE_DEPTH}")
    data = _read_yaml(path)
    includes = data.pop("include", None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise RecipeError(f"{path}: include: expected a file path or a list of paths")
    base: dict[str, Any] = {}
    for inc in includes:
        inc_path = (path.parent / inc) if not Path(inc).is_absolute() else Path(inc)
        if not inc_path.exists():
            raise RecipeError(f"{path}: include: file not found: {inc_path}")
        base = deep_merge(base, _load_with_includes(inc_path, (*stack, resolved)))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ----------------------------------------------------------------------------- overrides and sweeps


def parse_override(item: str) -> tuple[list[str], list[Any]]:
    """``a.b.c=value`` -> (["a","b","c"], [value]); a comma list outside brackets is a sweep."""
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected key=value, e.g. stages.ft.params.lr=3e-5")
    key, _, text = item.partition("=")
    keys = [k for k in key.strip().split(".")]
    if not key.strip() or any(not k for k in keys):
        raise RecipeError(f"override {item!r}: the key must be a dotted path like stages.ft.params.lr")
    parts = _split_top_level_commas(text)
    return keys, [_parse_scalar(p, item) for p in parts]


def _split_top_level_commas(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts if len(parts) > 1 else [text]


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _parse_scalar(text: str, item: str) -> Any:
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise RecipeError(f"override {item!r}: cannot parse value {text!r}") from None
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-5 (no dot) as a string
    return value


def _join_stage_name(keys: list[str], stages: Any) -> list[str]:
    """``stages.ds2.8x.params.nnz`` -> ["stages", "ds2.8x", "params", "nnz"]: stage names may hold
    dots; the shortest run of segments that names an existing stage is taken as the name."""
    if len(keys) < 3 or keys[0] != "stages" or not isinstance(stages, dict) or keys[1] in stages:
        return keys
    for j in range(3, len(keys) + 1):
        name = ".".join(keys[1:j])
        if name in stages:
            return ["stages", name, *keys[j:]]
    return keys


def _set_path(raw: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    node: Any = raw
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {'.'.join(keys[:i])} is not a mapping")
        if k not in node or node[k] is None:
            if keys[0] == "stages" and i == 1:
                raise RecipeError(f"override {item!r}: no stage named {k!r} (stages: {', '.join(map(str, node))})")
            node[k] = {}
        node = node[k]
    if not isinstance(node, dict):
        raise RecipeError(f"override {item!r}: {'.'.join(keys[:-1])} is not a mapping")
    node[keys[-1]] = value


def _expand_sweeps(raw: dict[str, Any], sweeps: list[tuple[list[str], list[Any]]]) -> dict[str, Any]:
    """Each sweep clones its stage and all stages downstream of it, once per value."""
    stages = raw.get("stages")
    if not isinstance(stages, dict):
        raise RecipeError("a sweep needs a recipe with stages")
    total = 1
    for keys, values in sweeps:
        if len(keys) < 3 or keys[0] != "stages":
            raise RecipeError(
                f"sweep over {'.'.join(keys)}: only stage keys can be swept (stages.NAME.params.KEY=v1,v2)"
            )
        if keys[1] not in stages:
            raise RecipeError(f"sweep over {'.'.join(keys)}: no stage named {keys[1]!r}")
        total *= len(values)
    if total > MAX_SWEEP_BRANCHES:
        raise RecipeError(f"the sweeps make {total} branches; at most {MAX_SWEEP_BRANCHES} are allowed")

    seen: set[str] = set()
    for keys, _ in sweeps:
        dotted = ".".join(keys)
        if dotted in seen:
            raise RecipeError(f"sweep over {dotted}: swept twice; give all its values in one list (v1,v2,...)")
        seen.add(dotted)

    # a stage renamed by an earlier sweep (a clone, e.g. ds[lr=1e-4]) is swept in every clone
    origin = {n: n for n in stages}
    for keys, values in sweeps:
        for root in [n for n in raw["stages"] if origin.get(n) == keys[1]]:
            raw["stages"] = _sweep_one(raw["stages"], root, keys, values, origin)
    return raw


def _sweep_one(stages: dict[str, Any], root: str, keys: list[str], values: list[Any],
               origin: dict[str, str]) -> dict[str, Any]:
    """Clone ``root`` and its descendants once per value, setting ``keys[2:]`` in each clone of root."""
    downstream = _downstream(stages, root)
    new_stages: dict[str, Any] = {n: s for n, s in stages.items() if n not in downstream}
    label = keys[-1]
    for value in values:
        suffix = f"[{label}={_short(value)}]"
        rename = {n: n + suffix for n in downstream}
        for n in downstream:
            spec = copy.deepcopy(stages[n])
            if isinstance(spec, dict):
                after = spec.get("after")
                if isinstance(after, str):
                    spec["after"] = rename.get(after, after)
                elif isinstance(after, list):
                    spec["after"] = [rename.get(a, a) if isinstance(a, str) else a for a in after]
                params = spec.get("params")
                if isinstance(params, dict) and isinstance(params.get("teacher"), str):
                    params["teacher"] = rename.get(params["teacher"], params["teacher"])
            if rename[n] in new_stages:
                raise RecipeError(f"sweep over {'.'.join(keys)}: the branch {rename[n]!r} would exist twice (a value "
                                  "repeated, or a stage already has that name); give distinct values")
            new_stages[rename[n]] = spec
            origin[rename[n]] = origin.get(n, n)
        sub = {"stages": {rename[root]: new_stages[rename[root]]}}
        _set_path(sub, ["stages", rename[root], *keys[2:]], value, ".".join(keys))
    return new_stages


def _downstream(stages: dict[str, Any], root: str) -> list[str]:
    children: dict[str, list[str]] = {}
    for name, spec in stages.items():
        after = spec.get("after") if isinstance(spec, dict) else None
        parents = [after] if isinstance(after, str) else (after if isinstance(after, list) else [])
        for p in parents:
            if isinstance(p, str):
                children.setdefault(p, []).append(name)
    seen, todo = [], [root]
    while todo:
        n = todo.pop()
        if n in seen:
            continue  # a cycle; the plan reports it
        seen.append(n)
        todo.extend(children.get(n, []))
    return seen


def _short(value: Any) -> str:
    """The value as it appears in a branch name: ``ds[nnz=4]``."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9_.\-,=+@]", "", text)[:40]


# ----------------------------------------------------------------------------- errors


def _format_validation(e: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """The first errors as ``loc: message`` on one line. An unknown field names the closest valid
    one of ``model`` (the class that was validated) at its place; a bad value is echoed."""
    msgs = []
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
            guess = _closest_field(model, err["loc"]) if model is not None else None
            if guess:
                msg += f" (did you mean {guess!r}?)"
        elif err["type"] != "missing" and isinstance(err.get("input"), _SCALARS):
            shown = _echo(err["input"])
            if shown not in msg:
                msg += f", got {shown}"
        msgs.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(e.errors()) - 5} more)" if len(e.errors()) > 5 else ""
    return "; ".join(msgs) + more


#: values a type error echoes; a list or mapping is not (a YAML alias bomb would take forever to print)
_SCALARS = (str, bytes, int, float, bool)


def _echo(value: Any, width: int = 40) -> str:
    if isinstance(value, int) and abs(value).bit_length() > 256:
        return f"an integer of {abs(value).bit_length()} bits"  # str() of a huge int is refused by Python
    text = repr(value[: width + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _closest_field(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The valid field name nearest to ``loc[-1]`` among the models that sit at ``loc[:-1]``."""
    import difflib

    candidates = [model]
    for part in loc[:-1]:
        inner = [m for c in candidates if isinstance(part, str) and part in c.model_fields
                 for m in _models_in(c.model_fields[part].annotation)]
        if inner:
            candidates = inner
        # else: a list index, dict key or union member tag: the element models are already the candidates
    names = {alias for c in candidates for name, f in c.model_fields.items() for alias in (name, f.alias) if alias}
    found = difflib.get_close_matches(str(loc[-1]), sorted(names), n=1, cutoff=0.6)
    if not found:  # a setting of a nested config given one level too high (``batch_sise`` for ``train.batch_size``)
        nested = {f"{name}.{inner}": inner for c in candidates for name, f in c.model_fields.items()
                  for m in _models_in(f.annotation) for inner in m.model_fields}
        close = difflib.get_close_matches(str(loc[-1]), sorted(set(nested.values())), n=1, cutoff=0.6)
        found = [path for path, inner in sorted(nested.items()) if close and inner == close[0]][:1]
    return found[0] if found else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models an annotation holds: ``X``, ``X | None``, ``list[X]``, ``dict[str, X]``."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
