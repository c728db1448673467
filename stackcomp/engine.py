"""Running a plan: stages in topological order, cached by key, resumable, with progress.

For each stage the engine either finds a complete, intact artifact under the stage's key
(then the stage is *cached* and its model is loaded only if a child must run) or runs the
pass (analyze, transform, finetune) on a copy of its parent's model and writes the artifact
atomically. Shared prefixes of branches therefore run once, and a re-run after a kill or an
error resumes at the first stage without a complete artifact.
"""

from __future__ import annotations

import copy
import datetime as _dt
import errno
import gc
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stackcomp import __version__
from stackcomp.artifacts import ArtifactStore, load_model, load_tokenizer, read_json, save_model, write_json
from stackcomp.errors import ArtifactError, NumericalError, StackcompError
from stackcomp.passes.base import PassContext
from stackcomp.plan import Plan, Stage
from stackcomp.progress import NULL_PROGRESS, RichProgress

log = logging.getLogger("stackcomp")


@dataclass
class StageOutcome:
    name: str
    pass_name: str
    key: str
    status: str  # "ran" | "cached"
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


class Engine:
    """Runs one plan inside one run directory."""

    def __init__(self, plan: Plan, run_dir: str | Path, *, console: Any = None, show_progress: bool = True,
                 cache_dir: str | Path | None = None, full_plan: Plan | None = None):
        """``full_plan``: the recipe's whole plan when ``plan`` is a part of it (``--only``); the
        summary then also lists the stages of the whole plan that are done, so successive
        ``--only`` runs of one recipe add up for ``compare`` and ``report``."""
        self.plan = plan
        self.full_plan = full_plan or plan
        self.recipe = plan.recipe
        self.run_dir = Path(run_dir)
        self.store = ArtifactStore(self.run_dir, artifacts_dir=cache_dir)
        self.console = console
        self.show_progress = show_progress and console is not None
        self.device = _resolve_device(self.recipe.device)
        self._models: dict[str, nn.Module] = {}  # stage name -> model still needed by a child
        self._task = None
        self._data = None
        self._tokenizer = None
        self.outcomes: dict[str, StageOutcome] = {}
        self.stage_runs: list[str] = []  # stages actually executed (for tests and the summary)

    # ------------------------------------------------------------------ public

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

    def run(self) -> dict[str, Any]:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_text(self.run_dir / "recipe.resolved.yaml", self.recipe.to_yaml())
            from stackcomp.lock import write_lock

            write_lock(self.run_dir, self.plan)  # versions, seeds, data/model hashes, hardware
            self.store.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"cannot write the run directory {self.run_dir}: {_os_reason(e)}; "
                                "choose another --output (or free space)") from None
        removed = self.store.clean_temporaries()
        if removed:
            log.info("removed %d half-written artifact folder(s) from an interrupted run", removed)
        todo = self._stages_to_run()
        started = time.time()
        if self.show_progress:
            from rich.live import Live

            with Live(self._renderable(todo), console=self.console, refresh_per_second=4, transient=False) as live:
                self._live = live
                self._execute(todo)
                live.update(self._renderable(todo, final=True))
        else:
            self._live = None
            self._execute(todo)
        summary = self._summary(time.time() - started)
        try:
            _atomic_text(self.run_dir / "summary.json", _dumps(summary))
        except OSError as e:
            raise ArtifactError(f"every stage finished and is saved, but {self.run_dir / 'summary.json'} could not "
                                f"be written: {_os_reason(e)}; run the same command again to write it") from None
        return summary

    # ------------------------------------------------------------------ planning the work

    def _stages_to_run(self) -> set[str]:
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
        return todo

    # ------------------------------------------------------------------ running

    def _execute(self, todo: set[str]) -> None:
        pending_children = {
            n: [c for c in self.plan.graph.successors(n) if c in todo] for n in self.plan.order
        }
        self._pending = pending_children
        for name in self.plan.order:
            stage = self.plan.stages[name]
            if name not in todo:
                self.outcomes[name] = StageOutcome(name, stage.pass_name, stage.key, "cached",
                                                   metrics=self._read_metrics(stage.key))
                self._refresh(todo)
                continue
            self._current = name
            self._refresh(todo)
            t0 = time.perf_counter()
            try:
                metrics = self._run_stage(stage)
            except StackcompError as e:
                _name_stage(e, stage)
                raise
            except OSError as e:
                if e.errno not in _RESOURCE_ERRNOS:
                    raise
                raise ArtifactError(f"stage {name!r} ({stage.pass_name}): {_os_reason(e)}; nothing of this stage was "
                                    "kept (finished stages are): fix that and run the same command to resume") from None
            self.outcomes[name] = StageOutcome(name, stage.pass_name, stage.key, "ran",
                                               seconds=time.perf_counter() - t0, metrics=metrics)
            self.stage_runs.append(name)
            self._current = None
            self._release_parents(stage)
            self._refresh(todo)

    def _run_stage(self, stage: Stage) -> dict[str, Any]:
        model = self._input_model(stage)
        bad = nonfinite_tensor(model)
        if bad:
            source = f"model {self.recipe.model!r}" if not stage.parents else f"the model of stage {stage.parents[0]!r}"
            raise NumericalError(f"stage {stage.name!r}: its input ({source}) holds NaN/Inf in {bad}")
        the_pass = stage.make_pass()
        tmp = self.store.begin(stage.key)
        ctx = PassContext(
            stage=stage.name, work_dir=tmp, task=self._get_task(), tokenizer=self._get_tokenizer(stage),
            data=None, device=self.device, seed=self.recipe.seed, log=logging.getLogger(f"stackcomp.{stage.name}"),
            progress=self._stage_progress(), parent_reports=self._parent_reports(stage),
            load_teacher=self._teacher_loader(stage),
        )
        if self.recipe.task:
            ctx.data = self._get_data(ctx.tokenizer)
        timings = {}
        try:
            t = time.perf_counter()
            analysis = the_pass.analyze(model, ctx) or {}
            timings["analyze"] = time.perf_counter() - t
            t = time.perf_counter()
            model = the_pass.transform(model, ctx)
            timings["transform"] = time.perf_counter() - t
            t = time.perf_counter()
            model = the_pass.finetune(model, ctx)
            timings["finetune"] = time.perf_counter() - t
            if model is None:
                raise StackcompError(f"stage {stage.name!r}: pass {stage.pass_name} returned no model")
            model.eval()
            stage_info = {
                "stage": stage.name, "pass": stage.pass_name, "pass_version": stage.pass_cls.version,
                "pass_class": f"{stage.pass_cls.__module__}:{stage.pass_cls.__qualname__}",
                "params": stage.params.model_dump(mode="json"), "key": stage.key,
                "parents": {p: self.plan.stages[p].key for p in stage.parents},
                "teacher": stage.teacher_stage, "stackcomp_version": __version__,
                "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "implicit": stage.implicit,
            }
            if stage.pass_cls.changes_model or not stage.parents:
                save_model(model, tmp / "model", tokenizer=ctx.tokenizer)
            else:
                stage_info["model_from"] = self.plan.stages[stage.parents[0]].key
            write_json(tmp / "stage.json", stage_info)
            write_json(tmp / "metrics.json", ctx.metrics)
            write_json(tmp / "report.json", {"analyze": analysis, **ctx.report})
            write_json(tmp / "timings.json", timings)
            self.store.commit(stage.key, tmp)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self._pending.get(stage.name):
            self._models[stage.name] = model
        return ctx.metrics

    def _input_model(self, stage: Stage) -> nn.Module:
        if not stage.parents:
            from stackcomp.models import load_base_model

            model, tok = load_base_model(self.recipe.model, self._get_task(),
                                         trust_remote_code=self.recipe.trust_remote_code,
                                         allow_pickle=self.recipe.allow_pickle, seed=self.recipe.seed)
            self._tokenizer = self._tokenizer or tok
            return model.to(self.device)
        parent = stage.parents[0]
        others_waiting = [c for c in self._pending.get(parent, []) if c != stage.name and c not in self.outcomes]
        # a stage taught by its own parent changes its input in place while the teacher is copied
        # from the parent later: the parent's model must stay intact
        keep_parent = bool(others_waiting) or stage.teacher_stage == parent
        if parent in self._models:
            model = self._models[parent]
            return copy.deepcopy(model) if keep_parent else model
        model = self._load_stage_model(parent)
        if keep_parent:
            self._models[parent] = model
            return copy.deepcopy(model)
        return model

    def _load_stage_model(self, name: str) -> nn.Module:
        key = self.plan.stages[name].key
        try:
            return load_model(self.store.path(key), device=self.device)
        except StackcompError as e:
            raise ArtifactError(f"cannot load the model of cached stage {name!r}: {e}") from None

    def _release_parents(self, stage: Stage) -> None:
        for parent in [*stage.parents, *([stage.teacher_stage] if stage.teacher_stage else [])]:
            waiting = [c for c in self._pending.get(parent, []) if c not in self.outcomes]
            if not waiting and parent in self._models:
                del self._models[parent]
                gc.collect()

    def _teacher_loader(self, stage: Stage):
        param = stage.pass_cls.teacher_param
        if not param:
            return None
        teacher = getattr(stage.params, param, None)
        if not teacher:
            return None
        if stage.teacher_stage:
            name = stage.teacher_stage

            def load_stage_teacher() -> nn.Module:
                if name in self._models:
                    return copy.deepcopy(self._models[name])
                return self._load_stage_model(name)

            return load_stage_teacher

        def load_model_teacher() -> nn.Module:
            from stackcomp.models import load_base_model

            model, _ = load_base_model(teacher, self._get_task(), trust_remote_code=self.recipe.trust_remote_code,
                                       allow_pickle=self.recipe.allow_pickle, seed=self.recipe.seed)
            return model.to(self.device)

        return load_model_teacher

    # ------------------------------------------------------------------ shared inputs

    def _get_task(self):
        if self._task is None and self.recipe.task:
            from stackcomp.data import get_task

            self._task = get_task(self.recipe.task)
        return self._task

    def _get_tokenizer(self, stage: Stage):
        if self._tokenizer is None:
            root = self.plan.path_to(stage.name)[0]
            key = self.plan.stages[root].key
            if stage.parents and self.store.is_complete(key):
                self._tokenizer = load_tokenizer(self.store.path(key))
            else:
                from transformers import AutoTokenizer

                from stackcomp.models import resolve_model_path

                self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.recipe.model),
                                                                trust_remote_code=self.recipe.trust_remote_code)
        return self._tokenizer

    def _get_data(self, tokenizer):
        if self._data is None:
            from stackcomp.data import TaskData

            self._data = TaskData(self._get_task(), tokenizer, self.recipe.data_options())
        return self._data

    def _parent_reports(self, stage: Stage) -> dict[str, dict]:
        reports = {}
        for name in reversed(self.plan.ancestors(stage.name)):
            try:
                reports[name] = read_json(self.store.path(self.plan.stages[name].key) / "report.json")
            except ArtifactError:
                continue
        return reports

    def _read_metrics(self, key: str) -> dict[str, Any]:
        try:
            return read_json(self.store.path(key) / "metrics.json")
        except ArtifactError:
            return {}

    # ------------------------------------------------------------------ display and summary

    def _stage_progress(self):
        if not self.show_progress:
            return NULL_PROGRESS
        return RichProgress(self._progress)

    def _renderable(self, todo: set[str], final: bool = False):
        from rich.console import Group
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if not hasattr(self, "_progress"):
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console,
            )
        self._todo = todo
        return Group(self._tree(todo), self._progress) if not final else self._tree(todo)

    def _refresh(self, todo: set[str]) -> None:
        if getattr(self, "_live", None) is not None:
            self._live.update(self._renderable(todo))

    def _tree(self, todo: set[str]):
        from rich.tree import Tree

        tree = Tree(f"[bold]{self.recipe.name}[/] [dim]({self.run_dir})[/]")
        nodes: dict[str, Any] = {}
        for name in self.plan.order:
            stage = self.plan.stages[name]
            outcome = self.outcomes.get(name)
            if outcome and outcome.status == "cached":
                mark = "[green]✓[/] [dim]cached[/]"
            elif outcome:
                mark = f"[green]✓[/] {outcome.seconds:.1f}s"
            elif name == getattr(self, "_current", None):
                mark = "[yellow]▶ running[/]"
            else:
                mark = "[dim]· waiting[/]"
            main = _headline(outcome.metrics) if outcome else ""
            label = f"{name} [dim]{stage.pass_name}[/] {mark} {main}"
            parent = nodes.get(stage.parents[0]) if stage.parents else None
            nodes[name] = (parent or tree).add(label)
        return tree

    def _summary(self, seconds: float) -> dict[str, Any]:
        full = self.full_plan
        shown = set(self.plan.order)
        for name in full.order:  # topological: a stage is shown once its ancestors are
            if (name not in shown and self.store.is_complete(full.stages[name].key)
                    and all(a in shown for a in full.ancestors(name))):
                shown.add(name)
        stages = []
        for name in (n for n in full.order if n in shown):
            stage = full.stages[name]
            o = self.outcomes.get(name) or StageOutcome(name, stage.pass_name, stage.key, "cached",
                                                        metrics=self._read_metrics(stage.key))
            stages.append({
                "stage": name, "pass": stage.pass_name, "key": stage.key, "parents": stage.parents,
                "status": o.status, "seconds": round(o.seconds, 3), "metrics": o.metrics,
                "leaf": not any(c in shown for c in full.graph.successors(name)), "path": full.path_to(name),
            })
        return {
            "recipe": self.recipe.name, "run_dir": str(self.run_dir), "artifacts_dir": str(self.store.root),
            "seconds": round(seconds, 3),
            "ran": list(self.stage_runs), "stackcomp_version": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(self.device), "stages": stages,
        }


def _headline(metrics: dict[str, Any]) -> str:
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
    return "[cyan]" + "  ".join(parts) + "[/]" if parts else ""


#: OS errors a user fixes (space, quota, permissions, read-only disks): reported, not a traceback
_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                              errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG})


def _os_reason(e: OSError) -> str:
    what = e.strerror or str(e)
    hint = " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{e.filename}: {what}{hint}" if e.filename else f"{what}{hint}"


def _name_stage(e: StackcompError, stage: Stage) -> None:
    """Prefix the stage to a pass's error message, unless the message names it already."""
    text = str(e)
    if f"stage {stage.name!r}" not in text:
        e.args = (f"stage {stage.name!r} ({stage.pass_name}): {text}", *e.args[1:])


def nonfinite_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or floating buffer holding NaN/Inf, else None."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                return f"{kind} {name!r}"
    return None


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise StackcompError(f"recipe asks for device {spec!r} but no CUDA device is available; use device: auto or cpu")
    return torch.device(spec)


def _dumps(obj: Any) -> str:
    import json

    from stackcomp.artifacts import _json_default

    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def _atomic_text(path: Path, text: str) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
