"""Running one stage: load its input model, run the pass, commit the artifact.

:class:`Executor` is the seam between deciding what runs (``stackcomp.scheduler``) and running
it. :class:`LocalExecutor` runs stages one at a time in this process and keeps in memory the
models that a later stage still needs, so a chain of stages never reloads its parent from disk.

A stage whose pass raises is a *failed* stage, not a failed run: its outcome carries the error
as one line, its traceback goes to the stage's log file, and the engine runs the stages that do
not depend on it. Only a resource error (disk full, read-only disk...) stops the run, since
every later stage would hit it too.
"""

from __future__ import annotations

import copy
import datetime as _dt
import errno
import gc
import logging
import re
import shutil
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from stackcomp.artifacts import ArtifactStore, load_model, load_tokenizer, save_model
from stackcomp.errors import ArtifactError, NumericalError, StackcompError
from stackcomp.passes.base import PassContext, run_pass
from stackcomp.plan import Plan, Stage
from stackcomp.progress import NULL_PROGRESS
from stackcomp.rundir import (
    METRICS,
    MODEL_DIR,
    REPORT,
    STAGE,
    TIMINGS,
    read_json,
    write_json,
)
from stackcomp.version import __version__

log = logging.getLogger("stackcomp")


@dataclass
class StageOutcome:
    name: str
    pass_name: str
    key: str
    status: str  # "ran" | "cached" | "failed" | "skipped"
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # failed: "Type: message", one line
    reason: str | None = None  # skipped: why, e.g. "parent 'a' failed"
    log: str | None = None  # failed: the log file holding the traceback
    #: wall-clock start and end (epoch seconds) of a stage that ran here or on a cluster node:
    #: they show which stages overlapped
    started_at: float | None = None
    ended_at: float | None = None
    node: str | None = None  # the cluster node that ran it (None: this process)

    @property
    def finished(self) -> bool:
        """The stage's artifact is there (it ran now or was cached)."""
        return self.status in ("ran", "cached")

    @classmethod
    def failed(cls, stage: Stage, error: BaseException, seconds: float = 0.0, log: Path | None = None) -> StageOutcome:
        return cls(stage.name, stage.pass_name, stage.key, "failed", seconds=seconds,
                   error=error_line(error, stage), log=str(log) if log else None)

    @classmethod
    def skipped(cls, stage: Stage, reason: str) -> StageOutcome:
        return cls(stage.name, stage.pass_name, stage.key, "skipped", reason=reason)

    @classmethod
    def cached(cls, stage: Stage, store: ArtifactStore) -> StageOutcome:
        """The outcome of a stage whose artifact exists: its recorded metrics, no time spent."""
        try:
            metrics = read_json(store.path(stage.key) / METRICS)
        except ArtifactError:
            metrics = {}
        return cls(stage.name, stage.pass_name, stage.key, "cached", metrics=metrics)


class Executor(Protocol):
    """Runs stages the scheduler hands out, one at a time (:class:`ConcurrentExecutor`: many at once).

    ``run_stage`` runs one stage whose parents' artifacts are committed and returns once its own
    artifact is committed under ``stage.key``, or with a "failed" outcome (nothing committed) when
    the stage raised; it raises only to stop the run (a resource error, an interrupt). The flags are memory hints an executor that keeps
    models between stages uses (one that loads every input from its artifact ignores them):
    ``keep_input``: another stage still to run needs the parent's model; ``keep_output``: a
    child will run on this stage's model. ``release`` says those models are no longer needed.
    """

    def run_stage(self, stage: Stage, *, keep_input: bool = False, keep_output: bool = False) -> StageOutcome: ...

    def release(self, names: Iterable[str]) -> None: ...


class ConcurrentExecutor(Protocol):
    """An executor that runs many stages at once (e.g. on a cluster); the engine uses this
    interface instead of ``run_stage`` when an executor has it.

    ``submit`` starts one stage whose parents' artifacts are committed and returns a hashable
    handle at once; the stage loads its inputs from the artifact store. ``wait`` blocks until at
    least one of ``handles`` is done and returns every done one with its result: a
    :class:`StageOutcome` ("ran" or "failed"), or the :class:`ArtifactError` of a resource error,
    which stops the run. ``cancel`` stops stages still running when the run stops.
    """

    def submit(self, stage: Stage) -> Hashable: ...

    def wait(self, handles: Sequence[Hashable]) -> list[tuple[Hashable, StageOutcome | ArtifactError]]: ...

    def cancel(self, handles: Iterable[Hashable]) -> None: ...


