"""Running a search: an Optuna study whose trials are ordinary stackcomp recipes.

Sampler: ``TPESampler(multivariate=True, group=True)``. The space is mixed (which pass a slot
holds is categorical, ratios and learning rates continuous, nnz and layer counts integers) and
conditional (a pass's params exist only in trials that chose it). TPE handles all three kinds
and, with ``group=True``, models each conditional sub-space on the trials that have it, where a
plain multivariate TPE would fall back to independent sampling; it supports several objectives
and, through the trials' constraints (``Trial.set_constraint``), the goal (trials that miss it are ranked
behind those that meet it). NSGA-II was the alternative: it needs a population (50 by default)
before its first generation, more trials than a CPU budget of ~20 training runs allows.

A trial: sample a chain, build its recipe (:meth:`SearchSpace.trial_recipe`), check it with the
planner (``recipe_from_dict`` + ``build_plan``): an invalid chain is *rejected* (Optuna state
PRUNED, so the sampler learns to avoid it; ``outcome: rejected`` and the planner's message) and
never run. A valid one is written to
``DIR/trials/<n>.yaml`` and run by the engine in ``DIR/runs/<n>/`` with the search's shared
artifact folder ``DIR/artifacts`` as the cache, so trials sharing a prefix share its stages.
Its objectives are read back through ``stackcomp.report.compare`` (the numbers the leaderboard
shows). Hopeless trials are stopped by :mod:`stackcomp.search.pruning`.

Resume: the study lives in ``DIR/study.db`` (SQLite, Optuna's RDB storage). Run the same command
again: finished trials are kept; a trial left RUNNING by a kill is marked FAIL (``outcome:
interrupted``) and its sampled params are queued again, so it is retried first (its finished
stages come from the cache). ``--trials N`` counts trials that ran to an outcome (complete,
pruned or failed): rejected, repeated (a chain run before, or a stage pruned before) and
interrupted ones cost no training and do not count.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stackcomp.errors import StackcompError
from stackcomp.rundir import CHECKSUMS
from stackcomp.search.pruning import FloorPruner, PrunedByRule
from stackcomp.search.space import SearchSpace, sample_chain

log = logging.getLogger("stackcomp.search")

#: user attr ``outcome`` of a trial
COMPLETE, PRUNED, FAILED, REJECTED, INTERRUPTED = "complete", "pruned", "failed", "rejected", "interrupted"
#: user attr ``outcome`` of a trial that trained nothing: its stack, or a stage of it that was
#: pruned, was an earlier trial's (same stage keys); it takes that trial's result
REPEATED = "repeated"
#: outcomes that train nothing (a sampler may propose them again and again)
UNCOUNTED = (REJECTED, REPEATED)
#: outcomes that count towards ``--trials``
COUNTED = (COMPLETE, PRUNED, FAILED)


class SearchError(StackcompError):
    """The search cannot start or go on (another search holds the folder, a changed space)."""


def parse_duration(text: str | None) -> float | None:
    """``"2h"``, ``"90m"``, ``"1h30m"``, ``"45s"``, or a number of seconds -> seconds."""
    if text is None:
        return None
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or re.sub(r"\s+", "", "".join(n + u for n, u in parts)) != re.sub(r"\s+", "", s):
        raise SearchError(f"--timeout {text!r}: write e.g. 2h, 90m, 1h30m, 45s or a number of seconds")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@dataclass
class SearchPaths:
    """What a search writes in its folder."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "study.db"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def trial_recipe(self, n: int) -> Path:
        return self.root / "trials" / f"{n}.yaml"

    def run_dir(self, n: int) -> Path:
        return self.root / "runs" / str(n)

    @property
    def pareto(self) -> Path:
        return self.root / "pareto"

    @property
    def search_json(self) -> Path:
        return self.root / "search.json"

    @property
    def lock(self) -> Path:
        return self.root / ".search.lock"


@dataclass
class SampledTrial:
    """A dry-run sample: the chain and whether the planner accepts it."""

    number: int
    chain: list[tuple[str, str, dict[str, Any]]]
    params: dict[str, Any] = field(default_factory=dict)  # the sampled values, by Optuna name
    rejected: str | None = None


@dataclass
class SearchRun:
    """What :func:`run_search` did in this call (the whole study is in ``study``)."""

    study: Any
    paths: SearchPaths
    ran: list[int] = field(default_factory=list)  # trial numbers run by this call
    stopped: str | None = None  # why the loop ended before the count was reached


# ----------------------------------------------------------------------------- the study


