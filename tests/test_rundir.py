"""Run directories without the engine: names, atomic JSON, finding a run from a CLI argument,
and telling an edited recipe from its run without planning it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stackcomp import rundir
from stackcomp.errors import ArtifactError, RecipeError
from stackcomp.report import changed_stages


def test_dumps_handles_tensors_paths_and_nan(tmp_path):
    text = rundir.dumps({"t": torch.tensor([1.0, 2.0]), "s": torch.tensor(3), "p": Path("a/b"), "n": math.nan})
    out = json.loads(text)
    assert out["t"] == [1.0, 2.0] and out["s"] == 3 and out["p"] == "a/b" and math.isnan(out["n"])
    assert text.endswith("}\n")
    rundir.atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert rundir.read_json(tmp_path / "x.json") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left
    with pytest.raises(ArtifactError, match="missing file"):
        rundir.read_json(tmp_path / "nope.json")


def test_default_run_dir_and_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKCOMP_RUNS", str(tmp_path / "runs"))
    assert rundir.default_run_dir("a b/c") == tmp_path / "runs" / "a_b_c"
    base = tmp_path / "base.yaml"
    base.write_text("name: from-base\nmodel: m\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("include: base.yaml\nstages: {a: {pass: finetune}}\n")
    assert rundir.recipe_name(recipe) == "from-base"
    with pytest.raises(ArtifactError, match="has no finished run"):
        rundir.resolve_run_dir(recipe)
    run = rundir.default_run_dir("from-base")
    run.mkdir(parents=True)
    with pytest.raises(ArtifactError, match="did not finish"):
        (run / rundir.RESOLVED_RECIPE).write_text("name: from-base\n")
        rundir.resolve_run_dir(run)
    rundir.RunDir(run).write_summary({"stages": []})
    assert rundir.resolve_run_dir(recipe) == run == rundir.resolve_run_dir(run / rundir.SUMMARY)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RecipeError, match="expected a run directory"):
        rundir.resolve_run_dir(tmp_path / "notes.txt")


def test_changed_stages_follow_parents_teachers_and_the_source():
    before = {"model": "m", "stages": {"ft": {"pass": "finetune"}, "ds": {"pass": "ds", "after": "ft"},
                                       "kd": {"pass": "distill", "after": "ds", "params": {"teacher": "ft"}},
                                       "other": {"pass": "finetune"}}}
    after = json.loads(json.dumps(before))
    assert changed_stages(before, after) == []
    after["stages"]["ft"]["params"] = {"lr": 1}
    run = [{"stage": "ds.eval", "parents": ["ds"]}, {"stage": "other.eval", "parents": ["other"]}]
    assert changed_stages(before, after, run) == ["ft", "ds", "kd", "ds.eval"]
    assert changed_stages(before, {**before, "seed": 1}, run) == ["ft", "ds", "kd", "other", "ds.eval", "other.eval"]