def is_concurrent(executor: Any) -> bool:
    """Whether ``executor`` implements :class:`ConcurrentExecutor`."""
    return all(callable(getattr(executor, m, None)) for m in ("submit", "wait", "cancel"))


class LocalExecutor:
    """Runs stages in this process, on the recipe's device, one at a time."""

    def __init__(self, plan: Plan, store: ArtifactStore, *, progress: Callable[[], Any] | None = None,
                 stage_log: Callable[[str], Path] | None = None):
        """``progress``: makes the progress sink a pass reports its steps to (a bar, or nothing);
        ``stage_log``: the log file of a stage (its log lines, a failure's traceback), or none."""
        self.plan = plan
        self.recipe = plan.recipe
        self.store = store
        self.device = resolve_device(self.recipe.device)
        self.models: dict[str, nn.Module] = {}  # stage name -> model a stage still to run needs
        self._progress = progress or (lambda: NULL_PROGRESS)
        self._stage_log = stage_log
        self._task = None
        self._data = None
        self._tokenizer = None

    def run_stage(self, stage: Stage, *, keep_input: bool = False, keep_output: bool = False) -> StageOutcome:
        """The stage's outcome: "ran", or "failed" when anything in it raised (an ``Exception``;
        KeyboardInterrupt and SystemExit still stop the run). A resource error raises ArtifactError."""
        t0 = time.perf_counter()
        started_at = time.time()
        log_path = self._stage_log(stage.name) if self._stage_log else None
        with _logging_to(log_path):
            try:
                metrics = self._run(stage, keep_input=keep_input, keep_output=keep_output)
            except Exception as e:  # noqa: BLE001 - a failing pass fails its stage, not the run
                _append_traceback(log_path, e)
                if isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS:
                    raise ArtifactError(f"stage {stage.name!r} ({stage.pass_name}): {os_reason(e)}; nothing of this "
                                        "stage was kept (finished stages are): fix that and run the same command to "
                                        "resume") from None
                failed = StageOutcome.failed(stage, e, time.perf_counter() - t0, log_path)
                failed.started_at, failed.ended_at = started_at, time.time()
                return failed
        return StageOutcome(stage.name, stage.pass_name, stage.key, "ran", seconds=time.perf_counter() - t0,
                            metrics=metrics, started_at=started_at, ended_at=time.time())

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self.models:
                del self.models[name]
                gc.collect()

    # ------------------------------------------------------------------ one stage

    def _run(self, stage: Stage, *, keep_input: bool, keep_output: bool) -> dict[str, Any]:
        model = self._input_model(stage, keep_input)
        bad = nonfinite_tensor(model)
        if bad:
            source = f"model {self.recipe.model!r}" if not stage.parents else f"the model of stage {stage.parents[0]!r}"
            raise NumericalError(f"stage {stage.name!r}: its input ({source}) holds NaN/Inf in {bad}")
        the_pass = stage.make_pass()
        tmp = self.store.begin(stage.key)
        ctx = PassContext(
            stage=stage.name, work_dir=tmp, task=self._get_task(), tokenizer=self._get_tokenizer(stage),
            data=None, device=self.device, seed=self.recipe.seed, log=logging.getLogger(f"stackcomp.{stage.name}"),
            progress=self._progress(), parent_reports=self._parent_reports(stage),
            upstream_dirs={n: self.store.path(self.plan.stages[n].key) for n in self.plan.ancestors(stage.name)},
            load_teacher=self._teacher_loader(stage),
            recipe_yaml=self.recipe.to_yaml(), load_lock=self._lock,
        )
        if self.recipe.task:
            ctx.data = self._get_data(ctx.tokenizer)
        timings: dict[str, float] = {}
        from stackcomp.train.task import extra_training_callbacks

        try:
            with extra_training_callbacks(self.plan.training_callbacks):
                model = run_pass(the_pass, model, ctx, timings, where=f"stage {stage.name!r}: {stage.pass_name}")
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
                "implicit": stage.implicit, "changes_model": bool(stage.pass_cls.changes_model),
            }
            if stage.pass_cls.changes_model or not stage.parents:
                save_model(model, tmp / MODEL_DIR, tokenizer=ctx.tokenizer)
            else:
                stage_info["model_from"] = self.plan.stages[stage.parents[0]].key
            write_json(tmp / STAGE, stage_info)
            write_json(tmp / METRICS, ctx.metrics)
            write_json(tmp / REPORT, {"analyze": ctx.analysis.report, **ctx.report})
            write_json(tmp / TIMINGS, timings)
            self.store.commit(stage.key, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if keep_output:
            self.models[stage.name] = model
        return ctx.metrics

    def _input_model(self, stage: Stage, keep_input: bool) -> nn.Module:
        if not stage.parents:
            from stackcomp.models import load_base_model

            model, tok = load_base_model(self.recipe.model, self._get_task(),
                                         trust_remote_code=self.recipe.trust_remote_code,
                                         allow_pickle=self.recipe.allow_pickle, seed=self.recipe.seed)
            self._tokenizer = self._tokenizer or tok
            return model.to(self.device)
        parent = stage.parents[0]
        # a stage taught by its own parent changes its input in place while the teacher is copied
        # from the parent later: the parent's model must stay intact
        keep_parent = keep_input or stage.teacher_stage == parent
        if parent in self.models:
            model = self.models[parent]
            return copy.deepcopy(model) if keep_parent else model
        model = self.load_stage_model(parent)
        if keep_parent:
            self.models[parent] = model
            return copy.deepcopy(model)
        return model

    def load_stage_model(self, name: str) -> nn.Module:
        """The model of a finished stage, from its artifact. Not verified again: the scheduler
        checked every cached artifact before the run, and this run's own were checksummed as they
        were committed (rehashing the weights at every load cost a read of the whole file)."""
        key = self.plan.stages[name].key
        try:
            return load_model(self.store.path(key), device=self.device, verify=False)
        except StackcompError as e:
            raise ArtifactError(f"cannot load the model of cached stage {name!r}: {e}") from None

    def _lock(self) -> dict[str, Any]:
        """The run's lock (versions, seeds, data and model hashes, stage keys), as lock.json holds it."""
        from stackcomp.lock import build_lock

        return build_lock(self.plan)

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
                if name in self.models:
                    return copy.deepcopy(self.models[name])
                return self.load_stage_model(name)

            return load_stage_teacher

        def load_model_teacher() -> nn.Module:
            from stackcomp.models import load_base_model

            model, _ = load_base_model(teacher, self._get_task(), trust_remote_code=self.recipe.trust_remote_code,
                                       allow_pickle=self.recipe.allow_pickle, seed=self.recipe.seed)
            return model.to(self.device)

        return load_model_teacher

    # ------------------------------------------------------------------ inputs shared by stages

    def _get_task(self):
        if self._task is None and self.recipe.task:
            from stackcomp.tasks import get_task

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
            self._data = self._get_task().build_data(tokenizer, self.recipe.data_options())
        return self._data

    def _parent_reports(self, stage: Stage) -> dict[str, dict]:
        reports = {}
        for name in reversed(self.plan.ancestors(stage.name)):
            try:
                reports[name] = read_json(self.store.path(self.plan.stages[name].key) / REPORT)
            except ArtifactError:
                continue
        return reports


#: OS errors a user fixes (space, quota, permissions, read-only disks): reported, not a traceback
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                             errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG})