def make_sampler(space: SearchSpace) -> Any:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=space.spec.seed if space.spec.seed is not None else space.recipe.seed,
            multivariate=True, group=True, n_startup_trials=space.spec.startup_trials)


def _space_identity(space: SearchSpace) -> str:
    return json.dumps({"prefix": space.prefix, "search": space.spec.model_dump(mode="json")}, sort_keys=True,
                      default=str)


def open_study(space: SearchSpace, paths: SearchPaths) -> Any:
    """The study in ``DIR/study.db``, created or loaded; refuses a folder holding another space's."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    paths.root.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{paths.db.resolve()}")
    try:
        study = optuna.create_study(study_name="stackcomp-search", storage=storage, sampler=make_sampler(space),
                                    directions=space.directions, load_if_exists=True)
    except ValueError as e:  # other directions in an existing study
        raise SearchError(f"{paths.root} holds a search with other objectives ({e}); use another -o") from None
    identity = _space_identity(space)
    if study.user_attrs.get("space") is None:
        study.set_user_attr("space", identity)
        study.set_user_attr("objectives", space.spec.objectives)
        enqueue_stacks(space, study)  # once, when the study is new: a resume finds them queued or run
    elif study.user_attrs["space"] != identity:
        raise SearchError(f"{paths.root} holds the search of another space (the space file changed since it "
                          "started); resume with the same file, or give another -o")
    return study


@contextmanager
def _exclusive(paths: SearchPaths) -> Iterator[None]:
    """One search process per folder: a second would mark the first's running trial interrupted."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SearchError(f"another search is running in {paths.root}; wait for it or give another -o") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def enqueue_stacks(space: SearchSpace, study: Any) -> None:
    """Queue ``search.enqueue``'s stacks: the first trials run them, the sampler fills what they leave open."""
    for i, params in enumerate(space.enqueued):
        study.enqueue_trial(params, user_attrs={"enqueued": i}, skip_if_exists=False)


def _retry_attrs(t: Any) -> dict[str, Any]:
    """What a retried trial carries: the trial it retries, and the ``enqueue`` entry it ran, if any."""
    enqueued = t.user_attrs.get("enqueued")
    return {"retry_of": t.number, **({"enqueued": enqueued} if enqueued is not None else {})}


def outcome(t: Any) -> str | None:
    return t.user_attrs.get("outcome")


def counted(study: Any) -> int:
    return sum(outcome(t) in COUNTED for t in study.get_trials(deepcopy=False))


def recover_interrupted(study: Any) -> list[int]:
    """Trials left RUNNING by a killed search: FAIL them as interrupted and queue their params again."""
    import optuna

    recovered = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # a FAIL without an outcome reads as interrupted (search.json names the retry)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs=_retry_attrs(t))
        recovered.append(t.number)
    return recovered


# ----------------------------------------------------------------------------- trials


def check_trial(space: SearchSpace, number: int, chain: list[tuple[str, str, dict[str, Any]]],
                executor: dict[str, Any] | None = None):
    """(raw recipe, plan), or raise the planner's StackcompError for an invalid chain. ``executor``
    (``{"kind": "ray", ...}``) goes into the plan's recipe, not into the raw recipe the trial's
    file is written from: a Pareto recipe runs wherever its user runs it."""
    from stackcomp.plan import build_plan
    from stackcomp.recipe import recipe_from_dict

    raw = space.trial_recipe(number, chain)
    recipe = recipe_from_dict({**raw, "executor": executor} if executor else raw, source=f"trial {number}")
    return raw, build_plan(recipe)


def sampled_values(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """The sampled param values (``factor.lowrank.ratio``), without the slots' pass picks."""
    return {k: v for k, v in params.items() if k not in space.slot_names}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _chain_attr(chain: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"slot": s, "pass": p, "params": params} for s, p, params in chain]


