"""Corrupted artifacts: truncated, flipped, emptied, deleted or rewritten files in a cached stage
are found by checksum, reported naming the stage, and the stage is recomputed (its children,
whose inputs are unchanged, stay cached)."""

from __future__ import annotations

import json
import shutil

import pytest
from _scale_pass import make_scale_pass
from typer.testing import CliRunner

from stackcomp.artifacts import ArtifactStore
from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

CALLS: list[str] = []
make_scale_pass("_corrupt_scale", CALLS, note="scaled")


STAGES = {"a": {"pass": "_corrupt_scale", "params": {"factor": 2.0}},
          "b": {"pass": "_corrupt_scale", "after": "a", "params": {"factor": 3.0}}}


def _plan(model_dir):
    return build_plan(recipe_from_dict({"name": "c", "model": str(model_dir), "stages": STAGES}))


@pytest.fixture(scope="module")
def golden(tmp_path_factory, tiny_model_dirs):
    """One complete run, copied by each test."""
    root = tmp_path_factory.mktemp("golden")
    plan = _plan(tiny_model_dirs["bert"])
    summary = Engine(plan, root / "run").run()
    return root / "run", plan, {s["stage"]: s["metrics"] for s in summary["stages"]}


@pytest.fixture
def run_dir(golden, tmp_path):
    src, plan, metrics = golden
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    CALLS.clear()
    return dst, plan, metrics


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle (safetensors: in the tensor data, still loadable)
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


CORRUPTIONS = {
    "flip": _flip,
    "truncate": _truncate,
    "empty": lambda p: p.write_bytes(b""),
    "delete": lambda p: p.unlink(),
    "to_folder": lambda p: (p.unlink(), p.mkdir()),
}
FILES = ["model/model.safetensors", "model/config.json", "model/stackcomp_manifest.json", "stage.json",
         "metrics.json", "report.json"]


def _rerun(run, plan, caplog):
    e = Engine(build_plan(plan.recipe), run)
    with caplog.at_level("WARNING", logger="stackcomp"):
        summary = e.run()
    return e, summary


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
@pytest.mark.parametrize("rel", FILES)
def test_corrupt_file_is_detected_named_and_recomputed(run_dir, caplog, rel, how):
    run, plan, metrics = run_dir
    store = ArtifactStore(run)
    key = plan.stages["a"].key
    CORRUPTIONS[how](store.path(key) / rel)
    status = Engine(plan, run).status()
    assert status["a"].startswith("corrupt") and rel in status["a"], status
    assert status["b"] == "cached"
    e, summary = _rerun(run, plan, caplog)
    assert CALLS == ["a"] and e.stage_runs == ["a"]  # only the broken stage; b's inputs are unchanged
    assert "stage 'a'" in caplog.text and "recomputing" in caplog.text and rel in caplog.text
    assert store.verify(key) is None
    assert {s["stage"]: s["metrics"] for s in summary["stages"]} == metrics


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b"{}", b'{"stage.json": "x"}',
                                     b'{"../../etc/passwd": ["00", 1], "stage.json": ["00", 1], '
                                     b'"metrics.json": ["00", 1]}',
                                     b"\xff\xfe"])
def test_corrupt_checksum_file_is_detected(run_dir, caplog, content):
    run, plan, _ = run_dir
    key = plan.stages["b"].key
    (ArtifactStore(run).path(key) / "CHECKSUMS.json").write_bytes(content)
    assert Engine(plan, run).status()["b"].startswith("corrupt")
    e, _ = _rerun(run, plan, caplog)
    assert e.stage_runs == ["b"] and "stage 'b'" in caplog.text


def test_checksum_file_flipped_digest(run_dir, caplog):
    run, plan, _ = run_dir
    path = ArtifactStore(run).path(plan.stages["a"].key) / "CHECKSUMS.json"
    sums = json.loads(path.read_text())
    digest = sums["model/model.safetensors"][0]
    sums["model/model.safetensors"][0] = ("0" if digest[0] != "0" else "1") + digest[1:]
    path.write_text(json.dumps(sums))
    e, _ = _rerun(run, plan, caplog)
    assert e.stage_runs == ["a"] and "fails its checksum" in caplog.text


def test_missing_checksums_means_incomplete_and_recomputed(run_dir, caplog):
    run, plan, metrics = run_dir
    (ArtifactStore(run).path(plan.stages["a"].key) / "CHECKSUMS.json").unlink()
    assert Engine(plan, run).status()["a"] == "todo"
    e, summary = _rerun(run, plan, caplog)
    assert e.stage_runs == ["a"]
    assert summary["stages"][0]["metrics"] == metrics["a"]


def test_whole_artifact_deleted_is_recomputed(run_dir, caplog):
    run, plan, _ = run_dir
    shutil.rmtree(ArtifactStore(run).path(plan.stages["a"].key))
    e, _ = _rerun(run, plan, caplog)
    assert e.stage_runs == ["a"]


def test_cli_warns_naming_the_stage_and_plan_shows_it(run_dir):
    run, plan, _ = run_dir
    recipe = run.parent / "r.yaml"
    recipe.write_text(plan.recipe.to_yaml())
    _truncate(ArtifactStore(run).path(plan.stages["a"].key) / "model" / "model.safetensors")
    r = CliRunner().invoke(app, ["plan", str(recipe), "-o", str(run), "--json"])
    assert r.exit_code == 0
    status = {s["stage"]: s["status"] for s in json.loads(r.stdout)}
    assert status["a"].startswith("corrupt: file model/model.safetensors has") and status["b"] == "cached"
    r = CliRunner().invoke(app, ["run", str(recipe), "-o", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert "artifact of stage 'a'" in r.stderr and "recomputing" in r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["ran"] == ["a"]
