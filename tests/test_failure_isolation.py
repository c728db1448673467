"""Failure isolation: a stage whose pass raises is recorded as failed (one line; the traceback in
its log file), the stages that need it are skipped, every other stage still runs, summary.json is
written, the CLI exits 1, and a re-run retries only the failed and skipped stages."""

from __future__ import annotations

import errno
import json
import os

import pytest
from _scale_pass import make_scale_pass
from typer.testing import CliRunner

from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.errors import ArtifactError, PassError
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

runner = CliRunner()
CALLS: list[str] = []
RAISE: dict[str, BaseException] = {}
make_scale_pass("_maybe_fail", CALLS, fail=RAISE, factor=0.5)  # raises what a test puts in RAISE


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    RAISE.clear()
    yield
    RAISE.clear()


#: three independent branches; b has a child, and every leaf gets an evaluate stage
STAGES = {
    "a": {"pass": "_maybe_fail", "params": {"factor": 2}},
    "b": {"pass": "_maybe_fail", "params": {"factor": 3}},
    "b2": {"pass": "_maybe_fail", "after": "b"},
    "c": {"pass": "_maybe_fail", "params": {"factor": 5}},
}


def _recipe_file(tmp_path, model_dir):
    p = tmp_path / "r.yaml"
    p.write_text(json.dumps({"name": "iso", "model": str(model_dir), "stages": STAGES}))
    return p


def _plan(model_dir):
    return build_plan(recipe_from_dict({"name": "iso", "model": str(model_dir), "stages": STAGES}))


def test_a_failing_branch_does_not_stop_the_others_and_a_rerun_retries_it(tmp_path, tiny_model_dirs):
    RAISE["b"] = ValueError("factor must be positive, got -1")
    recipe, run = _recipe_file(tmp_path, tiny_model_dirs["bert"]), tmp_path / "run"
    r = runner.invoke(app, ["run", str(recipe), "-o", str(run)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert sorted(CALLS) == ["a", "b", "c"]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert ("stage 'b' (_maybe_fail) failed: ValueError: factor must be positive, got -1" in errors[0]
            and "b.log" in errors[0]), errors
    assert "failed" in r.stdout and "skipped" in r.stdout  # the summary table shows them

    summary = json.loads((run / "summary.json").read_text())
    assert [f["stage"] for f in summary["failed"]] == ["b"]
    failed = summary["failed"][0]
    assert failed["error"] == "ValueError: factor must be positive, got -1"
    assert {s["stage"]: s["reason"] for s in summary["skipped"]} == {"b2": "parent 'b' failed",
                                                                   "b2.eval": "upstream stage 'b' failed"}
    assert {s["stage"] for s in summary["stages"]} == {"a", "a.eval", "c", "c.eval"}
    assert all(s["status"] == "ran" for s in summary["stages"])
    log = (run / "logs" / "b.log").read_text()
    assert "Traceback" in log and "ValueError: factor must be positive" in log and "about to fail" in log
    assert failed["log"] == str(run / "logs" / "b.log")
    plan = _plan(tiny_model_dirs["bert"])
    arts = run / "artifacts"
    assert not (arts / plan.stages["b"].key).exists()  # nothing of the failed stage was kept
    assert not [p for p in arts.iterdir() if p.name.startswith(".tmp")]

    RAISE.clear()
    CALLS.clear()
    r = runner.invoke(app, ["run", str(recipe), "-o", str(run), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["ran"] == ["b", "b2", "b2.eval"] and CALLS == ["b", "b2"]  # only what failed or was skipped
    assert summary["failed"] == [] and summary["skipped"] == []


def test_debug_prints_the_traceback(tmp_path, tiny_model_dirs):
    RAISE["c"] = KeyError("no_such_layer")
    r = runner.invoke(app, ["run", str(_recipe_file(tmp_path, tiny_model_dirs["bert"])), "-o", str(tmp_path / "run"),
                            "--debug"])
    assert r.exit_code == 1, r.output
    assert "Traceback" in r.stderr and "KeyError: 'no_such_layer'" in r.stderr


def test_engine_api_returns_the_failures(tmp_path, tiny_model_dirs):
    RAISE["a"] = PassError("a refuses this model")
    summary = Engine(_plan(tiny_model_dirs["bert"]), tmp_path / "run").run()
    assert summary["failed"][0]["stage"] == "a"
    assert summary["failed"][0]["error"] == "PassError: a refuses this model"  # no repeated stage prefix
    assert {s["stage"] for s in summary["skipped"]} == {"a.eval"}
    assert {s["stage"] for s in summary["stages"]} == {"b", "b2", "b2.eval", "c", "c.eval"}


def test_keyboard_interrupt_still_stops_the_run(tmp_path, tiny_model_dirs):
    RAISE["a"] = KeyboardInterrupt()
    e = Engine(_plan(tiny_model_dirs["bert"]), tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        e.run()
    assert CALLS == ["a"]  # nothing after it ran
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_resource_error_stops_the_run_but_writes_the_summary(tmp_path, tiny_model_dirs):
    RAISE["b"] = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))
    e = Engine(_plan(tiny_model_dirs["bert"]), tmp_path / "run")
    with pytest.raises(ArtifactError, match=r"stage 'b' \(_maybe_fail\): .*disk full"):
        e.run()
    assert "c" not in CALLS  # the next stages would fill the disk too
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [f["stage"] for f in summary["failed"]] == ["b"] and "disk full" in summary["failed"][0]["error"]
    skipped = {s["stage"]: s["reason"] for s in summary["skipped"]}
    assert skipped["b2"] == "parent 'b' failed" and skipped["c"] == "the run stopped at stage 'b'"
    assert {s["stage"] for s in summary["stages"]} == {"a"}  # what finished before is listed (and kept)
