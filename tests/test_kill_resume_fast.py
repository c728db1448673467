"""Kill and resume (fast variant, 2 kill points): SIGKILL a 4-stage run during training and during
artifact writes, re-run it, and check that finished stages are kept and the results equal an
uninterrupted run's (metrics and weights, bit for bit). The slow variant has 20 random points."""

from __future__ import annotations

import pytest

from _kill_resume import KillPoint, Run, child_env, comparable, kill_chain, recipe_text


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dirs, tiny_glue):
    """An uninterrupted run: its metrics and weight digests, and the recipe and env to reuse."""
    root = tmp_path_factory.mktemp("kill-resume")
    recipe = root / "r.yaml"
    recipe.write_text(recipe_text(tiny_model_dirs["bert"]))
    env = child_env(tiny_glue)
    run = Run(recipe, root / "reference", env)
    o = run.run()
    assert o.returncode == 0 and o.summary is not None, o.stderr[-3000:]
    assert o.summary["ran"] == ["ft", "ds", "ft2", "ev"]
    return recipe, env, comparable(o.summary), run.digests()


def test_kill_during_training_and_artifact_writes_then_resume(reference, tmp_path):
    recipe, env, metrics, digests = reference
    points = [KillPoint("training", "ds", 0.2), KillPoint("write", "ft2")]
    landed = kill_chain(Run(recipe, tmp_path / "run", env), points, metrics, digests)
    print("\n".join(landed))
    assert len(landed) == 2 and not any("finished before" in line for line in landed), landed
