"""The artifact store in object storage (``--cache s3://bucket/prefix``), against a real
S3-compatible server started here (moto's standalone server on 127.0.0.1, spoken to over HTTP by
s3fs, with S3's conditional writes): the same keys, metrics and weights as a folder store, a
second run finds everything cached, an upload without its marker is not an artifact, two writers
of one key end with one intact artifact. Also: an unreachable Ray address is one clear line."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import _ray_passes  # noqa: F401 - registers _ray_slow_scale (Ray workers import it by module)
import pytest
import yaml
from _s3_server import free_port, s3_server
from typer.testing import CliRunner

from stackcomp.artifacts import ArtifactStore
from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.errors import ArtifactError
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict
from stackcomp.remote_store import open_store
from stackcomp.rundir import CHECKSUMS, write_json

s3fs = pytest.importorskip("s3fs", reason="the S3 store needs s3fs: pip install 'stackcomp[cluster]'")
pytest.importorskip("moto.server", reason="the tests start moto's S3 server: pip install 'moto[server]'")

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on 127.0.0.1 with one bucket; s3fs finds it through AWS_ENDPOINT_URL."""
    with s3_server() as (url, env), pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        yield url


def _fs():
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def three_branches(model_dir: Path) -> dict:
    """A root and three branches; each branch's implicit evaluate stage keeps its parent's model."""
    stages = {"root": {"pass": "_ray_slow_scale", "params": {"factor": 2.0}}}
    for i, factor in enumerate((3.0, 5.0, 7.0)):
        stages[f"b{i}"] = {"pass": "_ray_slow_scale", "after": "root", "params": {"factor": factor}}
    return {"name": "three", "model": str(model_dir), "stages": stages}


def _engine(run_dir: Path, model_dir: Path, cache: str | None = None, **raw_extra) -> Engine:
    return Engine(build_plan(recipe_from_dict({**three_branches(model_dir), **raw_extra})), run_dir, cache_dir=cache)


def _results(run_dir: Path, summary: dict) -> dict:
    """Per stage: key, metrics and the checksums of its weight files, read from the run directory."""
    out = {}
    for s in summary["stages"]:
        sums = json.loads((run_dir / "artifacts" / s["key"] / CHECKSUMS).read_text())
        out[s["stage"]] = (s["key"], s["metrics"], {f: v for f, v in sums.items() if f.startswith("model/")})
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dirs):
    run_dir = tmp_path_factory.mktemp("local") / "run"
    return run_dir, _engine(run_dir, tiny_model_dirs["bert"]).run()


def _markers(prefix: str) -> dict[str, bytes]:
    """key -> marker object of every committed artifact under ``prefix``."""
    fs = _fs()
    base = prefix.removeprefix("s3://")
    return {p.split("/")[-2]: fs.cat_file(p) for p in fs.find(base) if p.endswith(f"/{CHECKSUMS}")
            and p.count("/") == base.count("/") + 2}


def test_s3_store_gives_the_local_results_and_a_second_run_recomputes_nothing(s3, local_run, tmp_path,
                                                                               tiny_model_dirs):
    local_dir, local_summary = local_run
    prefix = f"{s3}/same"
    engine = _engine(tmp_path / "run", tiny_model_dirs["bert"], cache=prefix)
    summary = engine.run()
    assert summary["failed"] == [] and sorted(engine.stage_runs) == sorted(local_summary["ran"])
    assert _results(tmp_path / "run", summary) == _results(local_dir, local_summary)
    assert summary["store"] == prefix and summary["artifacts_dir"] == str(tmp_path / "run" / "artifacts")
    # the store holds every stage, each marker being the CHECKSUMS.json of the run directory's copy
    markers = _markers(prefix)
    assert set(markers) == {s["key"] for s in summary["stages"]}
    assert all(markers[k] == (tmp_path / "run" / "artifacts" / k / CHECKSUMS).read_bytes() for k in markers)

    # a second run elsewhere (nothing local) through the CLI with STACKCOMP_CACHE: all cached
    recipe = tmp_path / "three.yaml"
    recipe.write_text(yaml.safe_dump(three_branches(tiny_model_dirs["bert"])))
    out = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "again"), "--json"],
                             env={"STACKCOMP_CACHE": prefix})
    assert out.exit_code == 0, out.output
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["ran"] == [] and {s["status"] for s in again["stages"]} == {"cached"}
    # the run directory holds checked copies, as after a local run (compare and load read them)
    assert _results(tmp_path / "again", again) == _results(local_dir, local_summary)