def os_reason(e: OSError) -> str:
    """An OSError as the file and the reason, with a hint when the disk is full."""
    what = e.strerror or str(e)
    hint = " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{e.filename}: {what}{hint}" if e.filename else f"{what}{hint}"


def error_line(e: BaseException, stage: Stage) -> str:
    """``Type: message`` on one line, without a leading ``stage 'name' (pass):`` (the summary says
    which stage failed)."""
    text = " ".join(str(e).split()) or "(no message)"
    text = re.sub(rf"^stage {re.escape(repr(stage.name))}(?: \([^)]*\))?: ", "", text)
    return f"{type(e).__name__}: {text}"


@contextmanager
def _logging_to(path: Path | None) -> Iterator[None]:
    """Copy stackcomp's log records to ``path`` while the block runs (nothing if it cannot be written)."""
    handler = None
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, mode="w", encoding="utf-8", delay=True)
        except OSError:
            handler = None
    if handler is None:
        yield
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("stackcomp")
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _append_traceback(path: Path | None, e: BaseException) -> None:
    """A failed stage's traceback, for its log file (the terminal shows one line)."""
    if path is None:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("stage failed:\n" + "".join(traceback.format_exception(e)))
    except OSError:
        pass


def nonfinite_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or floating buffer holding NaN/Inf, else None."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                return f"{kind} {name!r}"
    return None


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise StackcompError(f"recipe asks for device {spec!r} but no CUDA device is available; use device: auto or cpu")
    return torch.device(spec)
