"""Stage keys of the shipped recipes stay what they were: cached artifacts stay valid across
refactors. tests/fixtures/recipe_keys.json was computed by the code before the pass API change
(nested `train:` configs, KEY_INLINE); update it only when a pass's behaviour changes, with its
version bumped and the change said in the commit."""

import json
from pathlib import Path

import pytest

from stackcomp.plan import build_plan
from stackcomp.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
KEYS = json.loads((ROOT / "tests" / "fixtures" / "recipe_keys.json").read_text())


@pytest.mark.parametrize("recipe", sorted(KEYS))
def test_shipped_recipe_keys_are_unchanged(recipe):
    plan = build_plan(load_recipe(ROOT / "recipes" / recipe, []))
    assert {n: s.key for n, s in plan.stages.items()} == KEYS[recipe]


def test_flat_and_nested_train_settings_give_one_key():
    from stackcomp.passes.finetune import FinetuneParams
    from stackcomp.plan import params_for_key

    flat = FinetuneParams.model_validate({"epochs": 2, "lr": 1e-4})
    nested = FinetuneParams.model_validate({"train": {"epochs": 2, "lr": 1e-4}})
    assert flat == nested and params_for_key(flat) == params_for_key(nested)
    assert "lr" in params_for_key(flat) and "train" not in params_for_key(flat)