def test_an_upload_without_its_marker_is_not_an_artifact_and_is_redone(s3, local_run, tmp_path, tiny_model_dirs):
    prefix = f"{s3}/partial"
    first = _engine(tmp_path / "run", tiny_model_dirs["bert"], cache=prefix)
    summary = first.run()
    keys = {s["stage"]: s["key"] for s in summary["stages"]}
    fs, base = _fs(), prefix.removeprefix("s3://")
    # a writer killed after uploading b1's files, before its marker
    fs.rm(f"{base}/{keys['b1']}/{CHECKSUMS}")
    # and one killed half-way through b2's upload: some files, no marker
    fs.rm(f"{base}/{keys['b2']}", recursive=True)
    fs.pipe_file(f"{base}/{keys['b2']}/data-0123456789abcdef/stage.json", b'{"key": "half"}')
    store = open_store(prefix, tmp_path / "fresh")
    assert not store.is_complete(keys["b1"]) and not store.is_complete(keys["b2"])

    rerun = _engine(tmp_path / "rerun", tiny_model_dirs["bert"], cache=prefix)
    again = rerun.run()
    assert sorted(rerun.stage_runs) == ["b1", "b2"]  # only those: everything else was complete
    local_dir, local_summary = local_run
    assert _results(tmp_path / "rerun", again) == _results(local_dir, local_summary)
    assert store.verify(keys["b1"]) is None and store.verify(keys["b2"]) is None


def test_a_damaged_object_is_caught_by_its_checksum_and_recomputed(s3, local_run, tmp_path, tiny_model_dirs):
    prefix = f"{s3}/damaged"
    summary = _engine(tmp_path / "run", tiny_model_dirs["bert"], cache=prefix).run()
    key = next(s["key"] for s in summary["stages"] if s["stage"] == "b0")
    fs, base = _fs(), prefix.removeprefix("s3://")
    weights = next(p for p in fs.find(f"{base}/{key}") if p.endswith("model.safetensors"))
    data = bytearray(fs.cat_file(weights))
    data[-1] ^= 0xFF  # same size, other bytes
    fs.pipe_file(weights, bytes(data))
    problem = open_store(prefix, tmp_path / "fresh").verify(key)
    assert problem is not None and "checksum" in problem
    rerun = _engine(tmp_path / "rerun", tiny_model_dirs["bert"], cache=prefix)
    again = rerun.run()
    assert rerun.stage_runs == ["b0"]
    local_dir, local_summary = local_run
    assert _results(tmp_path / "rerun", again) == _results(local_dir, local_summary)


def _write_artifact(store, key: str, note: str) -> Path:
    tmp = store.begin(key)
    write_json(tmp / "stage.json", {"stage": "s", "key": key, "model_from": "k0"})
    write_json(tmp / "metrics.json", {"note": note})
    write_json(tmp / "report.json", {})
    write_json(tmp / "timings.json", {})
    return tmp


@pytest.mark.parametrize("same_bytes", [False, True], ids=["different-bytes", "same-bytes"])
def test_two_writers_of_one_key_end_with_one_intact_artifact(s3, tmp_path, same_bytes):
    prefix = f"{s3}/race-{same_bytes}"
    key = "k1"
    stores = [open_store(prefix, tmp_path / f"mirror{i}") for i in range(2)]
    tmps = [_write_artifact(s, key, "same" if same_bytes else f"writer {i}") for i, s in enumerate(stores)]
    both_uploaded = threading.Barrier(2, timeout=60)
    for store in stores:  # both finish their upload before either publishes its marker
        publish = store.fs.pipe_file

        def pipe_after_the_other(path, value, mode="overwrite", _publish=publish, **kw):
            both_uploaded.wait()
            return _publish(path, value, mode=mode, **kw)

        store.fs.pipe_file = pipe_after_the_other
    results: list = [None, None]

    def commit(i: int) -> None:
        results[i] = stores[i].commit(key, tmps[i])

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(isinstance(r, Path) for r in results), results
    marker = _markers(prefix)[key]
    base = f"{prefix.removeprefix('s3://')}/{key}"
    uploads = {p.split("/")[-2] for p in _fs().find(base) if "/data-" in p}
    assert len(uploads) == 1  # the loser's upload is gone (or was the winner's, byte for byte)
    for r in results:  # each writer ends with the published artifact
        assert (r / CHECKSUMS).read_bytes() == marker
    reader = open_store(prefix, tmp_path / "reader")
    assert reader.verify(key) is None
    assert reader.read(key, "metrics.json")["note"] in ("same", "writer 0", "writer 1")
    assert not any(p.name.startswith(".tmp") for s in stores for p in s.root.iterdir())


