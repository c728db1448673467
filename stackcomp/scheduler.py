"""What runs next: which stages are cached, corrupt or to do, which are ready, which models to free.

The scheduler reads the plan and the artifact store and runs nothing. An executor (local now,
distributed later) runs the stages it hands out; the engine puts the two together.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from stackcomp.artifacts import ArtifactStore
from stackcomp.plan import Plan, Stage

log = logging.getLogger("stackcomp")


class Scheduler:
    """The stages of one plan against one artifact store."""

    def __init__(self, plan: Plan, store: ArtifactStore):
        self.plan = plan
        self.store = store
        self.todo: set[str] = set()
        #: stage -> its children that must run (they need its model)
        self.children_to_run: dict[str, list[str]] = {}

    def status(self) -> dict[str, str]:
        """'cached', 'corrupt: ...' or 'todo' for every stage, without running anything."""
        out = {}
        for name in self.plan.order:
            key = self.plan.stages[name].key
            if not self.store.is_complete(key):
                out[name] = "todo"
            else:
                problem = self.store.verify(key)
                out[name] = "cached" if problem is None else f"corrupt: {problem}"
        return out

    def plan_work(self) -> set[str]:
        """The stages without an intact artifact; corrupt artifacts are discarded (and recomputed)."""
        todo = set()
        for name in self.plan.order:
            key = self.plan.stages[name].key
            if self.store.is_complete(key):
                problem = self.store.verify(key)
                if problem is None:
                    continue
                log.warning("artifact of stage %r (%s) is corrupt: %s; recomputing it", name, key, problem)
                self.store.discard(key)
            todo.add(name)
        # a stage whose artifact exists is still needed as input: nothing to add; but a stage
        # downstream of a recomputed stage has a new key already, so `todo` is complete.
        self.todo = todo
        self.children_to_run = {n: [c for c in self.plan.graph.successors(n) if c in todo] for n in self.plan.order}
        return todo

    def is_cached(self, name: str) -> bool:
        return name not in self.todo

    def ready(self, finished: Iterable[str]) -> list[str]:
        """Stages to run whose parents and teacher are all finished (or cached), in plan order."""
        done = set(finished)
        return [n for n in self.plan.order if n in self.todo and n not in done
                and all(p in done or p not in self.todo for p in self.plan.graph.predecessors(n))]

    def waiting_for(self, name: str, finished: Iterable[str], besides: str | None = None) -> list[str]:
        """Children of ``name`` still to run (other than ``besides``): they will need its model."""
        done = set(finished)
        return [c for c in self.children_to_run.get(name, []) if c != besides and c not in done]

    def releasable(self, stage: Stage, finished: Iterable[str]) -> list[str]:
        """The parents and teacher of ``stage`` (just finished) that no stage still to run needs."""
        done = set(finished)
        inputs = [*stage.parents, *([stage.teacher_stage] if stage.teacher_stage else [])]
        return [p for p in dict.fromkeys(inputs) if not self.waiting_for(p, done)]
