"""Every recipe shipped in recipes/ loads, resolves its includes and builds a valid plan.

Plan building validates each stage's params against its pass, so a renamed or retyped pass
parameter breaks this test instead of a user's first run.
"""
from pathlib import Path

import pytest

from stackcomp.plan import build_plan
from stackcomp.recipe import load_recipe

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
#: search spaces (a recipe prefix plus `search:`, for `stackcomp search`) are checked as spaces
SPACES = [p for p in SHIPPED if "\nsearch:" in p.read_text()]
RECIPES = [p for p in SHIPPED if p not in SPACES]


def test_recipes_are_found():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_builds_a_plan(path):
    plan = build_plan(load_recipe(path, []))
    assert plan.leaves(), f"{path.name}: no leaves"
    for stage in plan.stages.values():
        assert stage.key, f"{path.name}: stage without a key"


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_search_space_loads(path):
    from stackcomp.search import load_space

    space = load_space(path)
    assert space.spec.slots and build_plan(space.recipe).leaves()