def dry_run(space: SearchSpace, n: int) -> list[SampledTrial]:
    """Sample ``n`` chains (in memory, nothing written or run) and check each with the planner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=make_sampler(space), directions=space.directions)
    enqueue_stacks(space, study)
    out = []
    for _ in range(n):
        t = study.ask()
        chain = sample_chain(space, t)
        s = SampledTrial(t.number, chain, sampled_values(space, t.params))
        try:
            check_trial(space, t.number, chain)
        except StackcompError as e:
            s.rejected = _one_line(e)
        study.tell(t, state=optuna.trial.TrialState.PRUNED if s.rejected else optuna.trial.TrialState.FAIL)
        out.append(s)
    return out


def run_search(space: SearchSpace, out_dir: str | Path, *, trials: int, timeout_s: float | None = None,
               console: Any = None, on_trial: Callable[[Any], None] | None = None,
               executor: dict[str, Any] | None = None, parallel: int | None = None) -> SearchRun:
    """Run trials until ``trials`` have an outcome (counting those of earlier calls) or time is up.
    Time is checked between trials: a trial that started runs to its end.

    ``executor``: where each trial's stages run (``{"kind": "ray", "address": ...}``: on a Ray
    cluster); ``parallel``: how many trials run at once (default 1 locally, the cluster's CPUs
    on Ray). Trials run one at a time until the shared prefix is in the cache, so it is trained
    once, never by two trials side by side."""
    from stackcomp.plan import check_inputs

    paths = SearchPaths(Path(out_dir))
    prefix = _prefix_plan(space)
    check_inputs(prefix)
    if executor and executor.get("kind") == "ray":
        from stackcomp.ray_executor import connect

        cpus = connect(executor.get("address"))
        parallel = parallel or max(1, int(cpus))
    parallel = max(1, parallel or 1)
    prefix_key = prefix.stages[space.spec.after].key
    with _exclusive(paths):
        study = open_study(space, paths)
        retried = recover_interrupted(study)
        if retried:
            log.info("trial(s) %s were interrupted; they run again first", ", ".join(map(str, retried)))
        result = SearchRun(study, paths)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        rejected_here, max_rejected = 0, 20 * max(trials, 1) + 100
        asking = threading.Lock()

        def one(trial: Any, shown: Any) -> str:
            return _run_trial(space, paths, study, trial, shown, executor=executor)

        with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="trial") as pool:
            running: dict[concurrent.futures.Future, int] = {}
            try:
                while True:
                    prefix_done = (paths.artifacts / prefix_key / CHECKSUMS).exists()
                    width = parallel if prefix_done else 1
                    while len(running) < width and counted(study) + len(running) < trials and not result.stopped:
                        if deadline is not None and time.monotonic() >= deadline:
                            result.stopped = f"--timeout reached after {counted(study)} of {trials} trials"
                        elif rejected_here >= max_rejected:
                            result.stopped = (f"{rejected_here} sampled chains in a row were rejected by the planner "
                                              "or repeated earlier trials; the space allows almost no new valid "
                                              "chain (see search.json for the reasons)")
                        else:
                            with asking:
                                trial = study.ask()
                            # one trial at a time draws its live view; side by side they log lines
                            running[pool.submit(one, trial, console if parallel == 1 else None)] = trial.number
                    if not running:
                        break
                    done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        number = running.pop(future)
                        state = future.result()
                        if state in UNCOUNTED:
                            rejected_here += 1
                        else:
                            rejected_here = 0
                            result.ran.append(number)
                        if on_trial is not None:
                            on_trial(study)
            except BaseException:
                for future in running:
                    future.cancel()
                raise
        return result


def _prefix_plan(space: SearchSpace) -> Any:
    from stackcomp.plan import build_plan

    return build_plan(space.recipe).select([space.spec.after])


def _run_trial(space: SearchSpace, paths: SearchPaths, study: Any, trial: Any, console: Any,
               executor: dict[str, Any] | None = None) -> str:
    import optuna

    from stackcomp.artifacts import ArtifactStore
    from stackcomp.engine import Engine

    n = trial.number
    chain = sample_chain(space, trial)
    trial.set_user_attr("chain", _chain_attr(chain))
    if console is None:
        log.info("trial %d: %s", n, " -> ".join(p for _, p, _ in chain) or "prefix only")
    else:
        console.rule(f"trial {n}: {' -> '.join(p for _, p, _ in chain) or 'prefix only'}")
    try:
        raw, plan = check_trial(space, n, chain, executor)
    except StackcompError as e:
        trial.set_user_attr("outcome", REJECTED)
        trial.set_user_attr("reason", _one_line(e))
        for name in goal_constraints(space.goal, None):
            trial.set_constraint(name, 1.0)
        # PRUNED, not FAIL: TPE ignores failed trials and would propose the same chain again;
        # pruned ones it ranks among the bad, so it moves away from forbidden orders
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log.info("trial %d rejected: %s", n, _one_line(e))
        return REJECTED
    recipe_path = paths.trial_recipe(n)
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(_recipe_text(raw, n, chain))
    repeat = _repeat_of(study, plan, chain)
    if repeat is not None:
        return _settle_repeat(space, study, trial, *repeat)
    run_dir = paths.run_dir(n)
    store = ArtifactStore(run_dir, artifacts_dir=paths.artifacts)
    pruner = _pruner(space, plan, store)
    # with the plan, the pruner reaches the training loop wherever the stage runs (a Ray worker too)
    plan.training_callbacks = [pruner]
    leaf = chain[-1][0] if chain else space.spec.after
    try:
        engine = Engine(plan, run_dir, console=console, show_progress=console is not None,
                        cache_dir=paths.artifacts)
        summary = engine.run()
    except BaseException as e:  # a kill (Ctrl-C) or a resource error: the trial is retried on resume
        trial.set_user_attr("outcome", INTERRUPTED)
        trial.set_user_attr("reason", f"{type(e).__name__}: {_one_line(e)}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs=_retry_attrs(trial))
        raise
    verdict = pruner.verdict or _pruned_remotely(summary)
    if verdict is not None:
        _remember_pruned(study, n, summary, verdict)
        return _prune(space, study, trial, verdict)
    bad = summary.get("failed") or []
    if bad or summary.get("skipped"):
        why = (f"stage {bad[0]['stage']!r} ({bad[0]['pass']}) failed: {bad[0]['error']}" if bad else
               f"stage {summary['skipped'][0]['stage']!r} skipped: {summary['skipped'][0]['reason']}")
        return _fail(study, trial, why)
    measured = _measure(space, run_dir, leaf)
    if isinstance(measured, str):
        return _fail(study, trial, measured)
    values, attrs = measured
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    for name, v in (attrs.get("constraints") or {}).items():
        trial.set_constraint(name, v)  # the sampler ranks trials that miss the goal behind
    study.tell(trial, values)
    return COMPLETE


#: study user attr prefix: ``pruned_stage:<key>`` -> the trial, stage and verdict that pruned it
PRUNED_STAGE = "pruned_stage:"


def _prune(space: SearchSpace, study: Any, trial: Any, verdict: str, kind: str = PRUNED) -> str:
    import optuna

    trial.set_user_attr("outcome", kind)
    trial.set_user_attr("reason", verdict)
    for name in goal_constraints(space.goal, None):
        trial.set_constraint(name, 1.0)  # a pruned trial counts as missing the goal
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return kind


def _remember_pruned(study: Any, number: int, summary: dict[str, Any], verdict: str) -> None:
    """Record the pruned stage's key (one attr per key: trials side by side never overwrite each other)."""
    failed = _pruned_failure(summary)
    if failed and failed.get("key"):
        study.set_user_attr(PRUNED_STAGE + failed["key"], {"trial": number, "stage": failed["stage"], "verdict": verdict})


