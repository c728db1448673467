"""Comparing stacks: every leaf model of some runs, as leaderboard rows with the evidence.

Reads what runs left on disk (``summary.json``, ``recipe.resolved.yaml``, ``lock.json`` and
each stage's artifact) and builds, for every model a leaf of a run measures:

- the task metric, and its change in points against the *uncompressed parent*: the last stage
  before the first compressing stage of the path (e.g. ``finetune``), or the source model;
- bytes (whole model and linear layers, exact, from ``stackcomp.evaluate.size_report``),
  compression ratios, CPU latency (GPU where a pass measured it), seconds spent along the path;
- Pareto marks (higher metric with fewer bytes; higher metric with less latency);
- per-stage attribution along the path: what each stage changed in metric, bytes, latency;
- whether the row meets the run's ``goal:`` (or one given on the command line).

A stage *compresses* if its model's weights file is smaller than its parent's (by 3% or more)
or its layer manifest holds more compressed layers than its parent's (a pass that only
repacks layers, e.g. ``pack``, counts only if it shrinks the weights). A row's *method*
names the compressing passes of its path (``ds_factorize``, ``distill+ds_factorize``; with a
pass's ``method`` param where the rows differ in it: ``lowrank:svd``), or ``uncompressed``.

Nothing here runs a pass. Stages that measured no size get one computed from their artifact
(``load_sizes``, on by default: size is a property of the weights, not a measurement).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stackcomp import rundir
from stackcomp.errors import ArtifactError, RecipeError, StackcompError
from stackcomp.lock import read_lock
from stackcomp.rundir import (
    CHECKSUMS,
    MANIFEST,
    METRICS,
    MODEL_DIR,
    REPORT,
    STAGE,
    TIMINGS,
    WEIGHTS,
    RunDir,
    read_json,
)

log = logging.getLogger("stackcomp.report")

JSON_SCHEMA = "stackcomp-compare-1"
UNCOMPRESSED = "uncompressed"
#: a weights file this much smaller than its parent's means the stage compressed the model
SHRINK = 0.97
#: metric keys a pass may write for GPU latency (the evaluate pass measures CPU only)
GPU_LATENCY_KEYS = ("gpu_latency_ms_per_batch", "latency_gpu_ms_per_batch")
_GOAL_EPS = 1e-9


# ----------------------------------------------------------------------------- finding runs


def resolve_run_dir(target: str | Path) -> Path:
    """A run directory from a run directory, its ``summary.json``, or a recipe file that was run
    (``stackcomp.rundir.resolve_run_dir``); for a recipe file edited since, a warning says so."""
    run_dir = rundir.resolve_run_dir(target)
    path = Path(target).expanduser()
    if path.is_file() and path.suffix.lower() in rundir.RECIPE_SUFFIXES:
        _warn_if_stale(path, run_dir)
    return run_dir


#: recipe fields every stage's key depends on (the plan's source)
_SOURCE_FIELDS = ("model", "task", "data", "seed", "trust_remote_code")


def changed_stages(before: dict[str, Any], after: dict[str, Any], run_stages: list[dict[str, Any]] = ()) -> list[str]:
    """Stages of recipe ``after`` whose work differs from recipe ``before`` (both resolved recipes
    as dicts): new stages, stages with another pass, params or parents, and everything downstream
    of those (teachers included); every stage when the model, task, data or seed changed. Stages
    the run added (``<leaf>.eval``, in ``run_stages``) follow their parents. Compares recipes as
    data: nothing is planned, so a new version of a pass is not seen."""
    new = after.get("stages") or {}
    old = before.get("stages") or {}
    if not isinstance(new, dict) or not isinstance(old, dict):
        return []
    names = list(new)
    for s in run_stages:
        if s.get("stage") not in new:
            names.append(s.get("stage"))
    inputs = {n: _inputs(new[n], new) for n in new}
    inputs.update({s.get("stage"): list(s.get("parents") or []) for s in run_stages if s.get("stage") not in new})
    if any(before.get(f) != after.get(f) for f in _SOURCE_FIELDS):
        return names
    changed = {n for n in new if n not in old or new[n] != old[n]}
    grew = True
    while grew:
        grew = False
        for n in names:
            if n not in changed and any(p in changed for p in inputs.get(n, [])):
                changed.add(n)
                grew = True
    return [n for n in names if n in changed]


def _inputs(spec: Any, stages: dict[str, Any]) -> list[str]:
    """The stages a stage spec depends on: its ``after`` and a ``teacher`` that names a stage."""
    if not isinstance(spec, dict):
        return []
    after = spec.get("after") or []
    out = [after] if isinstance(after, str) else [a for a in after if isinstance(a, str)]
    teacher = (spec.get("params") or {}).get("teacher") if isinstance(spec.get("params"), dict) else None
    if isinstance(teacher, str) and teacher in stages:
        out.append(teacher)
    return out


def _warn_if_stale(path: Path, run_dir: Path) -> None:
    from stackcomp.recipe import load_recipe

    files = RunDir(run_dir)
    try:
        now = yaml.safe_load(load_recipe(path).to_yaml())
        then = yaml.safe_load(files.read_resolved_recipe()) or {}
        done = files.read_summary()["stages"]
        changed = changed_stages(then, now, done) if isinstance(then, dict) else []
    except (StackcompError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return
    if changed:
        log.warning("%s holds an earlier run of %s: stages %s changed since; showing the run as it is "
                    "(stackcomp run %s to update it)", run_dir, path, ", ".join(changed[:5]), path)


# ----------------------------------------------------------------------------- one run on disk


@dataclass
class StageRecord:
    name: str
    pass_name: str
    key: str
    parents: list[str]
    leaf: bool
    changes_model: bool
    seconds: float
    metrics: dict[str, Any]
    weights_bytes: int | None = None
    layer_types: dict[str, int] | None = None
    report: dict[str, Any] | None = None
    params: dict[str, Any] | None = None


class Run:
    """One run directory: its summary, resolved recipe, lock, and stage artifacts."""

    def __init__(self, run_dir: str | Path, label: str | None = None):
        self.dir = Path(run_dir)
        self.files = RunDir(self.dir)
        try:
            self.summary = self.files.read_summary()
            stages = self.summary["stages"]
        except (KeyError, TypeError):
            raise ArtifactError(f"{self.files.summary_path}: not a stackcomp run summary") from None
        self.recipe_text = self.files.read_resolved_recipe()
        self.recipe = yaml.safe_load(self.recipe_text) if self.recipe_text else {}
        if not isinstance(self.recipe, dict):
            raise ArtifactError(f"{self.files.resolved_recipe_path}: not a recipe mapping")
        self.lock = read_lock(self.dir)
        self.name = str(self.summary.get("recipe") or self.dir.name)
        self.label = label or self.name
        self.task = self.recipe.get("task")
        self.goal = _goal(self.recipe.get("goal"), self.files.resolved_recipe_path)
        self.stages: dict[str, StageRecord] = {}
        for s in stages:
            self.stages[s["stage"]] = self._record(s)

    def artifact(self, name: str) -> Path:
        return self._artifact_path(self.stages[name].key)

    def _artifact_path(self, key: str) -> Path:
        """``<run>/artifacts/<key>``, or the shared cache the run used (summary's ``artifacts_dir``)."""
        return self.files.find_artifact(key, self.summary)

    def _record(self, s: dict[str, Any]) -> StageRecord:
        folder = self._artifact_path(s["key"])
        info = _try_json(folder / STAGE) or {}
        timings = _try_json(folder / TIMINGS)
        seconds = float(sum(v for v in timings.values() if isinstance(v, (int, float)))) if timings else \
            float(s.get("seconds") or 0.0)
        changes = _writes_model(s, info)
        rec = StageRecord(name=s["stage"], pass_name=s["pass"], key=s["key"], parents=list(s.get("parents") or []),
                          leaf=bool(s.get("leaf")), changes_model=changes, seconds=seconds,
                          metrics=dict(s.get("metrics") or _try_json(folder / METRICS) or {}),
                          params=info.get("params"))
        if changes:
            sums = _try_json(folder / CHECKSUMS) or {}
            entry = sums.get(f"{MODEL_DIR}/{WEIGHTS}")
            rec.weights_bytes = int(entry[1]) if entry else None
            manifest = _try_json(folder / MODEL_DIR / MANIFEST)
            if manifest is not None:
                types: dict[str, int] = {}
                for layer in (manifest.get("layers") or {}).values():
                    types[layer.get("type", "?")] = types.get(layer.get("type", "?"), 0) + 1
                rec.layer_types = types
        return rec

    def stage_report(self, name: str) -> dict[str, Any]:
        rec = self.stages[name]
        if rec.report is None:
            rec.report = _try_json(self.artifact(name) / REPORT) or {}
        return rec.report

    # ---- lineage

    def model_stage(self, name: str) -> str:
        """The stage whose model ``name`` works on (itself, unless it only measures or exports)."""
        seen = set()
        while not self.stages[name].changes_model and self.stages[name].parents and name not in seen:
            seen.add(name)
            name = self.stages[name].parents[0]
        return name

    def model_path(self, name: str) -> list[str]:
        """Model stages from the root to ``name`` along first parents."""
        chain = [name]
        while self.stages[chain[-1]].parents:
            chain.append(self.stages[chain[-1]].parents[0])
        return [n for n in reversed(chain) if self.stages[n].changes_model]

    def measured_by(self, model: str) -> list[str]:
        """Stages that only measure/export ``model`` (its evaluate children, recursively)."""
        out, todo = [], [model]
        while todo:
            cur = todo.pop(0)
            for name, rec in self.stages.items():
                if rec.parents and rec.parents[0] == cur and not rec.changes_model and name not in out:
                    out.append(name)
                    todo.append(name)
        return out

    def merged_metrics(self, model: str) -> dict[str, Any]:
        """The model stage's own metrics, overlaid by what its measuring stages found."""
        merged = dict(self.stages[model].metrics)
        for name in self.measured_by(model):
            merged.update(self.stages[name].metrics)
        return merged

    def leaf_models(self) -> list[str]:
        out = []
        for name, rec in self.stages.items():
            if rec.leaf:
                m = self.model_stage(name)
                if m not in out:
                    out.append(m)
        return out

    def compresses(self, name: str) -> bool:
        rec = self.stages[name]
        if not rec.changes_model:
            return False
        parent = self.model_path(name)[:-1]
        if parent:
            prev = self.stages[parent[-1]]
            if rec.weights_bytes and prev.weights_bytes and rec.weights_bytes < SHRINK * prev.weights_bytes:
                return True
            if rec.layer_types is not None and prev.layer_types is not None:  # more layers compressed
                return sum(rec.layer_types.values()) > sum(prev.layer_types.values())
            return False
        source = _source_weight_bytes(self.lock)
        if rec.weights_bytes and source and rec.weights_bytes < SHRINK * source:
            return True
        return bool(rec.layer_types)


def _goal(raw: Any, where: Path):
    if not raw:
        return None
    from pydantic import ValidationError

    from stackcomp.recipe import Goal, _format_validation

    try:
        return Goal.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{where}: {_format_validation(e, prefix='goal', model=Goal)}") from None


def _source_weight_bytes(lock: dict | None) -> int | None:
    files = ((lock or {}).get("model") or {}).get("files") or {}
    sizes = [f.get("bytes") for n, f in files.items() if n.endswith((".safetensors", ".bin")) and f.get("bytes")]
    return int(sum(sizes)) if sizes else None


def _writes_model(entry: dict[str, Any], info: dict[str, Any]) -> bool:
    """Whether a stage made a model of its own (else it measured or exported its parent's).

    The summary records the pass's ``changes_model``; runs made before it did tell by the
    artifact (a ``stage.json`` with ``model_from`` points at the parent's model); failing both,
    only the built-in measuring passes are taken not to change the model.
    """
    recorded = entry.get("changes_model")
    if isinstance(recorded, bool):
        return recorded or not entry.get("parents")
    if info:
        return "model_from" not in info
    return entry["pass"] not in ("evaluate", "export")


def _try_json(path: Path) -> Any:
    try:
        return read_json(path)
    except ArtifactError:
        return None


# ----------------------------------------------------------------------------- rows


@dataclass
class StepDelta:
    """One model stage of a path, and what it changed against the model stage before it."""

    stage: str
    pass_name: str
    compresses: bool
    seconds: float
    metric: float | None
    model_bytes: float | None
    linear_bytes: float | None
    cpu_latency_ms: float | None
    sizes_from: str | None  # "measured" | "computed" | None
    d_metric_points: float | None = None
    d_model_bytes: float | None = None
    d_linear_bytes: float | None = None
    d_cpu_latency_ms: float | None = None
    sizes_error: str | None = None  # why no size could be computed (e.g. the artifact failed its checksums)


@dataclass
class Row:
    run: str
    run_dir: str
    leaf: str
    measured_by: list[str]
    path: list[str]
    passes: list[str]
    method: str
    metric_name: str | None
    metric: float | None
    baseline: str  # the uncompressed parent: a stage name (the leaf itself if nothing compressed), or "source"
    baseline_metric: float | None
    delta_points: float | None
    model_bytes: float | None
    linear_bytes: float | None
    model_ratio: float | None  # fp32 dense bytes of the original (``ratio_reference``) / this model's bytes
    linear_ratio: float | None
    parent_ratio: float | None  # uncompressed parent's bytes / this model's bytes
    cpu_latency_ms: float | None
    latency_batch_size: float | None
    gpu_latency_ms: float | None
    compress_seconds: float
    path_seconds: float
    pareto_bytes: bool | None = None
    pareto_latency: bool | None = None
    #: ONNX Runtime's latency of the leaf's ONNX graph (evaluate after ``pack target: onnx``), same batches
    ort_latency_ms: float | None = None
    goal: dict[str, Any] | None = None
    meets_goal: bool | None = None
    goal_failures: list[str] = field(default_factory=list)
    attribution: list[StepDelta] = field(default_factory=list)
    also_in: list[str] = field(default_factory=list)  # other runs with the same leaf model (same key)
    #: every metric of the task the leaf recorded (None: not measured), and its change in points
    #: against the uncompressed parent; ``metric`` is the one of them that ranks the board
    metrics: dict[str, float | None] = field(default_factory=dict)
    metric_deltas: dict[str, float | None] = field(default_factory=dict)
    #: whose fp32 dense bytes the ratios divide: the uncompressed parent (a stage, or "source"), or
    #: the leaf itself when the parent's size is unknown (then removed layers are not seen)
    ratio_reference: str | None = None

    @property
    def id(self) -> str:
        return f"{self.run}/{self.leaf}"


@dataclass
class SeedGroup:
    """Rows that differ only in a swept seed (``kd3[seed=1]``, ``kd3[seed=2]``): one method, n runs.

    A single run's metric moves by tenths of a point with the seed; claims of "A beats B" by less
    than the spread seen here are noise.
    """

    run: str
    name: str  # the leaf name with the ``[seed=...]`` part removed
    seeds: list[str]
    leaves: list[str]
    metrics: list[float]
    mean: float
    std: float  # sample standard deviation (n - 1); a group has two seeds or more
    min: float
    max: float
    mean_delta_points: float | None


_SEED_TAG = re.compile(r"\[seed=([^\]]+)\]")


def seed_groups(rows: list[Row]) -> list[SeedGroup]:
    """Group the rows of each run whose leaf names differ only in ``[seed=...]``: mean, spread.

    Only rows with a metric count; a group needs two seeds or more.
    """
    found: dict[tuple[str, str], list[tuple[str, Row]]] = {}
    for row in rows:
        m = _SEED_TAG.search(row.leaf)
        if m is None or row.metric is None:
            continue
        name = _SEED_TAG.sub("", row.leaf)
        found.setdefault((row.run, name), []).append((m.group(1), row))
    groups = []
    for (run, name), members in found.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda sr: (not sr[0].lstrip("-").isdigit(), int(sr[0]) if sr[0].lstrip("-").isdigit() else 0,
                                     sr[0]))
        values = [r.metric for _, r in members]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        deltas = [r.delta_points for _, r in members if r.delta_points is not None]
        groups.append(SeedGroup(run=run, name=name, seeds=[s for s, _ in members], leaves=[r.leaf for _, r in members],
                                metrics=values, mean=mean, std=std, min=min(values), max=max(values),
                                mean_delta_points=sum(deltas) / len(deltas) if len(deltas) == len(values) else None))
    groups.sort(key=lambda g: -g.mean)
    return groups


