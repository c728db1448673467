"""The Ray executor on a real two-node Ray cluster started here (a head and a second node, one CPU
each, separate processes and temp dirs, sharing only the artifact folder): same keys, metrics
and weights as the local executor, branches that really overlap, a killed worker retried."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import _ray_passes  # registers _ray_slow_scale in this process (the workers import it too)
import pytest
import yaml
from _s3_server import s3_server
from _scale_pass import make_scale_pass
from typer.testing import CliRunner

from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.errors import ArtifactError, StackcompError
from stackcomp.executor import LocalExecutor
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict
from stackcomp.rundir import CHECKSUMS

try:
    import ray
except ImportError:
    ray = None
try:
    import moto.server  # noqa: F401
    import s3fs  # noqa: F401
    HAVE_S3 = True
except ImportError:
    HAVE_S3 = False
needs_ray = pytest.mark.skipif(ray is None, reason="the Ray executor needs ray: pip install 'stackcomp[cluster]'")

TESTS = Path(__file__).resolve().parent
SLEEP = 1.5


def four_branches(model_dir: Path) -> dict:
    stages = {"root": {"pass": "_ray_slow_scale", "params": {"factor": 2.0}}}
    for i, factor in enumerate((3.0, 5.0, 7.0, 11.0)):
        stages[f"b{i}"] = {"pass": "_ray_slow_scale", "after": "root", "params": {"factor": factor, "sleep": SLEEP}}
    return {"name": "four", "model": str(model_dir), "stages": stages}


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node on this machine, one CPU each (the second declares one GPU, so
    GPU stages have somewhere to land), and an S3-compatible server whose
    settings the nodes have (where moto and s3fs are installed); yields (address, control folder,
    (s3 url, s3 environment) or None)."""
    from stackcomp.ray_executor import local_cluster

    with tempfile.TemporaryDirectory(prefix="rtc", dir="/tmp") as control, contextlib.ExitStack() as stack:
        s3 = stack.enter_context(s3_server()) if HAVE_S3 else None
        env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               _ray_passes.CONTROL_ENV: control, **(s3[1] if s3 else {})}
        cm = local_cluster(nodes=2, cpus_per_node=1, env=env, timeout=60, gpus_per_node=[0, 1])
        try:
            address = cm.__enter__()
        except StackcompError as e:
            # an environment that cannot host a cluster (a sandbox that refuses connections
            # to the address Ray binds its head to)
            pytest.skip(f"a local two-node Ray cluster could not start here: {str(e).splitlines()[0]}")
        try:
            yield address, Path(control), s3
        finally:
            cm.__exit__(None, None, None)


@pytest.fixture(params=["folder", "s3"])
def store(request, cluster, monkeypatch):
    """Where the Ray runs keep their artifacts: the run directory (a folder every node reads, as a
    network folder would be) or a prefix in the S3-compatible server (the driver and the workers
    read and write it over HTTP; the run directory only holds local copies)."""
    if request.param == "folder":
        return None
    s3 = cluster[2]
    if s3 is None:
        pytest.skip("the S3 store needs s3fs and moto[server]: pip install 'stackcomp[cluster]' 'moto[server]'")
    url, env = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return f"{url}/{request.node.name.replace('[', '-').rstrip(']')}"


def _results(run_dir: Path, summary: dict) -> dict:
    """Per stage: key, metrics (no timings) and the checksums of its weight files."""
    out = {}
    for s in summary["stages"]:
        sums = json.loads((run_dir / "artifacts" / s["key"] / CHECKSUMS).read_text())
        weights = {f: v for f, v in sums.items() if f.startswith("model/")}
        metrics = {k: v for k, v in s["metrics"].items() if "latency" not in k and "seconds" not in k}
        out[s["stage"]] = (s["key"], metrics, weights)
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dirs):
    run_dir = tmp_path_factory.mktemp("local") / "run"
    summary = Engine(build_plan(recipe_from_dict(four_branches(tiny_model_dirs["bert"]))), run_dir).run()
    return run_dir, summary


def _ray_run(run_dir: Path, model_dir: Path, address: str, cache: str | None = None) -> tuple[Engine, dict]:
    raw = {**four_branches(model_dir), "executor": {"kind": "ray", "address": address}}
    engine = Engine(build_plan(recipe_from_dict(raw)), run_dir, cache_dir=cache)
    return engine, engine.run()


