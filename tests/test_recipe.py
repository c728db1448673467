import textwrap

import pytest

from stackcomp.errors import RecipeError
from stackcomp.recipe import load_recipe, parse_override, recipe_from_dict

BASE = {
    "name": "r",
    "model": "minilm-l6",
    "task": "glue/sst2",
    "stages": {
        "ft": {"pass": "finetune", "params": {"epochs": 1}},
        "ds": {"pass": "evaluate", "after": "ft", "params": {"batch_size": 8}},
        "ev": {"pass": "evaluate", "after": "ds"},
    },
}


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_minimal_recipe_parses(tmp_path):
    p = write(tmp_path, "r.yaml", """
        name: demo
        model: minilm-l6
        task: glue/sst2
        data: {max_train_samples: 100, max_length: 64}
        stages:
          ft: {pass: finetune, params: {epochs: 1, lr: 3.0e-5}}
          ev: {pass: evaluate, after: [ft]}
    """)
    r = load_recipe(p)
    assert r.name == "demo" and r.stages["ft"].pass_name == "finetune"
    assert r.stages["ev"].after == ["ft"]
    assert r.data_options().max_length == 64


def test_after_accepts_a_string(tmp_path):
    r = recipe_from_dict(BASE)
    assert r.stages["ds"].after == ["ft"]


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.pop("model"), "model"),
    (lambda d: d.update(stages={}), "stages"),
    (lambda d: d.update(bogus=1), "bogus: unknown field"),
    (lambda d: d["stages"]["ft"].update(passs="x"), "stages.ft.passs: unknown field"),
    (lambda d: d["stages"]["ft"].pop("pass"), "stages.ft.pass"),
    (lambda d: d.update(seed=-1), "seed"),
    (lambda d: d.update(data={"max_length": "long"}), "data.max_length"),
    (lambda d: d.update(data={"nope": 1}), "data.nope"),
    (lambda d: d["stages"].update({"bad name!": {"pass": "finetune"}}), "stage name"),
    # an unknown field names the closest valid one of the model at its place; a bad value is echoed
    (lambda d: d.update(modle="m"), "modle: unknown field (did you mean 'model'?)"),
    (lambda d: d["stages"]["ft"].update(aftr="x"), "stages.ft.aftr: unknown field (did you mean 'after'?)"),
    (lambda d: d.update(goal={"metric_dorp": 1}), "goal.metric_dorp: unknown field (did you mean 'metric_drop'?)"),
    (lambda d: d.update(data={"max_lenght": 8}), "data.max_lenght: unknown field (did you mean 'max_length'?)"),
    (lambda d: d.update(seed="soon"), "seed: Input should be a valid integer, unable to parse string as an integer, "
                                      "got 'soon'"),
    (lambda d: d.update(name="x" * 500), "got '" + "x" * 38 + "…"),  # long values are cut
])
def test_invalid_recipes_name_the_field(mutate, needle):
    import copy

    d = copy.deepcopy(BASE)
    mutate(d)
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(d, source="x.yaml")
    assert needle in str(e.value) and str(e.value).startswith("x.yaml")


def test_yaml_errors_name_file_and_line(tmp_path):
    p = write(tmp_path, "bad.yaml", "name: x\nstages: [\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: line \d+"):
        load_recipe(p)


def test_object_constructing_tags_are_refused(tmp_path):
    p = write(tmp_path, "evil.yaml", "name: !!python/object/apply:os.system ['echo pwned']\nmodel: x\n")
    with pytest.raises(RecipeError, match="tag refused"):
        load_recipe(p)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(p)