def _repeat_of(study: Any, plan: Any, chain: list[tuple[str, str, dict[str, Any]]]) -> tuple[Any, str | None] | None:
    """The earlier trial a new one would only repeat, or None: an earlier complete trial with the
    same chain (the same space, so the same recipe and stage keys) is the same stack
    (``(trial, None)``); a stage whose key was pruned, whose key names its inputs, params and
    seed, would repeat the same evaluations below the floor (``(record, stage)``, the record of
    :func:`_remember_pruned`)."""
    import optuna

    mine = _canonical(_chain_attr(chain))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if outcome(t) == COMPLETE and _canonical(t.user_attrs.get("chain")) == mine:
            return t, None
    attrs = study.user_attrs
    for name in plan.order:
        seen = attrs.get(PRUNED_STAGE + plan.stages[name].key)
        if seen:
            return seen, name
    return None


def _canonical(chain: Any) -> str:
    return json.dumps(chain, sort_keys=True, default=str)


def _settle_repeat(space: SearchSpace, study: Any, trial: Any, earlier: Any, stage: str | None) -> str:
    """Give a repeating trial the earlier result (TPE learns from it) without running anything."""
    if stage is not None:
        return _prune(space, study, trial, f"stage {stage!r} is the stage {earlier['stage']!r} pruned in trial "
                      f"{earlier['trial']} (not trained again, not counted): {earlier['verdict']}", kind=REPEATED)
    trial.set_user_attr("outcome", REPEATED)
    for k in ("objectives", "metric_name", "delta_points", "meets_goal", "goal_failures", "leaf", "constraints"):
        if k in earlier.user_attrs:
            trial.set_user_attr(k, earlier.user_attrs[k])
    for name, v in (earlier.user_attrs.get("constraints") or {}).items():
        trial.set_constraint(name, v)
    trial.set_user_attr("reason", f"the same stack as trial {earlier.number} (equal stage keys): its result; "
                                  "nothing run, not counted")
    study.tell(trial, list(earlier.values))
    return REPEATED


