"""Engine: cache by key, branches share their prefix, resume after an error, corrupt artifacts."""

import json

import pytest
import torch
from _scale_pass import make_scale_pass

from stackcomp import load
from stackcomp.engine import Engine
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

CALLS: list[str] = []
FAIL: set[str] = set()
make_scale_pass("_test_scale", CALLS, fail=FAIL, metric="classifier_norm")


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    FAIL.clear()


def make_plan(model_dir, stages, **kw):
    return build_plan(recipe_from_dict({"name": "t", "model": str(model_dir), "stages": stages, **kw}))


BRANCHY = {
    "a": {"pass": "_test_scale", "params": {"factor": 2.0}},
    "b": {"pass": "_test_scale", "after": "a", "params": {"factor": 3.0}},
    "c": {"pass": "_test_scale", "after": "a", "params": {"factor": 5.0}},
}


def test_branches_share_their_prefix_and_rerun_is_cached(tmp_path, tiny_model_dirs):
    plan = make_plan(tiny_model_dirs["bert"], BRANCHY)
    e = Engine(plan, tmp_path / "run")
    summary = e.run()
    assert sorted(CALLS) == ["a", "b", "c"]  # the shared prefix ran once
    assert set(e.stage_runs) == {"a", "b", "c", "b.eval", "c.eval"}
    base = torch.load  # noqa: F841  (no pickle anywhere: artifacts are safetensors)
    norms = {s["stage"]: s["metrics"].get("classifier_norm") for s in summary["stages"]}
    assert norms["b"] == pytest.approx(norms["a"] * 3, rel=1e-5)
    assert norms["c"] == pytest.approx(norms["a"] * 5, rel=1e-5)
    CALLS.clear()
    e2 = Engine(make_plan(tiny_model_dirs["bert"], BRANCHY), tmp_path / "run")
    s2 = e2.run()
    assert CALLS == [] and e2.stage_runs == []
    assert all(s["status"] == "cached" for s in s2["stages"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ran"] == []


def test_changed_params_rerun_only_downstream(tmp_path, tiny_model_dirs):
    Engine(make_plan(tiny_model_dirs["bert"], BRANCHY), tmp_path / "run").run()
    CALLS.clear()
    changed = {**BRANCHY, "c": {"pass": "_test_scale", "after": "a", "params": {"factor": 7.0}}}
    e = Engine(make_plan(tiny_model_dirs["bert"], changed), tmp_path / "run")
    e.run()
    assert CALLS == ["c"]


def test_resume_after_an_exception_mid_plan(tmp_path, tiny_model_dirs):
    FAIL.add("b")
    plan = make_plan(tiny_model_dirs["bert"], BRANCHY)
    summary = Engine(plan, tmp_path / "run").run()  # a failed stage is recorded, not raised
    assert [(f["stage"], f["error"]) for f in summary["failed"]] == [("b", "RuntimeError: boom in b")]
    assert CALLS == ["a", "b", "c"]  # the branch that does not need 'b' still ran
    leftovers = [p.name for p in (tmp_path / "run" / "artifacts").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []  # the failed stage left nothing half-written
    assert not (tmp_path / "run" / "artifacts" / plan.stages["b"].key).exists()
    FAIL.clear()
    CALLS.clear()
    e = Engine(make_plan(tiny_model_dirs["bert"], BRANCHY), tmp_path / "run")
    e.run()
    assert CALLS == ["b"] and e.stage_runs == ["b", "b.eval"]  # 'a' and 'c' were not recomputed


def test_corrupt_artifact_is_detected_and_recomputed(tmp_path, tiny_model_dirs, caplog):
    plan = make_plan(tiny_model_dirs["bert"], BRANCHY)
    Engine(plan, tmp_path / "run").run()
    weights = tmp_path / "run" / "artifacts" / plan.stages["a"].key / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    CALLS.clear()
    e = Engine(make_plan(tiny_model_dirs["bert"], BRANCHY), tmp_path / "run")
    assert e.status()["a"].startswith("corrupt")
    with caplog.at_level("WARNING", logger="stackcomp"):
        e.run()
    assert "a" in CALLS and "checksum" in caplog.text


def test_truncated_artifact_is_recomputed(tmp_path, tiny_model_dirs):
    plan = make_plan(tiny_model_dirs["bert"], BRANCHY)
    Engine(plan, tmp_path / "run").run()
    weights = tmp_path / "run" / "artifacts" / plan.stages["b"].key / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    CALLS.clear()
    Engine(make_plan(tiny_model_dirs["bert"], BRANCHY), tmp_path / "run").run()
    assert CALLS == ["b"]


@pytest.mark.parametrize("kind", ["bert", "albert", "distilbert"])
def test_artifact_model_reloads_with_stackcomp_load(tmp_path, tiny_model_dirs, kind):
    stages = {"a": {"pass": "_test_scale", "params": {"factor": 2.0}}}
    plan = make_plan(tiny_model_dirs[kind], stages, evaluate_leaves=False)
    Engine(plan, tmp_path / "run").run()
    model = load(tmp_path / "run" / "artifacts" / plan.stages["a"].key)
    from transformers import AutoModelForSequenceClassification

    ref = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs[kind]).eval()
    x = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        ref.classifier.weight.mul_(2.0)
        assert torch.allclose(model(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5)


def test_evaluate_stage_reports_sizes_without_storing_a_model(tmp_path, tiny_model_dirs):
    plan = make_plan(tiny_model_dirs["bert"], {"a": {"pass": "_test_scale"}})
    summary = Engine(plan, tmp_path / "run").run()
    ev = next(s for s in summary["stages"] if s["stage"] == "a.eval")
    assert ev["metrics"]["linear_layers"] == 14  # 12 encoder linears + pooler + classifier
    assert not (tmp_path / "run" / "artifacts" / plan.stages["a.eval"].key / "model").exists()
    assert load(tmp_path / "run" / "artifacts" / plan.stages["a.eval"].key) is not None


def test_recipes_sharing_a_cache_compute_their_common_prefix_once(tmp_path, tiny_model_dirs):
    cache = tmp_path / "cache"
    Engine(make_plan(tiny_model_dirs["bert"], BRANCHY), tmp_path / "run1", cache_dir=cache).run()
    CALLS.clear()
    other = {"a": BRANCHY["a"], "d": {"pass": "_test_scale", "after": "a", "params": {"factor": 11.0}}}
    e = Engine(make_plan(tiny_model_dirs["bert"], {**other}, name="other"), tmp_path / "run2", cache_dir=cache)
    summary = e.run()
    assert CALLS == ["d"]  # `a` came from the first recipe's run
    assert summary["artifacts_dir"] == str(cache) and summary["store"] == str(cache.resolve())
    assert not (tmp_path / "run2" / "artifacts").exists()


def test_cleaning_spares_a_live_writers_temporary(tmp_path):
    import os
    import subprocess
    import sys

    from stackcomp.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = store.root / f".tmp-k1-{child.pid}-abc"
        dead = store.root / ".tmp-k2-999999999-abc"
        mine = store.begin("k3")  # our own leftover from before: this process is the cleaner
        for d in (live, dead):
            d.mkdir(parents=True)
        assert store.clean_temporaries() == 2
        assert live.exists() and not dead.exists() and not mine.exists()
    finally:
        child.kill()
        child.wait()
    assert os.path.exists(live)
