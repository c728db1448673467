"""One training stage as several processes inside one Ray task (``resources: {num_gpus: 4}`` or
``{processes: N}``).

The task starts ``accelerate launch --num_processes N -m stackcomp.ray_stage <folder>`` and
waits for it. Every process runs the stage as a local multi-process run does
(:mod:`stackcomp.distributed`): rank 0 runs it and commits into the store, the others follow it
through :class:`~stackcomp.distributed.FollowerStore` and write nothing, and accelerate shards the
batches over all of them (DDP). The folder is how the task and the processes talk: the task
writes the plan and the job there, rank 0 writes its progress (forwarded to the driver's board)
and its outcome, as JSON, which the task returns. A process whose stage fails exits non-zero, so
the launcher stops the others instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stackcomp import distributed
from stackcomp.errors import ArtifactError
from stackcomp.executor import LocalExecutor, StageOutcome
from stackcomp.plan import Plan, Stage, stage_resources
from stackcomp.rundir import atomic_write_json

PLAN = "plan.pkl"
JOB = "job.json"
PROGRESS = "progress.json"
LAUNCH_LOG = "launch.log"
#: ``python -m stackcomp.ray_stage --launch <worker pid> <accelerate launch arguments>``
LAUNCH = "--launch"
#: the part of the launcher's output appended to a failed stage's log
LOG_TAIL = 20_000


def stage_processes(plan: Plan, stage: Stage) -> int:
    """How many processes ``stage`` runs as on the cluster: its ``resources.processes``, else one
    per GPU it asks for; 1 for a stage that does not train (nothing to shard)."""
    if not distributed.stage_trains(stage):
        return 1
    res = stage_resources(plan, stage)
    if res.get("processes"):
        return max(1, int(res["processes"]))
    return max(1, int(res.get("num_gpus") or 0))


def run_stage_processes(plan: Plan, store_url: str, mirror: Path, name: str, log_path: str | None,
                        num_cpus: float, processes: int, report: Callable[[list[tuple]], None] | None = None
                        ) -> StageOutcome | ArtifactError:
    """Run stage ``name`` as ``processes`` accelerate processes sharing ``num_cpus`` threads;
    rank 0's outcome (a resource error: its ArtifactError). ``report`` gets rank 0's open
    progress bars, about every second."""
    from ray import cloudpickle  # how the plan came here: it pickles what pickle cannot

    stage = plan.stages[name]
    work = Path(tempfile.mkdtemp(prefix="stackcomp-stage-"))
    started_at = time.time()
    try:
        with open(work / PLAN, "wb") as f:
            cloudpickle.dump(plan, f)
        threads = max(1, int(num_cpus) // processes)
        atomic_write_json(work / JOB, {"store_url": store_url, "mirror": str(mirror), "stage": name,
                                       "log": log_path, "threads": threads})
        rc, output = _launch(work, processes, threads, report)
        outcome = _read_outcome(work, 0)
        if outcome is None:  # rank 0 died (killed, a follower's failure stopped it, the launcher failed)
            error = (_follower_error(work, processes) or _first_error(output)
                     or f"the {processes} processes of the stage stopped (exit code {rc})")
            outcome = StageOutcome(stage.name, stage.pass_name, stage.key, "failed", error=error, log=log_path,
                                   seconds=time.time() - started_at, started_at=started_at, ended_at=time.time())
        if not (isinstance(outcome, StageOutcome) and outcome.status == "ran"):
            _append_output(log_path, output)
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _launch(work: Path, processes: int, threads: int, report: Callable[[list[tuple]], None] | None
            ) -> tuple[int, str]:
    """``accelerate launch`` the processes and wait for them, forwarding rank 0's progress;
    the launcher's exit code and output. The launcher dies with this process."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           # what this worker can import (a runtime_env's folders), the processes can
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo over CPU processes
    cmd = [sys.executable, "-m", "stackcomp.ray_stage", LAUNCH, str(os.getpid()),
           "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", "-m", "stackcomp.ray_stage", str(work)]
    seen = 0.0
    with open(work / LAUNCH_LOG, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    rc = None
                if report is not None:
                    seen = _forward_progress(work / PROGRESS, seen, report)
                if rc is not None:
                    break
        finally:
            if proc.poll() is None:  # the task was cancelled: the launcher stops its processes
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return rc, (work / LAUNCH_LOG).read_text(errors="replace")


def _launcher(parent: int, args: list[str]) -> int:
    """``accelerate launch args``, ended (SIGTERM, which torchrun passes on to its processes)
    when the Ray worker ``parent`` dies: a killed worker or a forced cancel leaves no processes
    training on behind Ray's back. Set here, not in a ``preexec_fn`` (unsafe in a threaded worker)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, Linux only
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the worker died before that
        return 1
    from accelerate.commands.launch import main as accelerate_launch

    sys.argv = ["accelerate-launch", *args]
    accelerate_launch()
    return 0


def _forward_progress(path: Path, seen: float, report: Callable[[list[tuple]], None]) -> float:
    try:
        mtime = path.stat().st_mtime
        if mtime == seen:
            return seen
        report([tuple(bar) for bar in json.loads(path.read_text())])
        return mtime
    except (OSError, ValueError):
        return seen


def _follower_error(work: Path, processes: int) -> str | None:
    """``process <rank>: Type: message`` of the first follower whose stage failed, if one did."""
    for rank in range(1, processes):
        outcome = _read_outcome(work, rank)
        error = outcome.error if isinstance(outcome, StageOutcome) else str(outcome) if outcome else None
        if error:
            return f"process {rank}: {error}"
    return None


def _read_outcome(work: Path, rank: int) -> StageOutcome | ArtifactError | None:
    try:
        data = json.loads((work / f"outcome-{rank}.json").read_text())
    except (OSError, ValueError):
        return None
    if "artifact_error" in data:
        return ArtifactError(data["artifact_error"])
    return StageOutcome(**data["outcome"])


#: a traceback's last line: ``SomeError: message``
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Interrupt))(?::\s*(.*))?$")


def _first_error(output: str) -> str | None:
    """The first error a process printed (the cause; the launcher's own comes after), as ``Type: message``."""
    for line in output.splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m and m.group(1) != "ChildFailedError":
            return f"{m.group(1)}: {m.group(2) or '(no message)'}"
    return None


def _append_output(log_path: str | None, output: str) -> None:
    """The processes' output, after what rank 0 logged, for a stage that did not run through."""
    if not log_path or not output.strip():
        return
    try:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write("\noutput of the stage's processes (accelerate launch):\n" + output[-LOG_TAIL:])
    except OSError:
        pass


# ----------------------------------------------------------------------------- in each process


def main(argv: list[str] | None = None) -> int:
    """One process of the stage (``python -m stackcomp.ray_stage <folder>`` under accelerate),
    or the launcher of them all (``--launch``)."""
    import pickle

    import torch

    from stackcomp.progress import ReportingProgress
    from stackcomp.remote_store import open_store

    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == LAUNCH:
        return _launcher(int(argv[1]), argv[2:])
    work = Path(argv[0])
    # the plan is a pickle (pass classes, the search's pruner): load it only from the private
    # folder the task made for it (mkdtemp: this user's, mode 0700), never from a shared one
    st = work.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SystemExit(f"stackcomp.ray_stage: {work} is not a private folder of this user; refusing to load its plan")
    job = json.loads((work / JOB).read_text())
    with open(work / PLAN, "rb") as f:
        plan = pickle.load(f)  # written by the task that started this process, into the folder above
    torch.set_num_threads(job["threads"])
    store = open_store(job["store_url"], Path(job["mirror"]))
    rank = distributed.process_index()
    if distributed.is_main_process():
        def report(bars: list[tuple]) -> None:
            try:
                atomic_write_json(work / PROGRESS, [list(b) for b in bars])
            except OSError:  # progress is best effort
                pass

        log = job["log"]
        executor = LocalExecutor(plan, store, progress=lambda: ReportingProgress(report),
                                 stage_log=(lambda _name: Path(log)) if log else None)
    else:
        executor = LocalExecutor(plan, distributed.FollowerStore(store))
    try:
        outcome = executor.run_stage(plan.stages[job["stage"]])
    except ArtifactError as e:
        atomic_write_json(work / f"outcome-{rank}.json", {"artifact_error": str(e)})
        return 1
    if rank and outcome.status == "failed":  # a follower has no log file: its error goes to the launcher's output
        print(f"process {rank}: stage {job['stage']!r} failed: {outcome.error}", file=sys.stderr, flush=True)
    if rank == 0 or outcome.status == "failed":
        atomic_write_json(work / f"outcome-{rank}.json", {"outcome": dataclasses.asdict(outcome)})
    return 0 if outcome.status == "ran" else 1


if __name__ == "__main__":
    sys.exit(main())
