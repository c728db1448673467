import pytest

from stackcomp.errors import PlanError
from stackcomp.passes.base import Pass, PassParams, register_pass
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict


class LastParams(PassParams):
    pass


@register_pass
class _LastPass(Pass):
    """Test pass that must come last."""
    name = "_test_last"
    must_be_last = True


@register_pass
class _NoAfterLast(Pass):
    """Test pass forbidden after _test_last's sibling kind."""
    name = "_test_picky"
    forbid_after = {"finetune": "picky passes only work on raw models"}


@register_pass
class _Teacherish(Pass):
    """Test pass that needs a teacher."""
    name = "_test_teacher"
    needs = frozenset({"teacher"})
    teacher_param = "teacher"

    class Params(PassParams):
        teacher: str | None = None


def recipe(stages, **kw):
    return recipe_from_dict({"name": "p", "model": "m", "task": "glue/sst2", "stages": stages, **kw})


def test_plan_orders_and_adds_leaf_evaluation():
    plan = build_plan(recipe({"a": {"pass": "finetune"}, "b": {"pass": "finetune", "after": "a"},
                              "c": {"pass": "finetune", "after": "a"}}))
    assert plan.order.index("a") < plan.order.index("b")
    assert set(plan.leaves()) == {"b.eval", "c.eval"}
    assert plan.path_to("c.eval") == ["a", "c", "c.eval"]


@pytest.mark.parametrize("stages,needle", [
    ({"a": {"pass": "finetune", "after": "b"}, "b": {"pass": "finetune", "after": "a"}}, "cycle"),
    ({"a": {"pass": "finetune", "after": "a"}}, "after itself"),
    ({"a": {"pass": "finetune", "after": "zz"}}, "no stage 'zz'"),
    ({"a": {"pass": "no_such_pass"}}, "unknown pass 'no_such_pass'"),
    ({"a": {"pass": "finetune", "params": {"lr": "fast"}}}, "params.train.lr"),
    ({"a": {"pass": "finetune", "params": {"train": {"lr": "fast"}}}}, "params.train.lr"),
    ({"a": {"pass": "finetune", "params": {"lr": 1e-4, "train": {"lr": 1e-4}}}}, "given both"),
    ({"a": {"pass": "finetune", "params": {"nope": 1}}}, "params.nope: unknown field"),
    ({"a": {"pass": "finetune", "params": {"train": {"epoch": 1}}}},
     r"params\.train\.epoch: unknown field \(did you mean 'epochs'\?\)"),
    ({"a": {"pass": "finetune", "params": {"lr": "fast"}}}, r"params\.train\.lr: .*got 'fast'"),
    ({"a": {"pass": "evaluate_not", "params": {}}}, "unknown pass"),
    ({"a": {"pass": "_test_last"}, "b": {"pass": "finetune", "after": "a"}}, "must be the last"),
    ({"a": {"pass": "finetune"}, "b": {"pass": "_test_picky", "after": "a"}}, "picky passes only"),
    ({"a": {"pass": "_test_teacher"}}, "needs a teacher"),
    ({"a": {"pass": "evaluate"}}, "measures a model"),
    ({"a": {"pass": "tests.x:Y"}}, "allow_plugins"),
])
def test_plan_errors(stages, needle):
    with pytest.raises(PlanError, match=needle):
        build_plan(recipe(stages))


def test_needs_task():
    r = recipe_from_dict({"name": "p", "model": "m", "stages": {"a": {"pass": "finetune"}}})
    with pytest.raises(PlanError, match="needs a task"):
        build_plan(r)


def test_evaluate_may_follow_a_last_pass():
    build_plan(recipe({"a": {"pass": "_test_last"}, "b": {"pass": "evaluate", "after": "a"}}))


def test_teacher_stage_becomes_a_dependency():
    plan = build_plan(recipe({"t": {"pass": "finetune"}, "s": {"pass": "_test_teacher", "params": {"teacher": "t"}}}))
    assert plan.stages["s"].teacher_stage == "t"
    assert plan.order.index("t") < plan.order.index("s")


def test_keys_depend_on_params_parents_and_source():
    base = {"a": {"pass": "finetune", "params": {"lr": 1e-4}}, "b": {"pass": "finetune", "after": "a"}}
    k1 = build_plan(recipe(base)).stages
    k2 = build_plan(recipe({**base, "a": {"pass": "finetune", "params": {"lr": 2e-4}}})).stages
    assert k1["a"].key != k2["a"].key and k1["b"].key != k2["b"].key  # a change propagates downstream
    k3 = build_plan(recipe(base, seed=1)).stages
    assert k3["a"].key != k1["a"].key
    k4 = build_plan(recipe({**base, "c": {"pass": "finetune", "after": "a"}})).stages
    assert k4["a"].key == k1["a"].key and k4["b"].key == k1["b"].key  # adding a branch keeps keys
    # defaults spelled out give the same key as defaults left out
    k5 = build_plan(recipe({**base, "a": {"pass": "finetune", "params": {"lr": 1e-4, "epochs": 1.0}}})).stages
    assert k5["a"].key == k1["a"].key


def test_module_path_pass_allowed_when_listed():
    plan = build_plan(recipe({"a": {"pass": "stackcomp.passes.finetune:FinetunePass"}},
                             allow_plugins=["stackcomp.passes.finetune:FinetunePass"]))
    assert plan.stages["a"].pass_cls.name == "finetune"


def test_a_param_marked_key_omit_default_keeps_old_keys_until_set():
    from pydantic import BaseModel, Field

    from stackcomp.passes.base import KEY_OMIT_DEFAULT
    from stackcomp.plan import params_for_key

    class Inner(BaseModel):
        depth: int = 1
        extra: str | None = Field(default=None, json_schema_extra=KEY_OMIT_DEFAULT)

    class Old(PassParams):
        lr: float = 0.1
        inner: Inner = Inner()

    class New(Old):
        augment: dict | None = Field(default=None, json_schema_extra=KEY_OMIT_DEFAULT)
        plain: int | None = None  # unmarked: always in the key

    assert params_for_key(Old()) == {"lr": 0.1, "inner": {"depth": 1}}
    assert params_for_key(New()) == {"lr": 0.1, "inner": {"depth": 1}, "plain": None}
    assert params_for_key(New(augment={"copies": 2}))["augment"] == {"copies": 2}
    assert params_for_key(Old(inner=Inner(extra="x")))["inner"] == {"depth": 1, "extra": "x"}