def _committed_keys(store_url: str) -> set[str]:
    """Keys with a commit marker under an s3:// prefix: what the store says is finished."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    base = store_url.removeprefix("s3://")
    return {p.split("/")[-2] for p in fs.find(base) if p.endswith(f"/{CHECKSUMS}")
            and p.count("/") == base.count("/") + 2}


@needs_ray
def test_ray_matches_local_and_branches_overlap(cluster, store, local_run, tmp_path, tiny_model_dirs):
    address = cluster[0]
    engine, summary = _ray_run(tmp_path / "run", tiny_model_dirs["bert"], address, cache=store)
    assert summary["failed"] == [] and summary["skipped"] == []
    if store:
        assert _committed_keys(store) == {s["key"] for s in summary["stages"]}
    local_dir, local_summary = local_run
    assert _results(tmp_path / "run", summary) == _results(local_dir, local_summary)
    assert sorted(engine.stage_runs) == sorted(local_summary["ran"])
    rows = {s["stage"]: s for s in summary["stages"]}
    branches = [rows[f"b{i}"] for i in range(4)]
    assert len({b["node"] for b in branches}) == 2  # both nodes ran branches
    overlapping = [(a["stage"], b["stage"]) for i, a in enumerate(branches) for b in branches[i + 1:]
                   if a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]]
    assert overlapping, {b["stage"]: (b["started_at"], b["ended_at"]) for b in branches}
    # two at a time on two one-CPU nodes: the branches took less time than one after another
    span = max(b["ended_at"] for b in branches) - min(b["started_at"] for b in branches)
    assert span < sum(b["ended_at"] - b["started_at"] for b in branches), span


@needs_ray
def test_killed_worker_is_retried_with_the_same_results(cluster, store, local_run, tmp_path, tiny_model_dirs):
    address, control, _ = cluster
    hold = control / "hold-b2"
    hold.write_text("")
    pid_file = control / "b2.pid"
    pid_file.unlink(missing_ok=True)
    killed: list[int] = []

    def kill_b2_once() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not pid_file.exists():
            time.sleep(0.05)
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        hold.unlink(missing_ok=True)  # the retry goes through

    killer = threading.Thread(target=kill_b2_once, daemon=True)
    killer.start()
    try:
        engine, summary = _ray_run(tmp_path / "run", tiny_model_dirs["bert"], address, cache=store)
    finally:
        hold.unlink(missing_ok=True)
        killer.join(10)
    assert killed, "stage b2 never started"
    assert int(pid_file.read_text()) != killed[0]  # b2 ran again in another worker
    assert summary["failed"] == [] and summary["skipped"] == []
    local_dir, local_summary = local_run
    assert _results(tmp_path / "run", summary) == _results(local_dir, local_summary)
    assert sorted(engine.stage_runs) == sorted(local_summary["ran"])  # each stage recorded once
    leftovers = [p.name for p in (tmp_path / "run" / "artifacts").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == [] or all(str(killed[0]) in n for n in leftovers)
    if store:  # the killed attempt left no committed half-artifact in the bucket either
        assert _committed_keys(store) == {s["key"] for s in summary["stages"]}


@needs_ray
def test_a_failing_branch_does_not_stop_the_others(cluster, tmp_path, tiny_model_dirs):
    address = cluster[0]
    raw = four_branches(tiny_model_dirs["bert"])
    raw["stages"]["b1"]["params"]["sleep"] = -1.0  # time.sleep(-1) raises in the worker
    raw["executor"] = {"kind": "ray", "address": address}
    summary = Engine(build_plan(recipe_from_dict(raw)), tmp_path / "run").run()
    assert [f["stage"] for f in summary["failed"]] == ["b1"]
    assert summary["failed"][0]["error"].startswith("ValueError")  # recorded, not retried
    assert [s["stage"] for s in summary["skipped"]] == ["b1.eval"]
    assert {"b0", "b2", "b3"} <= {s["stage"] for s in summary["stages"]}


class ThreadExecutor:
    """The concurrent interface over threads running the local executor: the engine's side of
    concurrency (failure isolation, resource errors, the summary) tested without Ray."""

    def __init__(self, plan, store):
        self.local = LocalExecutor(plan, store)
        self.pool = concurrent.futures.ThreadPoolExecutor(4)

    def submit(self, stage):
        return self.pool.submit(self._one, stage)

    def _one(self, stage):
        try:
            return self.local.run_stage(stage)
        except ArtifactError as e:
            return e

    def wait(self, handles):
        done, _ = concurrent.futures.wait(handles, return_when=concurrent.futures.FIRST_COMPLETED)
        return [(f, f.result()) for f in done]

    def cancel(self, handles):
        for f in handles:
            f.cancel()


SCALE_CALLS: list[str] = []
SCALE_FAIL: dict[str, BaseException] = {}
make_scale_pass("_ray_test_scale", SCALE_CALLS, fail=SCALE_FAIL)


def _threaded(model_dir: Path, run_dir: Path) -> Engine:
    stages = {"root": {"pass": "_ray_test_scale"},
              **{f"b{i}": {"pass": "_ray_test_scale", "after": "root", "params": {"factor": 3.0 + i}} for i in range(4)}}
    engine = Engine(build_plan(recipe_from_dict({"name": "t", "model": str(model_dir), "stages": stages})), run_dir)
    engine.executor = ThreadExecutor(engine.plan, engine.store)
    return engine


def test_concurrent_engine_isolates_a_failed_branch(tmp_path, tiny_model_dirs):
    SCALE_CALLS.clear()
    SCALE_FAIL.clear()
    SCALE_FAIL["b1"] = RuntimeError("boom in b1")
    summary = _threaded(tiny_model_dirs["bert"], tmp_path / "run").run()
    assert [(f["stage"], f["error"]) for f in summary["failed"]] == [("b1", "RuntimeError: boom in b1")]
    assert [s["stage"] for s in summary["skipped"]] == ["b1.eval"]
    assert {s["stage"] for s in summary["stages"]} == {"root", "b0", "b2", "b3", "b0.eval", "b2.eval", "b3.eval"}
    assert all(s["started_at"] <= s["ended_at"] for s in summary["stages"])
    SCALE_CALLS.clear()
    SCALE_FAIL.clear()
    e = _threaded(tiny_model_dirs["bert"], tmp_path / "run")
    e.run()  # the re-run retries exactly the failed branch
    assert SCALE_CALLS == ["b1"] and sorted(e.stage_runs) == ["b1", "b1.eval"]


def test_concurrent_engine_stops_at_a_resource_error_and_writes_the_summary(tmp_path, tiny_model_dirs):
    SCALE_FAIL.clear()
    SCALE_FAIL["b2"] = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    with pytest.raises(ArtifactError, match="disk full"):
        _threaded(tiny_model_dirs["bert"], tmp_path / "run").run()
    SCALE_FAIL.clear()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [f["stage"] for f in summary["failed"]] == ["b2"]
    assert "b2.eval" in {s["stage"] for s in summary["skipped"]}


def test_resources_and_executor_are_not_in_the_keys(tiny_model_dirs):
    from stackcomp.ray_executor import stage_resources

    raw = four_branches(tiny_model_dirs["bert"])
    plain = build_plan(recipe_from_dict(raw))
    raw["stages"]["b0"]["resources"] = {"num_cpus": 2, "memory": "1GiB"}
    raw["executor"] = {"kind": "ray", "address": "auto"}
    placed = build_plan(recipe_from_dict(raw))
    assert {n: s.key for n, s in placed.stages.items()} == {n: s.key for n, s in plain.stages.items()}
    assert stage_resources(placed, placed.stages["b0"]) == {"num_cpus": 2, "memory": 2**30}
    assert stage_resources(placed, placed.stages["b1"]) == {"num_cpus": 1}  # the pass's default
    assert stage_resources(placed, placed.stages["b0.eval"]) == {"num_cpus": 1}


def test_without_ray_the_cli_says_what_to_install(tmp_path, tiny_model_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(four_branches(tiny_model_dirs["bert"])))
    result = CliRunner().invoke(app, ["run", str(recipe), "--executor", "ray", "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "pip install 'stackcomp[cluster]'" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@needs_ray
def test_the_live_view_shows_where_remote_stages_run_and_their_steps(cluster, tmp_path, tiny_model_dirs,
                                                                     monkeypatch):
    """While branches run on the cluster the driver's tree shows each one's node and its bar's
    step count, as its worker reports them."""
    import io

    from rich.console import Console

    from stackcomp.view import RunView

    seen: list[dict] = []
    original = RunView.remote_progress

    def record(self, snapshot):
        seen.append(snapshot)
        original(self, snapshot)

    monkeypatch.setattr(RunView, "remote_progress", record)
    raw = {**four_branches(tiny_model_dirs["bert"]), "executor": {"kind": "ray", "address": cluster[0]}}
    for i in range(4):  # steps of 0.4 s: several of the worker's (1 s) and the driver's (1 s) ticks each
        raw["stages"][f"b{i}"]["params"]["sleep"] = 4.0
    engine = Engine(build_plan(recipe_from_dict(raw)), tmp_path / "run", console=Console(file=io.StringIO()))
    summary = engine.run()
    assert summary["failed"] == []
    nodes = {s["stage"]: s["node"] for s in summary["stages"]}
    reports = [(stage, r) for snap in seen for stage, r in snap.items() if stage.startswith("b")]
    assert reports, "no progress reached the driver"
    assert {r["node"] for stage, r in reports} <= set(nodes.values())
    assert all(r["node"] == nodes[stage] for stage, r in reports)  # the node the stage finished on
    counts = [done for _, r in reports for desc, done, total, _ in r["bars"] if desc == "sleep" and total == 10]
    assert counts and 0 < max(counts) <= 10  # steps counted while running
    stage, report = next((s, r) for s, r in reports if r["bars"])
    view = RunView(engine.plan, tmp_path / "run", {})
    view.active, view.remote = {stage: time.time()}, {stage: report}
    Console(file=(out := io.StringIO()), width=200).print(view._tree())
    desc, done, total, _ = report["bars"][0]
    assert f"on {report['node'][:12]}" in out.getvalue() and f"sleep {done}/10" in out.getvalue()


@needs_ray
def test_a_gpu_stage_lands_on_the_gpu_node(cluster, tmp_path, tiny_model_dirs):
    """A stage whose ``resources`` ask for a GPU runs on the node that has one (here the second
    node declares one; the stage's torch sees no CUDA and runs on the CPU)."""
    raw = {**four_branches(tiny_model_dirs["bert"]), "executor": {"kind": "ray", "address": cluster[0]}}
    for name in ("b0", "b2"):
        raw["stages"][name]["resources"] = {"num_gpus": 1}
    ray.init(address=cluster[0], log_to_driver=False, ignore_reinit_error=True)  # the executor joins it too
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    summary = Engine(build_plan(recipe_from_dict(raw)), tmp_path / "run").run()
    assert summary["failed"] == [] and len(gpu_nodes) == 1
    nodes = {s["stage"]: s["node"] for s in summary["stages"]}
    assert {nodes["b0"], nodes["b2"]} == gpu_nodes


@needs_ray
def test_a_killed_driver_resumes_from_the_store(cluster, tmp_path, tiny_model_dirs):
    """SIGKILL the driver (``stackcomp run --executor ray``) while one branch is held and the rest
    are done; run the same command again: only the held branch runs, and the results equal an
    uninterrupted local run's. (With the folder store; the S3 store's resume is the same code,
    checked in test_remote_store.py and by the killed-worker test above.)"""
    store = None
    import subprocess

    address, control, _ = cluster
    raw = four_branches(tiny_model_dirs["bert"])
    for spec in raw["stages"].values():  # by module: the CLI's process imports it from PYTHONPATH
        spec["pass"] = "_ray_passes:SlowScalePass"
    raw["allow_plugins"] = ["_ray_passes:SlowScalePass"]
    local_summary = Engine(build_plan(recipe_from_dict(raw)), tmp_path / "local").run()
    keys = {s["stage"]: s["key"] for s in local_summary["stages"]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**raw, "executor": {"kind": "ray", "address": address}}))
    cmd = [sys.executable, "-m", "stackcomp.cli", "run", str(recipe), "-o", str(tmp_path / "run"), "--json",
           *(["--cache", store] if store else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}

    def committed() -> set[str]:
        if store:
            return _committed_keys(store)
        return {k for k in keys.values() if (tmp_path / "run" / "artifacts" / k / CHECKSUMS).exists()}

    hold = control / "hold-b3"
    hold.write_text("")
    (control / "b3.pid").unlink(missing_ok=True)
    others = {keys[n] for n in keys if not n.startswith("b3")}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (others <= committed() and (control / "b3.pid").exists()):
            assert driver.poll() is None, "the driver stopped before it was killed"
            time.sleep(0.2)
        assert others <= committed(), "the other stages did not finish in time"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
        hold.unlink(missing_ok=True)
    assert keys["b3"] not in committed()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert sorted(summary["ran"]) == ["b3", "b3.eval"]  # the rest came from the store
    assert _results(tmp_path / "run", summary) == _results(tmp_path / "local", local_summary)


@needs_ray
def test_a_driver_joins_a_cluster_that_ray_start_made_with_the_machines_token(tmp_path, monkeypatch):
    """Where ~/.ray/auth_token exists, `ray start --head` turns token authentication on; the
    driver must then send that token although RAY_AUTH_MODE is not set (Ray 2.60 does not)."""
    import secrets
    import socket as _socket
    import subprocess

    from stackcomp.ray_executor import _stop_node, connect

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="rth", dir="/tmp")
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--head", "--port", str(port),
                             "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                             "--temp-dir", temp], env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if ray.is_initialized():
            ray.shutdown()
        deadline = time.time() + 60
        while True:  # the head takes a few seconds to listen
            try:
                assert connect(f"127.0.0.1:{port}") == 1.0
                break
            except StackcompError:
                if time.time() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        assert os.environ["RAY_AUTH_MODE"] == "token"
    finally:
        ray.shutdown()
        _stop_node(head)
        os.environ.pop("RAY_AUTH_MODE", None)
        from stackcomp.ray_executor import _reload_ray_auth

        _reload_ray_auth()