@dataclass
class Comparison:
    runs: list[Run]
    rows: list[Row]
    task: str | None
    metric_name: str | None  # the metric that ranks the board (and decides Pareto fronts and goals)
    goals_given: bool
    notes: list[str] = field(default_factory=list)
    seed_groups: list[SeedGroup] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)  # every task metric a row recorded, the ranking one first

    @property
    def any_goal_met(self) -> bool | None:
        return any(r.meets_goal for r in self.rows) if self.goals_given else None

    @property
    def exit_code(self) -> int:
        """1 when goals were set and no row meets them (for CI), else 0."""
        return 1 if self.goals_given and not self.any_goal_met else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": JSON_SCHEMA, "task": self.task, "metric": self.metric_name, "metrics": self.metrics,
            "runs": [{"label": r.label, "recipe": r.name, "run_dir": str(r.dir),
                      "goal": r.goal.model_dump() if r.goal else None} for r in self.runs],
            "goals_given": self.goals_given, "any_goal_met": self.any_goal_met, "notes": self.notes,
            "rows": [_clean(asdict(row)) for row in self.rows],
            "seed_groups": [_clean(asdict(g)) for g in self.seed_groups],
        }


def compare(targets: list[str | Path], *, goal: Any = None, load_sizes: bool = True,
            metric: str | None = None) -> Comparison:
    """Leaderboard of every leaf model of ``targets`` (run directories or recipe files that were run).

    ``goal`` (a recipe ``Goal`` or its dict) replaces the runs' own goals for every row; ``metric``
    (one the task defines) ranks the board instead of the task's main metric.
    """
    if not targets:
        raise StackcompError("compare: give at least one run directory or recipe file")
    dirs = []
    for t in targets:
        d = resolve_run_dir(t)
        if d.resolve() not in [x.resolve() for x in dirs]:
            dirs.append(d)
    runs = [Run(d) for d in dirs]
    _disambiguate(runs)
    return compare_runs(runs, goal=goal, load_sizes=load_sizes, metric=metric)


