"""The Python API: the README's example runs as written; run() returns typed results, failures
included; compare() gives the CLI's leaderboard."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stackcomp
from stackcomp.errors import StackcompError
from stackcomp.passes.base import Pass, register_pass

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(name: str) -> str:
    m = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no example {name!r}"
    return m.group(1)


def test_the_readme_python_api_example_runs(tmp_path, tiny_glue):
    env = {**os.environ, "STACKCOMP_DATA_DIR": str(tiny_glue), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", readme_example("python-api")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "q.eval" in proc.stdout
    assert (tmp_path / "runs" / "api-demo" / "summary.json").is_file()


@register_pass
class _Boom(Pass):
    """Test pass: fails with a plain ValueError."""

    name = "_test_api_boom"

    def transform(self, model, ctx):
        raise ValueError("bad plugin value")


def test_run_returns_typed_results_with_failures(tmp_path, tiny_model_dirs):
    recipe = {"name": "api", "model": str(tiny_model_dirs["bert"]), "evaluate_leaves": False,
              "stages": {"q": {"pass": "int8", "params": {"backend": "torch"}},
                         "bad": {"pass": "_test_api_boom"},
                         "after_bad": {"pass": "int8", "after": "bad", "params": {"backend": "torch"}}}}
    result = stackcomp.run(recipe, out=tmp_path / "run")
    assert not result.ok
    assert result.stage("q").status == "ran" and result.artifact("q").is_dir()
    (bad,) = result.failed
    assert bad.stage == "bad" and "ValueError: bad plugin value" in bad.error and Path(bad.log).is_file()
    assert result.stage("after_bad").status == "skipped"
    with pytest.raises(StackcompError, match="has no artifact"):
        result.artifact("bad")
    with pytest.raises(StackcompError, match="no stage 'nope'"):
        result.stage("nope")
    model = stackcomp.load(result.artifact("q"))
    assert any(type(m).__name__ == "Int8Linear" for m in model.modules())
    again = stackcomp.run(recipe, out=tmp_path / "run")  # a rerun: q cached, bad retried
    assert again.stage("q").status == "cached" and again.stage("bad").status == "failed"


def test_compare_returns_the_leaderboard(tmp_path, tiny_model_dirs):
    recipe = {"name": "cmp", "model": str(tiny_model_dirs["bert"]),
              "stages": {"q": {"pass": "int8", "params": {"backend": "torch"}}}}
    stackcomp.run(recipe, out=tmp_path / "run")
    board = stackcomp.compare(tmp_path / "run")
    rows = board.to_json()["rows"]
    assert [r["leaf"] for r in rows] == ["q"] and rows[0]["measured_by"] == ["q.eval"] and rows[0]["model_bytes"] > 0


def test_overrides_need_a_recipe_file(tmp_path, tiny_model_dirs):
    with pytest.raises(StackcompError, match="overrides apply to a recipe file"):
        stackcomp.run({"name": "x", "model": str(tiny_model_dirs["bert"]), "stages": {}}, ["a=1"])
