"""Running stages on a Ray cluster: every ready stage at once, one Ray task per stage.

A task runs one stage in a worker process exactly as the local executor does (it builds a
:class:`~stackcomp.executor.LocalExecutor` over the same artifact folder), so keys, artifacts and
metrics are the local run's. Workers read the parents' models from the artifact store, never
from the driver's memory: the store is a folder every node can read and write (a local or
network folder) or object storage (``s3://bucket/prefix``: each worker downloads what it reads
into a local copy, :mod:`stackcomp.remote_store`). Commits are atomic and safe against two
writers of one key (``ArtifactStore.commit``, ``RemoteStore.commit``), so a retried or
duplicated stage never leaves two half-artifacts.

Faults: a worker killed in the middle of a stage makes Ray run the stage again
(``max_retries``); an error raised by the pass itself is not retried but recorded as a failed
stage, as locally.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stackcomp.artifacts import ArtifactStore
from stackcomp.errors import ArtifactError, StackcompError
from stackcomp.executor import LocalExecutor, StageOutcome
from stackcomp.plan import Plan, Stage, stage_resources
from stackcomp.remote_store import open_store

__all__ = ["MAX_RETRIES", "RayExecutor", "connect", "import_ray", "local_cluster", "stage_resources"]

#: how often Ray runs a stage again whose worker process or node died
MAX_RETRIES = 3


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise StackcompError("the ray executor needs Ray: pip install 'stackcomp[cluster]'") from None
    return ray


class RayExecutor:
    """A :class:`~stackcomp.executor.ConcurrentExecutor` over Ray Core tasks."""

    def __init__(self, plan: Plan, store: ArtifactStore, *, address: str | None = None,
                 stage_log: Callable[[str], Path] | None = None, runtime_env: dict | None = None):
        """``address``: the cluster (``auto``, ``ray://host:port``, ``host:port``); none starts a
        Ray inside this process unless one is running already. ``stage_log``: the log file of a
        stage, on a folder the workers can write (the run directory)."""
        ray = import_ray()
        self._ray = ray
        self.plan = plan
        self.store = store
        self._store_url = store.url  # absolute: a worker's working directory is not the driver's
        self._mirror = str(Path(store.root).resolve())  # a remote store's local copies, where a worker can write
        self._stage_log = stage_log
        self._address = address
        if not ray.is_initialized():
            _check_reachable(address)  # before the run starts: a wrong address is one line, not a hang
        self._runtime_env = runtime_env
        self._plan_ref = None
        self._board = None
        self._task = ray.remote(_run_stage_task)
        self._stages: dict[Any, Stage] = {}

    def _connect(self) -> None:
        """Join (or start) the cluster and ship the plan, once, at the first stage to run."""
        ray = self._ray
        connect(self._address, self._runtime_env)
        self._plan_ref = ray.put(self.plan)  # shipped once, not with every task
        # where running stages report their node and step counts; on this node, no CPU asked
        self._board = ray.remote(num_cpus=0)(ProgressBoard).options(
            scheduling_strategy=_this_node_strategy(ray)).remote()

    def submit(self, stage: Stage) -> Hashable:
        if self._plan_ref is None:
            self._connect()
        res = stage_resources(self.plan, stage)
        options: dict[str, Any] = {"num_cpus": res["num_cpus"], "max_retries": MAX_RETRIES,
                                   "retry_exceptions": False}
        if res.get("num_gpus"):
            options["num_gpus"] = res["num_gpus"]
        if res.get("memory"):
            options["memory"] = int(res["memory"])
        log_path = str(Path(self._stage_log(stage.name)).resolve()) if self._stage_log else None
        ref = self._task.options(**options).remote(self._plan_ref, self._store_url, self._mirror, stage.name, log_path,
                                                   res["num_cpus"], self._board)
        self._stages[ref] = stage
        return ref

    def wait(self, handles: Sequence[Hashable], timeout: float | None = None
             ) -> list[tuple[Hashable, StageOutcome | ArtifactError]]:
        """The stages of ``handles`` that are done, once at least one is (or ``timeout`` seconds
        passed: then maybe none, so the driver can redraw the running stages' progress)."""
        ray = self._ray
        done, _ = ray.wait(list(handles), num_returns=1, timeout=timeout)
        if not done:
            return []
        more, _ = ray.wait(list(handles), num_returns=len(handles), timeout=0)
        out = []
        for ref in dict.fromkeys([*done, *more]):
            stage = self._stages.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:  # the task itself died (retries spent, node lost...)
                result = StageOutcome.failed(stage, e)
            out.append((ref, result))
        return out

    def progress(self) -> dict[str, dict[str, Any]]:
        """Per running stage: the ``node`` it runs on and its open ``bars`` ``(description, done,
        total, info)``, as its worker last reported them (none before the first report)."""
        if self._board is None:
            return {}
        try:
            return self._ray.get(self._board.snapshot.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - progress is best effort: never stop a run for it
            return {}

    def cancel(self, handles: Iterable[Hashable]) -> None:
        for ref in handles:
            self._stages.pop(ref, None)
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to stop
                pass

    def run_stage(self, stage: Stage, *, keep_input: bool = False, keep_output: bool = False) -> StageOutcome:
        """One stage on the cluster, waited for (the sequential interface)."""
        ((_, result),) = self.wait([self.submit(stage)])
        if isinstance(result, ArtifactError):
            raise result
        return result

    def release(self, names: Iterable[str]) -> None:
        """Nothing is kept between stages: every task loads its inputs from the store."""


class ProgressBoard:
    """A Ray actor on the driver's node: what each running stage last reported (its node and its
    open progress bars). Workers tell it, the driver reads it to draw its live view."""

    def __init__(self) -> None:
        self._stages: dict[str, dict[str, Any]] = {}

    def report(self, stage: str, node: str, bars: list[tuple]) -> None:
        self._stages[stage] = {"node": node, "bars": bars}

    def done(self, stage: str) -> None:
        self._stages.pop(stage, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self._stages


def _this_node_strategy(ray: Any) -> Any:
    """Keep the board on the driver's node (it dies with the driver, and reads stay local)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


def _run_stage_task(plan: Plan, store_url: str, mirror: str, name: str, log_path: str | None,
                    num_cpus: float, board: Any = None) -> StageOutcome | ArtifactError:
    """Ray task body: run stage ``name`` in this worker with ``num_cpus`` torch threads,
    reporting its node and step counts to ``board``. A training stage that asks for several
    processes (``resources: processes`` or ``num_gpus``) runs as that many accelerate processes
    sharing the threads, started from here (:mod:`stackcomp.ray_stage`)."""
    import ray
    import torch

    from stackcomp.progress import NULL_PROGRESS, ReportingProgress
    from stackcomp.ray_stage import run_stage_processes, stage_processes

    processes = stage_processes(plan, plan.stages[name])
    if processes == 1:
        torch.set_num_threads(max(1, int(num_cpus)))
    node = ray.get_runtime_context().get_node_id()

    def report(bars: list[tuple]) -> None:
        try:
            board.report.remote(name, node, bars)  # fire and forget: a lost report costs nothing
        except Exception:  # noqa: BLE001 - the driver went away; the stage goes on
            pass

    if board is not None:
        report([])
    progress = (lambda: ReportingProgress(report)) if board is not None else (lambda: NULL_PROGRESS)
    try:
        if processes > 1:
            outcome = run_stage_processes(plan, store_url, _worker_mirror(store_url, mirror), name, log_path,
                                          num_cpus, processes, report if board is not None else None)
            if isinstance(outcome, ArtifactError):
                return outcome
        else:
            store = open_store(store_url, _worker_mirror(store_url, mirror))
            executor = LocalExecutor(plan, store, progress=progress,
                                     stage_log=(lambda _name: Path(log_path)) if log_path else None)
            outcome = executor.run_stage(plan.stages[name])
    except ArtifactError as e:  # a resource error: the driver stops the run
        return e
    finally:
        if board is not None:
            try:
                board.done.remote(name)
            except Exception:  # noqa: BLE001
                pass
    outcome.node = node
    return outcome


_connecting = threading.Lock()


def connect(address: str | None = None, runtime_env: dict | None = None) -> float:
    """Join the cluster at ``address`` (none: start a Ray in this process) unless this process
    is connected already; return the cluster's CPU count. Safe from several threads (a search
    runs trials side by side, each with its own executor)."""
    ray = import_ray()
    with _connecting:
        if not ray.is_initialized():
            _check_reachable(address)
            if address not in (None, "local") and _use_token_file():
                _reload_ray_auth()
            try:
                ray.init(address=address, runtime_env=runtime_env, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except ConnectionError as e:
                raise StackcompError(f"cannot reach the Ray cluster at {address!r}: {e}; start it with "
                                     "`ray start --head` (docs/cluster.md)") from None
    return float(ray.cluster_resources().get("CPU", 1))


#: seconds to wait for a TCP connection to the cluster's address before saying it is unreachable
CONNECT_TIMEOUT = 10.0


def _check_reachable(address: str | None) -> None:
    """StackcompError unless something accepts connections at a ``host:port`` or ``ray://host:port``
    address: ``ray.init`` has no timeout and retries an unreachable address for minutes. ``auto``
    and none are Ray's to resolve (it says at once when no cluster runs here)."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep and address.startswith("ray://"):
        host, sep, port = hostport.rstrip("/"), ":", "10001"  # Ray Client's default port
    if not sep or not port.isdigit():
        raise StackcompError(f"Ray address {address!r} is not auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise StackcompError(f"cannot reach the Ray cluster at {address} ({reason}): check that its head runs "
                             "(`ray start --head` there; `ray status` on it), the host and port, and that no "
                             "firewall blocks this machine (docs/cluster.md)") from None


def _worker_mirror(store_url: str, mirror: str) -> Path:
    """Where a worker keeps its local copies of a remote store's artifacts: the driver's folder
    when this node can write it (same machine, shared filesystem), else one in this node's temp
    dir shared by the tasks that run here (copies are written atomically)."""
    path = Path(mirror)
    if path.is_dir() and os.access(path, os.W_OK):
        return path
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "stackcomp-store" / digest




@contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1, *, env: dict[str, str] | None = None,
                  timeout: float = 90, gpus_per_node: Sequence[int] | None = None) -> Iterator[str]:
    """A Ray cluster of ``nodes`` nodes on this machine (a head, then ``ray start --address``),
    each its own processes and temp dir; yields its address, and stops exactly those processes.
    For tests and benchmarks: a real multi-node cluster without a second machine.
    ``gpus_per_node``: the GPUs each node declares (Ray takes ``--num-gpus`` as given, so a test
    can check where a GPU stage lands on a machine without one)."""
    ray = import_ray()
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay short
    # Ray 2.60 turns token authentication on for `ray start --head` once ~/.ray/auth_token exists
    # (any local ray.init() writes it), while a driver joining by address does not read that file
    # unless told to: one token for this cluster, given to its nodes and to this process, keeps
    # nodes and driver agreeing whatever this machine has done before.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **auth, **(env or {})}
    saved_env = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    _reload_ray_auth()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", str(cpus_per_node), "--node-ip-address", "127.0.0.1"]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(nodes):
            where = ["--head", "--port", str(port), "--include-dashboard", "false"] if i == 0 else ["--address", address]
            gpus = ["--num-gpus", str(gpus_per_node[i])] if gpus_per_node else []
            procs.append(_start_node([*where, *common, *gpus, "--temp-dir", str(root / f"node{i}")], env,
                                     root / f"node{i}.log"))
            _wait_for_nodes(address, i + 1, procs, root, timeout)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):
            _stop_node(proc)
        shutil.rmtree(root, ignore_errors=True)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_ray_auth()


def _use_token_file() -> bool:
    """Send this machine's Ray token when joining a cluster, as ``ray start`` does: where
    ``~/.ray/auth_token`` exists and RAY_AUTH_MODE is not set, ``ray start`` turns token
    authentication on, but a driver joining by address (Ray 2.60) does not read the file."""
    if os.environ.get("RAY_AUTH_MODE") or not (Path.home() / ".ray" / "auth_token").is_file():
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    return True


def _reload_ray_auth() -> None:
    """Make this process read RAY_AUTH_MODE/RAY_AUTH_TOKEN again: Ray caches the mode and the
    token at the first ``ray.init`` (what Ray's own tests do between clusters)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """One ``ray start --block`` in its own session: killing its process group ends that node only."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_node(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_nodes(address: str, count: int, procs: list[subprocess.Popen], root: Path, timeout: float) -> None:
    """Until the cluster at ``address`` has ``count`` live nodes (asked from a separate process)."""
    probe = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(root.glob("*.log")))
    raise StackcompError(f"the local Ray cluster did not come up with {count} node(s):\n{logs}")