def compare_runs(runs: list[Run], *, goal: Any = None, load_sizes: bool = True,
                 metric: str | None = None) -> Comparison:
    tasks = sorted({str(r.task) for r in runs if r.task})
    if len(tasks) > 1:
        raise StackcompError(f"the runs are on different tasks ({', '.join(tasks)}); a leaderboard compares one task")
    if goal is not None and not hasattr(goal, "model_dump"):
        goal = _goal(goal, Path("--goal"))
    defined = task_metrics(tasks[0] if tasks else None, runs)
    if metric is not None and metric not in defined:
        raise StackcompError(f"--metric {metric!r}: not a metric of {tasks[0] if tasks else 'these runs'}; "
                             f"available: {', '.join(defined) or 'none recorded'}")
    sizes = _SizeCache(load_sizes)
    rows, by_key, shared = [], {}, 0
    for run in runs:
        for leaf in run.leaf_models():
            key = run.stages[leaf].key
            if key in by_key:  # same key, same artifact: recipes sharing a cache list it once
                by_key[key].also_in.append(run.label)
                shared += 1
                continue
            by_key[key] = _row(run, leaf, sizes, metric, defined)
            rows.append(by_key[key])
    names = sorted({r.metric_name for r in rows if r.metric_name})
    if len(names) > 1:
        raise StackcompError(f"the runs rank by different metrics ({', '.join(names)}); compare runs of one task")
    _qualify_methods(runs, rows)
    mark_pareto(rows)
    goals_given = False
    for row, run in ((row, run) for run in runs for row in rows if row.run == run.label):
        g = goal if goal is not None else run.goal
        if g is not None and any(v is not None for v in g.model_dump().values()):
            goals_given = True
            check_goal(row, g)
    rows.sort(key=_sort_key)
    ranking = names[0] if names else metric
    shown = [m for m in defined if m == ranking or any(r.metrics.get(m) is not None for r in rows)]
    return Comparison(runs=runs, rows=rows, task=tasks[0] if tasks else None,
                      metric_name=ranking, goals_given=goals_given, seed_groups=seed_groups(rows),
                      metrics=sorted(shown, key=lambda m: m != ranking),
                      notes=_latency_notes(runs, rows) + _data_notes(runs, rows) + sizes.notes() + ([
                          f"{shared} leaf model(s) shared by several runs (same stage key, one artifact) are "
                          "listed once, under the first run given"] if shared else []))


