"""What a run shows and what it leaves: the live stage tree with progress bars, and the summary.

The view only reads the plan and the outcomes the engine records; it decides nothing.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from stackcomp.version import __version__
from stackcomp.artifacts import ArtifactStore
from stackcomp.executor import StageOutcome
from stackcomp.plan import Plan
from stackcomp.progress import NULL_PROGRESS, RichProgress


class RunView:
    """The rich tree of a running plan (✓ cached / ✓ seconds / ▶ running / · waiting / ✗ failed /
    - skipped) and the progress bars of the running stage; silent without a console."""

    def __init__(self, plan: Plan, run_dir: Path, outcomes: dict[str, StageOutcome], console: Any = None):
        self.plan = plan
        self.run_dir = run_dir
        self.outcomes = outcomes  # shared with the engine, which fills it
        self.console = console
        self.current: str | None = None
        #: stages running at once (a concurrent executor) -> when the view saw them start
        self.active: dict[str, float] = {}
        #: what those stages last reported: stage -> {"node": ..., "bars": [(desc, done, total, info)]}
        self.remote: dict[str, dict[str, Any]] = {}
        self._live = None
        self._progress = None
        if console is not None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
            )

    def stage_progress(self):
        """The progress sink for the stage about to run (bars in the live view, or nothing)."""
        return RichProgress(self._progress) if self._progress is not None else NULL_PROGRESS

    @contextmanager
    def live(self) -> Iterator[None]:
        """Draw the tree while the block runs; leave the final tree (without bars) on screen."""
        if self.console is None:
            yield
            return
        from rich.live import Live

        with Live(self._renderable(), console=self.console, refresh_per_second=4, transient=False) as live:
            self._live = live
            try:
                yield
            finally:  # also when the run stops: the tree shows how far it got
                self.current = None
                live.update(self._renderable(final=True))
                self._live = None

    def running(self, name: str | None) -> None:
        self.current = name
        if name is None:
            self.active = {}
            self.remote = {}
        self.refresh()

    def running_many(self, names: Iterable[str]) -> None:
        """The stages a concurrent executor is running now (each shows its elapsed time)."""
        now = time.time()
        self.active = {n: self.active.get(n, now) for n in names}
        self.refresh()

    def remote_progress(self, snapshot: dict[str, dict[str, Any]]) -> None:
        """Where the running stages run and how far their bars are (from a concurrent executor)."""
        self.remote = snapshot
        self.refresh()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._renderable())

    def _renderable(self, final: bool = False):
        from rich.console import Group

        return self._tree() if final else Group(self._tree(), self._progress)

    def _tree(self):
        from rich.markup import escape
        from rich.tree import Tree

        tree = Tree(f"[bold]{escape(self.plan.recipe.name)}[/] [dim]({escape(str(self.run_dir))})[/]")
        nodes: dict[str, Any] = {}
        for name in self.plan.order:
            stage = self.plan.stages[name]
            outcome = self.outcomes.get(name)
            if outcome and outcome.status == "cached":
                mark = "[green]✓[/] [dim]cached[/]"
            elif outcome and outcome.status == "failed":
                mark = f"[bold red]✗ failed[/] [red]{escape(outcome.error or '')}[/]"
            elif outcome and outcome.status == "skipped":
                mark = f"[dim]- skipped ({escape(outcome.reason or '')})[/]"
            elif outcome:
                where = f" [dim]on {escape(outcome.node[:12])}[/]" if outcome.node else ""
                mark = f"[green]✓[/] {outcome.seconds:.1f}s{where}"
            elif name == self.current:
                mark = "[yellow]▶ running[/]"
            elif name in self.active:
                mark = f"[yellow]▶ running[/] [dim]{time.time() - self.active[name]:.0f}s[/]{_remote_mark(self.remote.get(name))}"
            else:
                mark = "[dim]· waiting[/]"
            main = headline(outcome.metrics) if outcome else ""
            label = f"{escape(name)} [dim]{escape(stage.pass_name)}[/] {mark} {main}"
            parent = nodes.get(stage.parents[0]) if stage.parents else None
            nodes[name] = (parent or tree).add(label)
        return tree


def _remote_mark(report: dict[str, Any] | None) -> str:
    """`` on NODE · train 120/439 loss=0.31`` for a stage running elsewhere, from its last report."""
    if not report:
        return ""
    from rich.markup import escape

    out = f" [dim]on {escape(str(report.get('node') or '')[:12])}[/]" if report.get("node") else ""
    for desc, done, total, info in report.get("bars") or []:
        count = f"{done}/{total}" if total else f"{done}"
        out += f" [dim]·[/] {escape(str(desc).strip())} {count}" + (f" [dim]{escape(info)}[/]" if info else "")
    return out


def headline(metrics: dict[str, Any]) -> str:
    """The main metric, size and latency of a stage, as one short markup string."""
    if not metrics:
        return ""
    main = metrics.get("main_metric")
    parts = []
    if main and main in metrics:
        parts.append(f"{main}={metrics[main]:.4f}")
    if metrics.get("model_bytes"):
        parts.append(f"{metrics['model_bytes'] / 1e6:.1f}MB")
    if metrics.get("latency_ms_per_batch"):
        parts.append(f"{metrics['latency_ms_per_batch']:.1f}ms/batch")
    from rich.markup import escape

    return "[cyan]" + escape("  ".join(parts)) + "[/]" if parts else ""


def build_summary(plan: Plan, full_plan: Plan, store: ArtifactStore, outcomes: dict[str, StageOutcome],
                  ran: list[str], run_dir: Path, device: Any, seconds: float) -> dict[str, Any]:
    """``summary.json``: every stage of ``plan``, plus the stages of ``full_plan`` (the whole recipe,
    when ``plan`` is an ``--only`` part of it) whose artifacts and ancestors are there, so that
    successive ``--only`` runs add up. Everything ``report``/``compare`` need of the plan is here:
    they read runs without planning them again. Stages that failed or were skipped are not among
    ``stages`` (they have no artifact) but listed in ``failed`` and ``skipped``."""
    unfinished = {n for n, o in outcomes.items() if not o.finished}
    shown = {n for n in plan.order if n not in unfinished and (n in outcomes or store.is_complete(plan.stages[n].key))}
    for name in full_plan.order:  # topological: a stage is shown once its ancestors are
        if (name not in shown and name not in unfinished and store.is_complete(full_plan.stages[name].key)
                and all(a in shown for a in full_plan.ancestors(name))):
            shown.add(name)
    stages = []
    for name in (n for n in full_plan.order if n in shown):
        stage = full_plan.stages[name]
        o = outcomes.get(name) or StageOutcome.cached(stage, store)
        stages.append({
            "stage": name, "pass": stage.pass_name, "key": stage.key, "parents": stage.parents,
            "status": o.status, "seconds": round(o.seconds, 3), "metrics": o.metrics,
            "leaf": not any(c in shown for c in full_plan.graph.successors(name)), "path": full_plan.path_to(name),
            "changes_model": bool(stage.pass_cls.changes_model), "teacher": stage.teacher_stage,
            **_when_where(o),
        })
    return {
        # artifacts_dir: the folder the artifacts are read from here (a remote store's local
        # copies); store: where they are kept (the same folder, or an s3:// URL)
        "recipe": plan.recipe.name, "run_dir": str(run_dir), "artifacts_dir": str(store.root), "store": store.url,
        "seconds": round(seconds, 3),
        "ran": list(ran), "stackcomp_version": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "device": str(device), "stages": stages,
        "failed": [{"stage": o.name, "pass": o.pass_name, "key": o.key, "error": o.error, "log": o.log,
                    "seconds": round(o.seconds, 3), **_when_where(o)}
                   for n in plan.order if (o := outcomes.get(n)) and o.status == "failed"],
        "skipped": [{"stage": o.name, "pass": o.pass_name, "key": o.key, "reason": o.reason}
                    for n in plan.order if (o := outcomes.get(n)) and o.status == "skipped"],
    }


def _when_where(o: StageOutcome) -> dict[str, Any]:
    """When a stage that ran started and ended (epoch seconds) and on which node, if it ran now."""
    if o.started_at is None:
        return {}
    return {"started_at": round(o.started_at, 3), "ended_at": round(o.ended_at or o.started_at, 3), "node": o.node}