#: how a stage the pruner stopped reads in a run summary's ``failed`` list: the verdict follows
_PRUNED_ERROR = f"{PrunedByRule.__name__}: "


def _pruned_failure(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The summary's record of the stage the pruner stopped (it failed with :class:`PrunedByRule`)."""
    return next((f for f in summary.get("failed") or [] if str(f.get("error") or "").startswith(_PRUNED_ERROR)), None)


def _pruned_remotely(summary: dict[str, Any]) -> str | None:
    """The pruner's verdict when it stopped a stage in another process (a Ray worker): there it
    failed the stage with :class:`PrunedByRule`, whose message is the verdict."""
    failed = _pruned_failure(summary)
    return failed["error"][len(_PRUNED_ERROR):] if failed else None


def _fail(study: Any, trial: Any, why: str) -> str:
    import optuna

    trial.set_user_attr("outcome", FAILED)
    trial.set_user_attr("reason", why)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    log.info("trial %d failed: %s", trial.number, why)
    return FAILED


def _recipe_text(raw: dict[str, Any], n: int, chain: list[tuple[str, str, dict[str, Any]]]) -> str:
    """The trial's recipe as a runnable file (anchors of the space left out)."""
    clean = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}
    head = (f"# stackcomp search, trial {n}: {' -> '.join(p for _, p, _ in chain) or '(prefix only)'}\n"
            "# run it alone with: stackcomp run THIS_FILE --cache <search dir>/artifacts\n")
    return head + yaml.safe_dump(clean, sort_keys=False, allow_unicode=True)


def _pruner(space: SearchSpace, plan: Any, store: Any) -> FloorPruner:
    from stackcomp.rundir import METRICS, read_json

    after = space.spec.after
    measuring = [n for n, s in plan.stages.items() if s.parents[:1] == [after] and not s.pass_cls.changes_model]

    def baseline() -> dict[str, Any] | None:
        key = plan.stages[after].key
        if not store.is_complete(key):
            return None
        merged: dict[str, Any] = {}
        for name in [after, *measuring]:
            try:
                merged.update(read_json(store.path(plan.stages[name].key) / METRICS))
            except StackcompError:
                continue
        return merged

    p = space.spec.pruning
    goal = space.goal
    return FloorPruner(metric=space.spec.metric, min_metric=p.min_metric if p.enabled else None,
                       metric_drop=goal.metric_drop if (p.enabled and goal is not None) else None,
                       slack=p.slack, warmup_evals=p.warmup_evals, baseline=baseline)


def _measure(space: SearchSpace, run_dir: Path, leaf: str) -> tuple[list[float], dict[str, Any]] | str:
    """The objectives of the chain's leaf as ``compare`` measures them, or why they are missing."""
    from stackcomp.report import compare

    comparison = compare([run_dir], goal=space.goal, load_sizes=False, metric=space.spec.metric)
    row = next((r for r in comparison.rows if r.leaf == leaf), None)
    if row is None:
        return f"the leaf {leaf!r} has no row in the leaderboard"
    numbers = {"metric": row.metric, "bytes": row.model_bytes, "latency": row.cpu_latency_ms}
    missing = [o for o in space.spec.objectives if numbers[o] is None]
    if missing:
        return f"objective(s) {', '.join(missing)} not measured by the evaluate stage"
    attrs: dict[str, Any] = {"outcome": COMPLETE, "objectives": numbers, "metric_name": row.metric_name,
                             "delta_points": row.delta_points, "meets_goal": row.meets_goal,
                             "goal_failures": list(row.goal_failures), "leaf": leaf}
    if space.goal is not None:
        attrs["constraints"] = goal_constraints(space.goal, row)
    return [float(numbers[o]) for o in space.spec.objectives], attrs


def goal_constraints(goal: Any, row: Any) -> dict[str, float]:
    """How far ``row`` is from each limit of ``goal``, relative (<= 0: met; unmeasured, or no row: 1)."""
    if goal is None:
        return {}
    out = {}
    if goal.max_bytes is not None:
        out["max_bytes"] = _excess(row and row.model_bytes, goal.max_bytes)
    if goal.max_latency_ms is not None:
        out["max_latency_ms"] = _excess(row and row.cpu_latency_ms, goal.max_latency_ms)
    if goal.metric_drop is not None:
        drop = -row.delta_points if row is not None and row.delta_points is not None else None
        out["metric_drop"] = (drop - goal.metric_drop) / max(goal.metric_drop, 1.0) if drop is not None else 1.0
    return out


def _excess(value: float | None, limit: float) -> float:
    return value / limit - 1 if value is not None else 1.0