def _data_notes(runs: list[Run], rows: list[Row]) -> list[str]:
    """What a task kind says about the data behind every number (e.g. SQuAD offline: the
    dev file split by article), once per distinct note."""
    by_label = {r.label: r for r in runs}
    found = (by_label[row.run].merged_metrics(row.leaf).get("data_note") for row in rows)
    return [f"data: {note}" for note in dict.fromkeys(n for n in found if isinstance(n, str) and n)]


def _latency_notes(runs: list[Run], rows: list[Row]) -> list[str]:
    """Latencies timed on different batches, threads or devices are not comparable: say so."""
    seen: dict[str, set] = {"batch size": set(), "batches": set(), "threads": set(), "device": set()}
    by_label = {r.label: r for r in runs}
    for row in rows:
        if row.cpu_latency_ms is None:
            continue
        m = by_label[row.run].merged_metrics(row.leaf)
        seen["batch size"].add(m.get("latency_batch_size"))
        seen["batches"].add(m.get("latency_batches"))
        seen["threads"].add(m.get("latency_threads"))
        hw = (by_label[row.run].lock or {}).get("hardware") or {}
        seen["device"].add(hw.get("cpu"))
    diff = {k: sorted(str(v) for v in vals) for k, vals in seen.items() if len(vals) > 1}
    if not diff:
        return []
    what = "; ".join(f"{k}: {', '.join(v)}" for k, v in diff.items())
    return [f"CPU latencies were timed under different settings ({what}); compare them with care"]