def test_include_merges_and_detects_cycles(tmp_path):
    write(tmp_path, "base.yaml", """
        model: minilm-l6
        task: glue/sst2
        data: {max_length: 64, max_train_samples: 50}
        stages:
          ft: {pass: finetune, params: {epochs: 1, lr: 1.0e-4}}
    """)
    p = write(tmp_path, "top.yaml", """
        include: base.yaml
        name: top
        data: {max_length: 32}
        stages:
          ft: {params: {lr: 3.0e-5}}
          ev: {pass: evaluate, after: ft}
    """)
    r = load_recipe(p)
    assert r.data == {"max_length": 32, "max_train_samples": 50}
    assert r.stages["ft"].params == {"epochs": 1, "lr": 3e-5}
    assert set(r.stages) == {"ft", "ev"}
    write(tmp_path, "a.yaml", "include: b.yaml\nname: a\n")
    write(tmp_path, "b.yaml", "include: a.yaml\n")
    with pytest.raises(RecipeError, match="include cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_overrides_are_typed():
    r = recipe_from_dict(BASE, ["stages.ft.params.lr=3e-5", "seed=7", "data.max_length=64",
                                "stages.ft.params.eval_every=null"])
    assert r.stages["ft"].params["lr"] == pytest.approx(3e-5) and isinstance(r.stages["ft"].params["lr"], float)
    assert r.seed == 7 and r.data["max_length"] == 64
    assert r.stages["ft"].params["eval_every"] is None


def test_override_errors():
    for bad in ["noequals", "=3", "a..b=1"]:
        with pytest.raises(RecipeError, match="override"):
            recipe_from_dict(BASE, [bad])
    with pytest.raises(RecipeError, match="no stage named 'zz'"):
        recipe_from_dict(BASE, ["stages.zz.params.lr=1"])


def test_parse_override_sweep_and_lists():
    assert parse_override("a.b=4,8") == (["a", "b"], [4, 8])
    assert parse_override("a.b=[4,8]") == (["a", "b"], [[4, 8]])
    assert parse_override("a.b=[1,2],[3]") == (["a", "b"], [[1, 2], [3]])


def test_sweep_clones_the_stage_and_its_descendants():
    r = recipe_from_dict(BASE, ["stages.ds.params.batch_size=4,8"])
    names = set(r.stages)
    assert names == {"ft", "ds[batch_size=4]", "ev[batch_size=4]", "ds[batch_size=8]", "ev[batch_size=8]"}
    assert r.stages["ds[batch_size=8]"].params["batch_size"] == 8
    assert r.stages["ev[batch_size=4]"].after == ["ds[batch_size=4]"]
    assert r.stages["ds[batch_size=4]"].after == ["ft"]


def test_two_sweeps_make_a_product():
    r = recipe_from_dict(BASE, ["stages.ds.params.batch_size=4,8", "stages.ft.params.lr=1e-4,2e-4"])
    leaves = [n for n in r.stages if n.startswith("ev")]
    assert len(leaves) == 4


def test_sweep_on_non_stage_key_is_refused():
    with pytest.raises(RecipeError, match="only stage keys"):
        recipe_from_dict(BASE, ["seed=1,2"])


def test_resolved_recipe_round_trips(tmp_path):
    r = recipe_from_dict(BASE, ["stages.ds.params.batch_size=4,8"])
    p = tmp_path / "resolved.yaml"
    p.write_text(r.to_yaml())
    assert load_recipe(p) == r


def test_recipe_seed_drives_data_seed_unless_data_sets_one():
    base = {"name": "r", "model": "m", "task": "glue/sst2", "stages": {"ft": {"pass": "finetune"}}}
    assert recipe_from_dict({**base, "seed": 5}).data_options().seed == 5
    assert recipe_from_dict({**base, "seed": 5, "data": {"seed": 3}}).data_options().seed == 3


def test_overrides_and_sweeps_reach_stage_names_with_dots():
    raw = {**BASE, "stages": {**BASE["stages"], "ds2.8x": {"pass": "finetune", "after": "ft", "params": {"lr": 1.0}}}}
    r = recipe_from_dict(raw, ["stages.ds2.8x.params.lr=2e-5"])
    assert r.stages["ds2.8x"].params["lr"] == pytest.approx(2e-5)
    r = recipe_from_dict(raw, ["stages.ds2.8x.params.batch_size=4,8"])
    assert {"ds2.8x[batch_size=4]", "ds2.8x[batch_size=8]"} <= set(r.stages)
    with pytest.raises(RecipeError, match="no stage named 'ds2'"):
        recipe_from_dict(raw, ["stages.ds2.9x.params.lr=1"])


def test_validate_suggests_the_field_and_echoes_the_value(tmp_path):
    """Through the CLI: one line, exit 2, the nearest valid name (nested pass params too), the bad value."""
    from typer.testing import CliRunner

    from stackcomp.cli import app

    cases = [
        ("stages: {ft: {pass: finetune, params: {train: {epoch: 1}}}}",
         "params.train.epoch: unknown field (did you mean 'epochs'?)"),
        ("stages: {ft: {pass: finetune, params: {batch_sise: 8}}}",
         "params.batch_sise: unknown field (did you mean 'train.batch_size'?)"),
        ("tsak: glue/sst2\nstages: {ft: {pass: finetune}}", "tsak: unknown field (did you mean 'task'?)"),
        ("stages: {ft: {pass: finetune, params: {lr: fast}}}", "params.train.lr: Input should be a valid number"),
    ]
    for i, (body, needle) in enumerate(cases):
        p = tmp_path / f"r{i}.yaml"
        p.write_text(f"name: r\nmodel: minilm-l6\ntask: glue/sst2\n{body}\n".replace("task: glue/sst2\ntsak", "tsak"))
        r = CliRunner().invoke(app, ["validate", str(p)], terminal_width=400)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and needle in r.output, r.output
    assert "got 'fast'" in r.output
    p = tmp_path / "far.yaml"
    p.write_text("name: r\nmodel: minilm-l6\ntask: glue/sst2\nzzzz: 1\nstages: {ft: {pass: finetune}}\n")
    r = CliRunner().invoke(app, ["validate", str(p)])
    assert r.exit_code == 2 and "zzzz: unknown field" in r.output and "did you mean" not in r.output
