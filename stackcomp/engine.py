"""Running a plan: stages in topological order, cached by key, resumable, with progress.

For each stage the engine either finds a complete, intact artifact under the stage's key
(then the stage is *cached* and its model is loaded only if a child must run) or runs the
pass (analyze, transform, finetune) on a copy of its parent's model and writes the artifact
atomically. Shared prefixes of branches therefore run once, and a re-run after a kill or an
error resumes at the first stage without a complete artifact.

A stage that fails is recorded (``failed``, with its error; the traceback in ``logs/<stage>.log``)
and the stages that depend on it are ``skipped``; every other stage still runs, and
``summary.json`` lists both. A re-run retries exactly those: only finished stages have artifacts.
A resource error (disk full...) stops the run after writing the summary, since every later
stage would hit it too.

The engine composes three parts: the scheduler says what runs next (``stackcomp.scheduler``),
the executor runs stages (``stackcomp.executor``: one at a time here, or every ready stage at once
on a Ray cluster, ``stackcomp.ray_executor``), the view draws progress and builds the
summary (``stackcomp.view``). The run directory's files are ``stackcomp.rundir``'s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import networkx as nx

from stackcomp import distributed
from stackcomp.errors import ArtifactError, StackcompError
from stackcomp.executor import (
    ConcurrentExecutor,
    Executor,
    LocalExecutor,
    StageOutcome,
    is_concurrent,
    os_reason,
)
from stackcomp.lock import write_lock
from stackcomp.plan import Plan, Stage
from stackcomp.remote_store import open_store
from stackcomp.rundir import ARTIFACTS, RunDir
from stackcomp.scheduler import Scheduler
from stackcomp.view import RunView, build_summary

log = logging.getLogger("stackcomp")

#: seconds between redraws of remote stages' progress while none of them finishes
PROGRESS_EVERY = 1.0

__all__ = ["Engine", "StageOutcome"]


class Engine:
    """Runs one plan inside one run directory."""

    def __init__(self, plan: Plan, run_dir: str | Path, *, console: Any = None, show_progress: bool = True,
                 cache_dir: str | Path | None = None, full_plan: Plan | None = None,
                 executor: str | None = None, address: str | None = None):
        """``full_plan``: the recipe's whole plan when ``plan`` is a part of it (``--only``); the
        summary then also lists the stages of the whole plan that are done, so successive
        ``--only`` runs of one recipe add up for ``compare`` and ``report``. ``executor``:
        "local" or "ray" (default: the recipe's ``executor.kind``, else local); ``address``: the
        Ray cluster to use (default: the recipe's ``executor.address``, else a local Ray)."""
        self.plan = plan
        self.full_plan = full_plan or plan
        self.recipe = plan.recipe
        self.run_dir = Path(run_dir)
        # a folder, or object storage (s3://...) with local copies in <run>/artifacts
        self.store = open_store(cache_dir, self.run_dir / ARTIFACTS)
        self.files = RunDir(self.run_dir, artifacts_dir=self.store.root)  # the run directory's file names
        # launched as several processes (accelerate launch): the main process runs, the others follow
        self.processes = distributed.process_count()
        self.follower = self.processes > 1 and not distributed.is_main_process()
        if self.follower:
            console = None
        self.console = console
        self.show_progress = show_progress and console is not None
        self.outcomes: dict[str, StageOutcome] = {}
        self.stage_runs: list[str] = []  # stages actually executed (for tests and the summary)
        self.scheduler = Scheduler(plan, self.store)
        self.view = RunView(plan, self.run_dir, self.outcomes, console=console if self.show_progress else None)
        local = LocalExecutor(plan, self.store, progress=self.view.stage_progress, stage_log=self.files.stage_log_path)
        self.device = local.device
        spec = self.recipe.executor
        kind = executor or (spec.kind if spec else "local")
        self.executor: Executor | ConcurrentExecutor = local
        if kind == "ray":
            from stackcomp.ray_executor import RayExecutor

            self.executor = RayExecutor(plan, self.store, address=address or (spec.address if spec else None),
                                        stage_log=self.files.stage_log_path)
        elif kind != "local":
            raise StackcompError(f"unknown executor {kind!r}: use local or ray")
        if self.processes > 1 and kind != "local":
            raise StackcompError(f"launched as {self.processes} processes with the {kind} executor: use one or the "
                                 "other (accelerate launch shards training; Ray runs branches side by side)")

    def status(self) -> dict[str, str]:
        """'cached', 'corrupt: ...' or 'todo' for every stage, without running anything."""
        return self.scheduler.status()

    def run(self) -> dict[str, Any]:
        """Run what is not cached; the summary (also written to ``summary.json``) lists the stages
        that finished, failed (``summary["failed"]``) or were skipped because one they need failed.
        Raises only for the run as a whole: an unwritable run directory, a resource error.
        Launched as several processes, every process returns the main process's summary."""
        if self.follower:
            return self._follow()
        if self.processes > 1:
            summary = None
            try:
                summary = self._run()
            finally:  # a follower waits for the next stage: tell it there is none, even after an error
                distributed.broadcast(distributed.DONE)
                distributed.broadcast(summary)
            return summary
        return self._run()

    def _run(self) -> dict[str, Any]:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.files.write_resolved_recipe(self.recipe.to_yaml())
            write_lock(self.run_dir, self.plan)  # versions, seeds, data/model hashes, hardware
            self.store.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"cannot write the run directory {self.run_dir}: {os_reason(e)}; "
                                "choose another --output (or free space)") from None
        removed = self.store.clean_temporaries()
        if removed:
            log.info("removed %d half-written artifact folder(s) from an interrupted run", removed)
        self.scheduler.plan_work()
        started = time.time()
        stopped: ArtifactError | None = None
        with self.view.live():
            try:
                if is_concurrent(self.executor):
                    self._execute_concurrently()
                else:
                    self._execute()
            except ArtifactError as e:  # a resource error: the summary still says how far the run got
                stopped = e
        if stopped is None:
            try:  # a remote store: local copies of the finished stages, for compare, report and load
                self.store.fetch(o.key for o in self.outcomes.values() if o.finished)
            except ArtifactError as e:
                stopped = e
        summary = build_summary(self.plan, self.full_plan, self.store, self.outcomes, self.stage_runs,
                                self.run_dir, self.device, time.time() - started)
        try:
            self.files.write_summary(summary)
        except OSError as e:
            if stopped is not None:
                raise stopped from None
            done = "the stages that finished are saved" if summary["failed"] else "every stage finished and is saved"
            raise ArtifactError(f"{done}, but {self.files.summary_path} could not "
                                f"be written: {os_reason(e)}; run the same command again to write it") from None
        if stopped is not None:
            raise stopped from None
        return summary

    def _execute(self) -> None:
        """Cached stages first, then whatever the scheduler says is ready, one at a time."""
        self._mark_cached()
        while ready := self.scheduler.ready(self.outcomes):
            stage = self.plan.stages[ready[0]]
            if self.processes > 1:  # the followers join it if it trains
                distributed.broadcast(stage.name)
            self.view.running(stage.name)
            parent = stage.parents[0] if stage.parents else None
            try:
                outcome = self.executor.run_stage(
                    stage,
                    keep_input=bool(parent and self.scheduler.waiting_for(parent, self.outcomes, besides=stage.name)),
                    keep_output=bool(self.scheduler.waiting_for(stage.name, self.outcomes)))
            except ArtifactError as e:  # a resource error stops the run: record how far it got
                self._stop_at(stage, e)
                self.view.running(None)
                raise
            self._record(stage, outcome)
            self.executor.release(self.scheduler.releasable(stage, self.outcomes))
            self.view.running(None)

    def _follow(self) -> dict[str, Any]:
        """A follower's run: join every stage the main process announces that trains, reading
        its input from the store and writing nothing; return the main process's summary."""
        follower = LocalExecutor(self.plan, distributed.FollowerStore(self.store))
        while (name := distributed.broadcast()) != distributed.DONE:
            stage = self.plan.stages[name]
            if distributed.stage_trains(stage):
                outcome = follower.run_stage(stage)
                if outcome.status == "failed":
                    log.warning("process %d: stage %r failed here: %s", distributed.process_index(), name,
                                outcome.error)
        summary = distributed.broadcast()
        if summary is None:
            raise StackcompError("the main process stopped the run with an error (it printed it); "
                                 "run the same command again to resume")
        return summary

    def _mark_cached(self) -> None:
        for name in self.plan.order:
            if self.scheduler.is_cached(name):
                self.outcomes[name] = StageOutcome.cached(self.plan.stages[name], self.store)
        self.view.refresh()

    def _record(self, stage: Stage, outcome: StageOutcome) -> None:
        """Keep a stage's outcome; a failed stage's dependents are skipped."""
        self.outcomes[stage.name] = outcome
        if outcome.status == "failed":
            log.debug("stage %r failed: %s", stage.name, outcome.error)
            self._skip_dependents(stage.name)
        else:
            self.stage_runs.append(stage.name)

    def _execute_concurrently(self) -> None:
        """Cached stages first, then every ready stage submitted at once; each outcome is recorded
        as it arrives, which may make more stages ready. The DAG's width is the parallelism."""
        executor: ConcurrentExecutor = self.executor  # type: ignore[assignment]
        self._mark_cached()
        running: dict[Any, str] = {}  # handle -> stage name
        try:
            while True:
                for name in self.scheduler.ready(self.outcomes):
                    if name not in running.values():
                        running[executor.submit(self.plan.stages[name])] = name
                self.view.running_many(running.values())
                if not running:
                    return
                stop: tuple[Stage, ArtifactError] | None = None
                for handle, result in self._wait(executor, list(running)):
                    stage = self.plan.stages[running.pop(handle)]
                    if isinstance(result, ArtifactError):  # a resource error stops the run
                        stop = stop or (stage, result)
                        continue
                    self._record(stage, result)
                if stop is not None:  # after recording the stages that finished with it
                    self._stop_at(*stop)
                    raise stop[1]
        finally:
            if running:
                executor.cancel(list(running))
            self.view.running(None)

    def _wait(self, executor: ConcurrentExecutor, handles: list[Any]) -> list[tuple[Any, Any]]:
        """The stages of ``handles`` that finished. With an executor that reports its stages'
        progress (the Ray executor: node, step counts) and a live view, the view is redrawn every
        ``PROGRESS_EVERY`` seconds while none finishes."""
        progress = getattr(executor, "progress", None)
        if not callable(progress) or self.view.console is None:
            return executor.wait(handles)
        while not (done := executor.wait(handles, timeout=PROGRESS_EVERY)):
            self.view.remote_progress(progress())
        self.view.remote_progress(progress())
        return done

    def _stop_at(self, stage: Stage, error: ArtifactError) -> None:
        """Record a resource error of ``stage``: it failed, everything not done is skipped."""
        stage_log = self.files.stage_log_path(stage.name)
        self.outcomes[stage.name] = StageOutcome.failed(stage, error, log=stage_log if stage_log.exists() else None)
        self._skip_dependents(stage.name)
        for name in self.plan.order:
            if name not in self.outcomes:
                self.outcomes[name] = StageOutcome.skipped(self.plan.stages[name],
                                                           f"the run stopped at stage {stage.name!r}")

    def _skip_dependents(self, failed: str) -> None:
        """Every stage downstream of ``failed`` (its children, theirs, stages it teaches) is skipped."""
        for name in nx.descendants(self.plan.graph, failed):
            if name not in self.outcomes:
                stage = self.plan.stages[name]
                role = ("parent" if failed in stage.parents else "teacher" if failed == stage.teacher_stage
                        else "upstream stage")
                self.outcomes[name] = StageOutcome.skipped(stage, f"{role} {failed!r} failed")