def _qualify_methods(runs: list[Run], rows: list[Row]) -> None:
    """``lowrank:svd`` vs ``lowrank:fwsvd``: a pass's ``method`` param names the method when rows differ in it."""
    by_label = {r.label: r for r in runs}
    per_row, variants = [], {}
    for row in rows:
        run = by_label[row.run]
        comp = []
        for n in row.path:
            if run.compresses(n):
                m = (run.stages[n].params or {}).get("method")
                comp.append((run.stages[n].pass_name, m if isinstance(m, str) else None))
        per_row.append(comp)
        for p, m in comp:
            variants.setdefault(p, set()).add(m)
    for row, comp in zip(rows, per_row):
        if comp:
            names = [f"{p}:{m}" if m is not None and len(variants[p]) > 1 else p for p, m in comp]
            row.method = "+".join(dict.fromkeys(names))


def _disambiguate(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            r.label = f"{r.name}@{r.dir}"


def _sort_key(row: Row) -> tuple:
    m = row.metric if row.metric is not None else -math.inf
    b = row.model_bytes if row.model_bytes is not None else math.inf
    return (-m, b, row.run, row.leaf)


class _SizeCache:
    """size_report of stage models that measured none, by artifact key (loaded on the CPU)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._cache: dict[str, dict | None] = {}
        #: "<run>/<stage>" -> why its size is n/a: the artifact is verified before its weights are read
        self.errors: dict[str, str] = {}

    def get(self, run: Run, name: str) -> dict | None:
        if not self.enabled:
            return None
        key = run.stages[name].key
        if key not in self._cache:
            self._cache[key] = None
            try:
                from stackcomp.artifacts import load_model
                from stackcomp.evaluate import size_report

                self._cache[key] = size_report(load_model(run.artifact(name), device="cpu"))
            except (StackcompError, OSError) as e:
                log.warning("no size for stage %r of %s: %s", name, run.label, e)
                self.errors[f"{run.label}/{name}"] = str(e)
        return self._cache[key]

    def error(self, run: Run, name: str) -> str | None:
        return self.errors.get(f"{run.label}/{name}")

    def notes(self) -> list[str]:
        return [f"no size for {where} (n/a): {why}" for where, why in self.errors.items()]

    def source(self, run: Run) -> dict | None:
        """size_report of the run's source model (with the task's head), for rows whose uncompressed
        parent is the source: a compressing first stage (a distilled student) is compared to it."""
        spec = run.recipe.get("model")
        if not self.enabled or not spec:
            return None
        key = f"source:{spec}:{run.task}"
        if key not in self._cache:
            self._cache[key] = None
            try:
                from stackcomp.evaluate import size_report
                from stackcomp.models import load_base_model

                model, _ = load_base_model(str(spec), run.task or None,
                                           trust_remote_code=bool(run.recipe.get("trust_remote_code")),
                                           allow_pickle=bool(run.recipe.get("allow_pickle")))
                self._cache[key] = size_report(model)
            except (StackcompError, OSError) as e:
                log.warning("no size for the source model of %s: %s", run.label, e)
        return self._cache[key]


def task_metrics(task: str | None, runs: list[Run] = ()) -> list[str]:
    """The metrics ``task`` defines (``Task.metrics``, in its order); for a task stackcomp does
    not know, the main metrics the runs' stages recorded. Losses and timings are not task metrics."""
    from stackcomp.tasks import get_task

    try:
        return list(get_task(task).metrics) if task else []
    except StackcompError:
        recorded = (s.metrics.get("main_metric") for run in runs for s in run.stages.values())
        return list(dict.fromkeys(m for m in recorded if isinstance(m, str)))