@pytest.mark.parametrize("other_published", [False, True], ids=["retried", "other-writer-won"])
def test_a_marker_write_conflict_is_retried_not_failed(s3, tmp_path, other_published):
    """S3 answers 409 ConditionalRequestConflict while another conditional write of the object is
    in flight: the commit looks again and retries instead of failing the stage. The conflict is
    raised in front of the real server's write (moto never races), the writes themselves are real."""
    prefix = f"{s3}/conflict-{other_published}"
    store = open_store(prefix, tmp_path / "mirror")
    other = open_store(prefix, tmp_path / "other")
    if other_published:
        other_tmp = _write_artifact(other, "k1", "other writer")
    tmp = _write_artifact(store, "k1", "this writer")
    publish = store.fs.pipe_file
    calls: list[str] = []

    def conflict_once(path, value, mode="overwrite", **kw):
        if path.endswith(CHECKSUMS) and not calls:
            calls.append(path)
            if other_published:  # the write in flight was the other writer's, and it went through
                other.commit("k1", other_tmp)
            raise OSError("An error occurred (ConditionalRequestConflict) when calling the PutObject operation: "
                          "A conflicting conditional operation is currently in progress against this resource.")
        return publish(path, value, mode=mode, **kw)

    store.fs.pipe_file = conflict_once
    path = store.commit("k1", tmp)
    assert calls  # the conflict happened
    want = "other writer" if other_published else "this writer"
    assert json.loads((path / "metrics.json").read_text())["note"] == want
    assert open_store(prefix, tmp_path / "reader").read("k1", "metrics.json")["note"] == want


def test_a_folder_and_a_file_url_are_folder_stores(tmp_path):
    assert open_store(None, tmp_path / "a").root == tmp_path / "a"
    assert isinstance(open_store(str(tmp_path / "c"), tmp_path / "a"), ArtifactStore)
    assert open_store(f"file://{tmp_path}/c", tmp_path / "a").root == tmp_path / "c"
    with pytest.raises(ArtifactError, match="file:///abs/path"):
        open_store("file://otherhost/c", tmp_path / "a")


def test_a_missing_bucket_is_one_line(s3, tmp_path, tiny_model_dirs):
    recipe = tmp_path / "three.yaml"
    recipe.write_text(yaml.safe_dump(three_branches(tiny_model_dirs["bert"])))
    out = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run"), "--cache", "s3://no-such-bucket/x"])
    assert out.exit_code == 2, out.output
    assert "no-such-bucket" in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1, out.output


def test_an_unreachable_ray_address_is_one_line(tmp_path, tiny_model_dirs):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    recipe = tmp_path / "three.yaml"
    recipe.write_text(yaml.safe_dump(three_branches(tiny_model_dirs["bert"])))
    out = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "run"), "--executor", "ray",
                                   "--address", address])
    assert out.exit_code == 2, out.output
    assert address in out.output and "ray start --head" in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1, out.output


def test_ray_executor_reads_and_writes_the_s3_store(s3, local_run, tmp_path, tiny_model_dirs, monkeypatch):
    """Ray started in this process (one node); its workers inherit the S3 settings and PYTHONPATH."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    prefix = f"{s3}/ray"
    engine = _engine(tmp_path / "run", tiny_model_dirs["bert"], cache=prefix, executor={"kind": "ray"})
    try:
        summary = engine.run()
    finally:
        ray.shutdown()
    assert summary["failed"] == [], summary["failed"]
    local_dir, local_summary = local_run
    assert sorted(engine.stage_runs) == sorted(local_summary["ran"])
    assert _results(tmp_path / "run", summary) == _results(local_dir, local_summary)
    assert set(_markers(prefix)) == {s["key"] for s in summary["stages"]}
    assert all(s["node"] for s in summary["stages"] if s["status"] == "ran")  # ran in Ray workers
