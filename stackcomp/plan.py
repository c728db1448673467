"""Plans: the recipe's stages as a networkx DAG, validated, each stage with a content key.

Planning loads no model. It resolves every pass, validates its params against the pass's
``Params`` model, checks what passes need and where they may stand, and gives each stage a
key: the hash of its parents' keys, its pass name and version, its resolved params, and the
identity of the inputs it reads. Equal keys mean equal work, so the engine reuses artifacts by
key.

What the keys cover (identities from stackcomp.fingerprint, content not location):

- the root's parent, the *source*: the source model's identity (sha256 of its weight, config
  and tokenizer files for a local folder or an alias, the commit for a hub model in the local
  Hugging Face cache, else the hub id with ``"unresolved"``), the canonical task id (aliases
  resolved: ``glue/sts-b`` and ``glue/stsb`` are one task), data options and seed;
- a stage whose pass reads the task data: the data's identity (sha256 of the local TSVs the
  task loads, train and the evaluation split, or the hub dataset and its cached revision).
  With a task, every stage is handed the data and the built-in passes use it when they get it
  (training, evaluation, calibration, int8's error report, pack's latency batches), so a pass
  reads the data unless its class says ``reads_data = False`` (a pass that never touches
  ``ctx.data``, a plugin's say);
- a stage whose teacher is a model id (not a stage): that model's identity.

A changed input thus changes the keys of the stages that read it and, through the parents'
keys, of their descendants: exactly those rerun. Artifacts made before keys covered the inputs
(``KEY_SCHEMA`` 1) are never matched, so they are recomputed once rather than trusted.

:func:`build_plan` never fails on a missing model or data (a marker stands in their identity);
:func:`check_inputs` raises the error running would raise, for ``validate``/``plan``/``run``,
and logs which inputs are known only by a hub id.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from pydantic import BaseModel, ValidationError

from stackcomp.tasks import get_task
from stackcomp.errors import PlanError
from stackcomp.fingerprint import Inputs, identify_inputs, teacher_model
from stackcomp.passes.base import KEY_INLINE_MARK, KEY_OMIT_DEFAULT_MARK, KNOWN_NEEDS, Pass, PassParams, get_pass
from stackcomp.recipe import Recipe, _format_validation

#: 2: keys cover the identity of the inputs (model and data files, canonical task id)
KEY_SCHEMA = "stackcomp-key-2"

log = logging.getLogger("stackcomp.plan")


@dataclass
class Stage:
    name: str
    pass_name: str
    pass_cls: type[Pass]
    params: PassParams
    #: the first parent gives the input model; later ones are extra dependencies
    parents: list[str]
    key: str = ""
    #: the stage whose model is the teacher, when ``params.teacher`` names a stage
    teacher_stage: str | None = None
    implicit: bool = False

    def make_pass(self) -> Pass:
        return self.pass_cls(self.params)


@dataclass
class Plan:
    recipe: Recipe
    graph: nx.DiGraph
    stages: dict[str, Stage]
    source_key: str
    order: list[str] = field(default_factory=list)
    #: the identities of the model and data the keys were made from
    inputs: Inputs | None = None
    #: training callbacks every stage's training also gets (the search's pruner), in whatever
    #: process runs the stage: they travel with the plan to Ray workers. Not part of any key.
    training_callbacks: list[Any] = field(default_factory=list)

    def leaves(self) -> list[str]:
        return [n for n in self.order if self.graph.out_degree(n) == 0]

    def ancestors(self, name: str) -> list[str]:
        return [n for n in self.order if n in nx.ancestors(self.graph, name)]

    def select(self, names: list[str]) -> Plan:
        """The part of the plan needed for ``names``: them, their ancestors (parents and teachers)
        and the measuring stages (evaluate, export) that hang off them. For running a few
        branches of a large recipe; keys are unchanged, so the cache is shared with full runs."""
        unknown = [n for n in names if n not in self.stages]
        if unknown:
            raise PlanError(f"--only names unknown stage(s) {', '.join(map(repr, unknown))}; "
                            f"the plan has: {', '.join(self.order)}")
        keep = set(names)
        for n in names:
            keep |= nx.ancestors(self.graph, n)
        for n in list(keep):
            keep |= {c for c in self.graph.successors(n) if not self.stages[c].pass_cls.changes_model
                     and set(self.stages[c].parents) <= keep}
        return Plan(recipe=self.recipe, graph=self.graph.subgraph(keep).copy(),
                    stages={n: s for n, s in self.stages.items() if n in keep}, source_key=self.source_key,
                    order=[n for n in self.order if n in keep], inputs=self.inputs,
                    training_callbacks=self.training_callbacks)

    def path_to(self, name: str) -> list[str]:
        """The chain of first parents from the root to ``name`` (the model's lineage)."""
        chain = [name]
        while self.stages[chain[-1]].parents:
            chain.append(self.stages[chain[-1]].parents[0])
        return chain[::-1]


def build_plan(recipe: Recipe, inputs: Inputs | None = None) -> Plan:
    """The plan of ``recipe``; ``inputs`` (identities of model, data, teacher models) are
    computed from the files when not given."""
    from stackcomp.passes.evaluate import EvaluatePass

    stages: dict[str, Stage] = {}
    allow = tuple(recipe.allow_plugins)
    for name, spec in recipe.stages.items():
        cls = _resolve_pass(name, spec.pass_name, allow)
        stages[name] = Stage(
            name=name, pass_name=spec.pass_name, pass_cls=cls, params=_validate_params(name, cls, spec.params),
            parents=list(spec.after),
        )

    graph = nx.DiGraph()
    graph.add_nodes_from(stages)
    for name, stage in stages.items():
        if len(set(stage.parents)) != len(stage.parents):
            raise PlanError(f"stage {name!r}: `after` lists a stage twice")
        for parent in stage.parents:
            if parent == name:
                raise PlanError(f"stage {name!r}: a stage cannot come after itself")
            if parent not in stages:
                raise PlanError(f"stage {name!r}: after {parent!r}, but there is no stage {parent!r} (stages: {', '.join(stages)})")
            graph.add_edge(parent, name)
        if stage.pass_cls.teacher_param:
            teacher = getattr(stage.params, stage.pass_cls.teacher_param, None)
            if isinstance(teacher, str) and teacher in stages:
                if teacher == name:
                    raise PlanError(f"stage {name!r}: a stage cannot be its own teacher")
                stage.teacher_stage = teacher
                graph.add_edge(teacher, name)

    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise PlanError("the stages form a cycle: " + " -> ".join([u for u, _ in cycle] + [cycle[0][0]]))

    if recipe.evaluate_leaves:
        for leaf in [n for n in graph.nodes if graph.out_degree(n) == 0]:
            if stages[leaf].pass_cls.changes_model:
                name = f"{leaf}.eval"
                if name in stages:
                    continue
                stages[name] = Stage(name=name, pass_name="evaluate", pass_cls=EvaluatePass,
                                     params=EvaluatePass.Params(), parents=[leaf], implicit=True)
                graph.add_edge(leaf, name)

    order = list(nx.lexicographical_topological_sort(graph, key=lambda n: list(stages).index(n)))
    _check_needs_and_order(recipe, stages, graph)
    task = get_task(recipe.task).name if recipe.task else None
    if inputs is None:
        inputs = identify_inputs(recipe, [t for s in stages.values() if (t := teacher_model(s))])
    # where the model and the data lie is no input, what they hold is (inputs.model, inputs.data)
    opts = recipe.data_options()
    data_options = opts.model_dump(mode="json", exclude={"data_dir", "unlabeled"})
    if opts.unlabeled:  # how each file is read; what it holds is in inputs.data (absent: keys as before)
        data_options["unlabeled"] = [source.key() for source in opts.unlabeled]
    source_key = _hash({
        "schema": KEY_SCHEMA, "model": inputs.model, "task": task,
        "data": data_options, "seed": recipe.seed, "trust_remote_code": recipe.trust_remote_code,
    })
    for name in order:
        stage = stages[name]
        parent_keys = [stages[p].key for p in stage.parents] or [source_key]
        teacher_key = stages[stage.teacher_stage].key if stage.teacher_stage else None
        key = {
            "parents": parent_keys, "teacher": teacher_key, "pass": stage.pass_name,
            "version": stage.pass_cls.version, "params": params_for_key(stage.params),
        }
        if task and reads_data(stage.pass_cls):
            key["data_files"] = inputs.data
        if teacher_model(stage):
            key["teacher_model"] = inputs.teachers.get(teacher_model(stage))
        stage.key = _hash(key)
    return Plan(recipe=recipe, graph=graph, stages=stages, source_key=source_key, order=order, inputs=inputs)


def reads_data(cls: type[Pass]) -> bool:
    """Whether a stage of pass ``cls`` reads the task data: yes unless the class says
    ``reads_data = False`` (every stage gets ``ctx.data`` when the recipe has a task)."""
    declared = getattr(cls, "reads_data", None)
    return True if declared is None else bool(declared)


def check_inputs(plan: Plan) -> None:
    """Raise the error a run would raise for what can be known before loading anything: the
    source model and teacher models are there (stackcomp.models.check_model_available), and
    so are the task's splits that stages read, train and the evaluation split (local files,
    or the hub's cache while offline). Then logs a warning for each input known only by its hub
    id (online, not cached): keys cannot tell its revisions apart."""
    from stackcomp.models import check_model_available

    recipe = plan.recipe
    check_model_available(recipe.model)
    for stage in plan.stages.values():
        if teacher_model(stage):
            check_model_available(teacher_model(stage))
    if recipe.task and any(reads_data(s.pass_cls) for s in plan.stages.values()):
        opts = recipe.data_options()
        get_task(recipe.task).check_data(["train", opts.eval_split or "dev"], opts.data_dir)
        if opts.unlabeled:
            from stackcomp.data.unlabeled import check_source

            for source in opts.unlabeled:
                check_source(source, opts.data_dir)
    for note in plan.inputs.unresolved() if plan.inputs else ():
        log.warning(note)


def _resolve_pass(stage: str, pass_name: str, allow: tuple[str, ...]) -> type[Pass]:
    try:
        return get_pass(pass_name, allow)
    except PlanError as e:
        raise PlanError(f"stage {stage!r}: {e}") from None


def _validate_params(stage: str, cls: type[Pass], params: dict[str, Any]) -> PassParams:
    try:
        return cls.Params.model_validate(params)
    except ValidationError as e:
        raise PlanError(f"stage {stage!r} (pass {cls.name}): "
                        f"{_format_validation(e, prefix='params', model=cls.Params)}") from None


def _check_needs_and_order(recipe: Recipe, stages: dict[str, Stage], graph: nx.DiGraph) -> None:
    for name, stage in stages.items():
        cls = stage.pass_cls
        unknown = set(cls.needs) - KNOWN_NEEDS
        if unknown:
            raise PlanError(f"pass {cls.name!r} declares unknown needs {sorted(unknown)}")
        if "task" in cls.needs and not recipe.task:
            raise PlanError(f"stage {name!r}: pass {cls.name} needs a task; set `task:` in the recipe (e.g. glue/sst2)")
        if "teacher" in cls.needs:
            teacher = getattr(stage.params, cls.teacher_param or "teacher", None)
            if not teacher:
                raise PlanError(f"stage {name!r}: pass {cls.name} needs a teacher; set params.{cls.teacher_param or 'teacher'} "
                                "to an upstream stage name or a model id")
        if cls.changes_model is False and len(stage.parents) == 0:
            raise PlanError(f"stage {name!r}: pass {cls.name} measures a model; give it `after:` a stage that makes one")
        for anc in nx.ancestors(graph, name):
            anc_cls = stages[anc].pass_cls
            if anc_cls.must_be_last and anc_cls.changes_model and cls.changes_model:
                raise PlanError(
                    f"stage {name!r} ({cls.name}) comes after {anc!r} ({anc_cls.name}), but {anc_cls.name} must be "
                    f"the last pass that changes the model; move {name!r} before {anc!r}"
                )
            reason = cls.forbid_after.get(anc_cls.name)
            if reason:
                raise PlanError(f"stage {name!r} ({cls.name}) cannot come after {anc!r} ({anc_cls.name}): {reason}")


def params_for_key(params: BaseModel) -> dict[str, Any]:
    """A stage's params as its key sees them: fields marked ``KEY_OMIT_DEFAULT``
    (stackcomp.passes.base) are left out while at their default, nested models included, and
    the fields of a ``KEY_INLINE`` config stand at the top level (where they were before)."""
    out = params.model_dump(mode="json")
    _omit_defaults(params, out)
    for name, info in type(params).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get(KEY_INLINE_MARK) and isinstance(out.get(name), dict):
            inner = out.pop(name)
            clash = sorted(set(inner) & set(out))
            if clash:
                raise PlanError(f"{type(params).__name__}: inlined `{name}` fields {clash} clash with its own fields")
            out.update(inner)
    return out


def _omit_defaults(params: BaseModel, dumped: dict[str, Any]) -> None:
    for name, info in type(params).model_fields.items():
        value = getattr(params, name)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get(KEY_OMIT_DEFAULT_MARK) and value == info.get_default(call_default_factory=True):
            dumped.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(dumped.get(name), dict):
            _omit_defaults(value, dumped[name])


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def stage_resources(plan: Plan, stage: Stage) -> dict[str, float]:
    """What ``stage`` asks the cluster for: its pass's ``resources``, overridden by the recipe
    stage's ``resources:`` (implicit stages, e.g. a leaf's evaluate, take their pass's)."""
    out = dict(getattr(stage.pass_cls, "resources", None) or {"num_cpus": 1})
    spec = plan.recipe.stages.get(stage.name)
    if spec is not None and spec.resources is not None:
        out.update(spec.resources.model_dump(exclude_none=True))
    out.setdefault("num_cpus", 1)
    return out