def _main_metric(metrics: dict[str, Any], name: str | None = None) -> tuple[str | None, float | None]:
    """``name`` (default: the stage's own ``main_metric``) and its value, if it recorded one."""
    name = name or metrics.get("main_metric")
    value = metrics.get(name) if name else None
    return name, float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _num(metrics: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def _stage_numbers(run: Run, name: str, sizes: _SizeCache, metric: str | None = None) -> dict[str, Any]:
    m = run.merged_metrics(name)
    metric_name, metric = _main_metric(m, metric)
    sizes_from = "measured" if _num(m, "model_bytes") is not None else None
    if sizes_from is None:
        computed = sizes.get(run, name)
        if computed:
            m = {**computed, **m}
            sizes_from = "computed"
    return {"metrics": m, "metric_name": metric_name, "metric": metric, "sizes_from": sizes_from,
            "model_bytes": _num(m, "model_bytes"), "linear_bytes": _num(m, "linear_bytes"),
            "cpu_latency_ms": _num(m, "latency_ms_per_batch")}


def _diff(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    return None if a is None or b is None else (a - b) * scale


def _row(run: Run, leaf: str, sizes: _SizeCache, metric: str | None = None, task_metrics: list[str] = ()) -> Row:
    """The leaf's row: ranked by ``metric`` (default: the leaf's main metric), with every one of
    ``task_metrics``, each against the uncompressed parent."""
    path = run.model_path(leaf)
    compressing = [n for n in path if run.compresses(n)]
    metric = metric or run.merged_metrics(leaf).get("main_metric")
    numbers = {n: _stage_numbers(run, n, sizes, metric) for n in path}
    attribution, prev = [], None
    for n in path:
        cur = numbers[n]
        step = StepDelta(stage=n, pass_name=run.stages[n].pass_name, compresses=n in compressing,
                         seconds=run.stages[n].seconds, metric=cur["metric"], model_bytes=cur["model_bytes"],
                         linear_bytes=cur["linear_bytes"], cpu_latency_ms=cur["cpu_latency_ms"],
                         sizes_from=cur["sizes_from"], sizes_error=None if cur["sizes_from"] else sizes.error(run, n))
        if prev is not None:
            step.d_metric_points = _diff(cur["metric"], prev["metric"], 100.0)
            step.d_model_bytes = _diff(cur["model_bytes"], prev["model_bytes"])
            step.d_linear_bytes = _diff(cur["linear_bytes"], prev["linear_bytes"])
            step.d_cpu_latency_ms = _diff(cur["cpu_latency_ms"], prev["cpu_latency_ms"])
        attribution.append(step)
        prev = cur
    if compressing:
        first = path.index(compressing[0])
        baseline = path[first - 1] if first > 0 else "source"
    else:
        baseline = leaf  # nothing compressed: the model is its own uncompressed parent
    if baseline == "source":
        numbers["source"] = {"metrics": sizes.source(run) or {}, "metric": None}
    base = numbers.get(baseline, {})
    leaf_n = numbers[leaf]
    m = leaf_n["metrics"]
    base_m = base.get("metrics") or {}
    values = {name: _main_metric(m, name)[1] for name in task_metrics}
    deltas = {name: _diff(v, _main_metric(base_m, name)[1], 100.0) for name, v in values.items()}
    # ratios against the fp32 dense bytes of the original model, so removed layers count; the
    # leaf's own dense equivalent only when the parent's size is unknown
    reference = baseline if _num(base_m, "model_dense_bytes") is not None else leaf
    ref_m = base_m if reference == baseline else m
    model_ratio = _ratio(_num(ref_m, "model_dense_bytes"), leaf_n["model_bytes"])
    linear_ratio = _ratio(_num(ref_m, "linear_dense_bytes"), leaf_n["linear_bytes"])
    if reference == leaf:  # metrics written before dense bytes were recorded carry only the ratios
        model_ratio = model_ratio or _num(m, "model_ratio_bytes")
        linear_ratio = linear_ratio or _num(m, "linear_ratio_bytes")
    after_baseline = path[path.index(baseline) + 1:] if baseline in path else path
    method = "+".join(dict.fromkeys(run.stages[n].pass_name for n in compressing)) or UNCOMPRESSED
    return Row(
        run=run.label, run_dir=str(run.dir), leaf=leaf, measured_by=run.measured_by(leaf), path=path,
        passes=[run.stages[n].pass_name for n in path], method=method,
        metric_name=leaf_n["metric_name"], metric=leaf_n["metric"],
        baseline=baseline, baseline_metric=base.get("metric"),
        delta_points=_diff(leaf_n["metric"], base.get("metric"), 100.0),
        model_bytes=leaf_n["model_bytes"], linear_bytes=leaf_n["linear_bytes"],
        model_ratio=model_ratio, linear_ratio=linear_ratio,
        parent_ratio=_ratio(_num(base_m, "model_bytes"), leaf_n["model_bytes"]),
        cpu_latency_ms=leaf_n["cpu_latency_ms"], latency_batch_size=_num(m, "latency_batch_size"),
        gpu_latency_ms=_num(m, *GPU_LATENCY_KEYS), ort_latency_ms=_num(m, "ort_latency_ms_per_batch"),
        compress_seconds=sum(run.stages[n].seconds for n in after_baseline) if compressing else 0.0,
        path_seconds=sum(run.stages[n].seconds for n in path), attribution=attribution,
        metrics=values, metric_deltas=deltas, ratio_reference=reference if model_ratio is not None else None,
    )


def _ratio(reference: float | None, size: float | None) -> float | None:
    return reference / size if reference and size else None


# ----------------------------------------------------------------------------- Pareto and goals


def pareto_mask(points: list[tuple[float, float] | None]) -> list[bool | None]:
    """For (metric, cost) points: True if no other point has metric >= and cost <=, one strictly.

    Higher metric is better, lower cost is better; None points are not ranked (None).
    """
    idx = sorted((i for i, p in enumerate(points) if p is not None), key=lambda i: (points[i][1], -points[i][0]))
    out: list[bool | None] = [None] * len(points)
    best = -math.inf
    best_cost = None
    for i in idx:
        metric, cost = points[i]
        if metric > best:
            out[i] = True
            best, best_cost = metric, cost
        elif metric == best and cost == best_cost:
            out[i] = True  # an exact tie with a front point is not dominated
        else:
            out[i] = False
    return out


def mark_pareto(rows: list[Row]) -> None:
    for attr, cost in (("pareto_bytes", "model_bytes"), ("pareto_latency", "cpu_latency_ms")):
        pts = [(r.metric, getattr(r, cost)) if r.metric is not None and getattr(r, cost) is not None else None
               for r in rows]
        for r, mark in zip(rows, pareto_mask(pts)):
            setattr(r, attr, mark)


def check_goal(row: Row, goal: Any) -> bool:
    """Set ``row.meets_goal`` and the reasons it fails; an unmeasured quantity fails its limit."""
    g = goal.model_dump()
    row.goal = {k: v for k, v in g.items() if v is not None}
    fails = []
    if g.get("metric_drop") is not None:
        if row.delta_points is None:
            fails.append("metric drop unknown (uncompressed parent not measured)")
        elif -row.delta_points > g["metric_drop"] + _GOAL_EPS:
            fails.append(f"drops {-row.delta_points:.2f} points > {g['metric_drop']:g}")
    if g.get("max_bytes") is not None:
        if row.model_bytes is None:
            fails.append("size unknown")
        elif row.model_bytes > g["max_bytes"] + _GOAL_EPS:
            fails.append(f"{row.model_bytes / 1e6:.2f} MB > {g['max_bytes'] / 1e6:g} MB")
    if g.get("max_latency_ms") is not None:
        if row.cpu_latency_ms is None:
            fails.append("latency not measured")
        elif row.cpu_latency_ms > g["max_latency_ms"] + _GOAL_EPS:
            fails.append(f"{row.cpu_latency_ms:.1f} ms > {g['max_latency_ms']:g} ms")
    row.goal_failures = fails
    row.meets_goal = not fails
    return row.meets_goal


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- one run in depth


def run_report(target: str | Path, *, load_sizes: bool = True, metric: str | None = None) -> dict[str, Any]:
    """``compare`` of one run, plus every stage's analysis (report.json), the recipe and the lock."""
    comparison = compare([target], load_sizes=load_sizes, metric=metric)
    run = comparison.runs[0]
    stages = []
    for name, rec in run.stages.items():
        rep = run.stage_report(name)
        stages.append({"stage": name, "pass": rec.pass_name, "seconds": rec.seconds, "params": rec.params,
                       "metrics": rec.metrics, "report": rep})
    return {"comparison": comparison, "stages": stages, "recipe_text": run.recipe_text, "lock": run.lock}


# ----------------------------------------------------------------------------- two runs


#: lock fields that differ between any two runs and mean nothing
_LOCK_NOISE = ("created_at", "mtime_ns")
#: row fields compared by ``diff``
DIFF_FIELDS = ("method", "metric", "delta_points", "model_bytes", "linear_bytes", "model_ratio", "linear_ratio",
               "cpu_latency_ms", "gpu_latency_ms", "ort_latency_ms", "compress_seconds")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix] = obj
    return out


def _changed(a: Any, b: Any, skip: tuple[str, ...] = (), prefix: str = "") -> list[dict[str, Any]]:
    """Differences of two JSON trees as dotted fields; a subtree on one side only is one entry."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [{"field": prefix, "a": a, "b": b, "only_in": None}]
    out = []
    for k in [*a, *[k for k in b if k not in a]]:
        if k in skip:
            continue
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in b:
            out.append({"field": key, "a": a[k], "b": None, "only_in": "a"})
        elif k not in a:
            out.append({"field": key, "a": None, "b": b[k], "only_in": "b"})
        else:
            out.extend(_changed(a[k], b[k], skip, key))
    return out


def diff_runs(target_a: str | Path, target_b: str | Path, *, load_sizes: bool = True) -> dict[str, Any]:
    """What differs between two runs: lock (environment, inputs), resolved recipe, and leaf results."""
    run_a, run_b = Run(resolve_run_dir(target_a), label="A"), Run(resolve_run_dir(target_b), label="B")
    sizes = _SizeCache(load_sizes)
    rows_a = {leaf: _row(run_a, leaf, sizes, None, task_metrics(run_a.task, [run_a])) for leaf in run_a.leaf_models()}
    rows_b = {leaf: _row(run_b, leaf, sizes, None, task_metrics(run_b.task, [run_b])) for leaf in run_b.leaf_models()}
    metrics = []
    for leaf in [*rows_a, *[l for l in rows_b if l not in rows_a]]:
        ra, rb = rows_a.get(leaf), rows_b.get(leaf)
        if ra is None or rb is None:
            metrics.append({"leaf": leaf, "field": "(leaf)", "a": ra is not None, "b": rb is not None,
                            "only_in": "a" if rb is None else "b"})
            continue
        for f in DIFF_FIELDS:
            va, vb = getattr(ra, f), getattr(rb, f)
            if va != vb:
                metrics.append({"leaf": leaf, "field": f, "a": va, "b": vb, "only_in": None})
        for name in [*ra.metrics, *[n for n in rb.metrics if n not in ra.metrics]]:
            va, vb = ra.metrics.get(name), rb.metrics.get(name)
            if va != vb and name != ra.metric_name:  # the ranking one is ``metric`` above
                metrics.append({"leaf": leaf, "field": f"metrics.{name}", "a": va, "b": vb, "only_in": None})
    notes = sizes.notes()
    if run_a.lock is None or run_b.lock is None:
        notes.append("run " + " and ".join(x for x, r in (("A", run_a), ("B", run_b)) if r.lock is None)
                     + " has no lock.json (made before locks existed); environment not compared")
    return _clean({
        "a": {"run_dir": str(run_a.dir), "recipe": run_a.name}, "b": {"run_dir": str(run_b.dir), "recipe": run_b.name},
        "lock": _changed(run_a.lock or {}, run_b.lock or {}, _LOCK_NOISE) if run_a.lock and run_b.lock else [],
        "recipe": _changed(run_a.recipe, run_b.recipe), "results": metrics, "notes": notes,
    })
