"""The Python API beside the CLI: run a recipe, compare runs, load a model.

``stackcomp.run`` does what ``stackcomp run`` does (the same checks, keys, cache and artifacts)
and returns the summary as typed objects; ``stackcomp.compare`` returns the leaderboard that
``stackcomp compare`` prints; ``stackcomp.load`` reloads any artifact's model::

    import stackcomp

    result = stackcomp.run("recipes/minilm_sst2_finetune.yaml", overrides=["stages.ft.params.train.max_steps=20"])
    print(result.stage("eval").metrics["accuracy"])
    model = stackcomp.load(result.artifact("ft"))
    board = stackcomp.compare(result.run_dir)

Errors are the CLI's: a ``StackcompError`` for a mistake in the recipe or its inputs (nothing
runs); a stage that fails is recorded (``result.failed``), independent stages still run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackcomp.errors import StackcompError

__all__ = ["RunResult", "StageResult", "compare", "run"]


@dataclass(frozen=True)
class StageResult:
    """One stage of a run: finished (``ran``/``cached``), ``failed`` or ``skipped``."""

    stage: str
    pass_name: str
    key: str
    status: str
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    parents: tuple[str, ...] = ()
    leaf: bool = False
    #: why it failed (``Type: message``) or was skipped
    error: str | None = None
    #: the stage's log file (its traceback when it failed)
    log: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ran", "cached")


@dataclass(frozen=True)
class RunResult:
    """What a run did, read from its ``summary.json`` (``raw`` holds that document)."""

    recipe: str
    #: the recipe's task (None for a recipe without one)
    task: str | None
    run_dir: Path
    artifacts_dir: Path
    seconds: float
    stages: tuple[StageResult, ...]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any], task: str | None = None) -> RunResult:
        stages = [StageResult(stage=s["stage"], pass_name=s["pass"], key=s["key"], status=s["status"],
                              seconds=float(s.get("seconds", 0.0)), metrics=dict(s.get("metrics") or {}),
                              parents=tuple(s.get("parents") or ()), leaf=bool(s.get("leaf")))
                  for s in summary.get("stages", [])]
        stages += [StageResult(stage=f["stage"], pass_name=f["pass"], key=f["key"], status="failed",
                               seconds=float(f.get("seconds", 0.0)), error=f.get("error"), log=f.get("log"))
                   for f in summary.get("failed", [])]
        stages += [StageResult(stage=s["stage"], pass_name=s["pass"], key=s["key"], status="skipped",
                               error=s.get("reason")) for s in summary.get("skipped", [])]
        return cls(recipe=summary["recipe"], task=task, run_dir=Path(summary["run_dir"]),
                   artifacts_dir=Path(summary["artifacts_dir"]), seconds=float(summary.get("seconds", 0.0)),
                   stages=tuple(stages), raw=dict(summary))

    @property
    def ok(self) -> bool:
        """True when no stage failed or was skipped."""
        return all(s.ok for s in self.stages)

    @property
    def failed(self) -> tuple[StageResult, ...]:
        return tuple(s for s in self.stages if s.status == "failed")

    @property
    def leaves(self) -> tuple[StageResult, ...]:
        return tuple(s for s in self.stages if s.leaf)

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.stage == name:
                return s
        raise StackcompError(f"run {self.recipe!r} has no stage {name!r}; it has "
                             f"{', '.join(s.stage for s in self.stages)}")

    def artifact(self, name: str) -> Path:
        """The artifact folder of a finished stage (what :func:`stackcomp.load` takes)."""
        s = self.stage(name)
        if not s.ok:
            raise StackcompError(f"stage {name!r} has no artifact: it {s.status} ({s.error})")
        return self.artifacts_dir / s.key


def run(recipe: str | Path | Mapping[str, Any], overrides: Iterable[str] = (), out: str | Path | None = None, *,
        cache: str | Path | None = None, only: Iterable[str] = (), progress: bool = False, console: Any = None,
        executor: str | None = None, address: str | None = None) -> RunResult:
    """Run (or resume) a recipe: a YAML path or the recipe as a dict. ``stackcomp run`` calls this.

    ``overrides``: ``key=value`` strings as on the command line (``a,b`` sweeps); ``out``: the run
    directory (default ``runs/<recipe name>``); ``cache``: an artifact store shared by runs (a
    folder, ``file://`` URL or ``s3://bucket/prefix``; see ``stackcomp.artifacts.open_store``);
    ``only``: run only these stages (names, or comma lists) and what they need; ``progress``: show
    the rich live view (on ``console``, default stderr); ``executor``/``address``: ``local`` or
    ``ray`` and the Ray cluster (default: the recipe's ``executor:``).
    """
    from rich.console import Console

    from stackcomp.engine import Engine
    from stackcomp.plan import build_plan, check_inputs
    from stackcomp.recipe import load_recipe, recipe_from_dict
    from stackcomp.rundir import default_run_dir

    overrides = list(overrides)
    if isinstance(recipe, Mapping):
        if overrides:
            raise StackcompError("stackcomp.run: overrides apply to a recipe file; edit the dict instead")
        r = recipe_from_dict(dict(recipe))
    else:
        r = load_recipe(Path(recipe), overrides)
    full_plan = build_plan(r)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    plan = full_plan.select(names) if names else full_plan
    check_inputs(plan)  # a missing model, data file or unknown task stops here, before any stage
    run_dir = Path(out) if out is not None else default_run_dir(r.name)
    if progress and console is None:
        console = Console(stderr=True)
    engine = Engine(plan, run_dir, console=console if progress else None, show_progress=progress,
                    cache_dir=cache, full_plan=full_plan, executor=executor, address=address)
    return RunResult.from_summary(engine.run(), task=r.task)


def compare(*targets: str | Path, metric: str | None = None, goal: Any = None, load_sizes: bool = True) -> Any:
    """The leaderboard of every leaf of the given runs (run directories or recipe files that were
    run): a :class:`stackcomp.report.Comparison`; ``.to_json()`` gives what ``compare --json`` prints."""
    from stackcomp.report import compare as compare_runs

    return compare_runs(list(targets), goal=goal, load_sizes=load_sizes, metric=metric)
