"""Unsafe inputs are refused by default, run nothing, and say how to opt in: pickle weights,
models that ship their own code, plugin passes named by module path. (YAML tags that build
objects: tests/test_fuzz_recipes.py::test_tags_are_refused_with_how_to.)"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from stackcomp.cli import app
from stackcomp.errors import ModelError, PlanError
from stackcomp.models import load_base_model
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

runner = CliRunner()


def _copy_tokenizer(src, dst):
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, dst)


@pytest.fixture
def pickle_model(tmp_path, tiny_model_dirs):
    """A model folder with only pytorch_model.bin (pickle) weights."""
    from transformers import AutoModelForSequenceClassification

    src = tiny_model_dirs["bert"]
    d = tmp_path / "pickled"
    model = AutoModelForSequenceClassification.from_pretrained(src)
    model.save_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    _copy_tokenizer(src, d)
    return d, model


def _recipe(tmp_path, model, extra=""):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: unsafe
        model: {model}
        task: glue/sst2
        stages:
          ft: {{pass: finetune, params: {{max_steps: 1}}}}
    """) + extra)
    return p


def test_pickle_weights_refused_with_how_to(tmp_path, pickle_model, data_env):
    d, _ = pickle_model
    with pytest.raises(ModelError, match=r"pickle.*allow_pickle: true"):
        load_base_model(str(d))
    r = runner.invoke(app, ["run", str(_recipe(tmp_path, d)), "-o", str(tmp_path / "run")])
    # the first stage fails on one line (exit 1: a stage failed), its traceback in its log only
    assert r.exit_code == 1 and "allow_pickle: true" in r.stderr and "Traceback" not in r.output
    arts = tmp_path / "run" / "artifacts"
    assert not arts.exists() or not any(arts.iterdir())  # nothing started


def test_pickle_weights_load_when_allowed(pickle_model):
    d, ref = pickle_model
    model, _ = load_base_model(str(d), allow_pickle=True)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def _remote_code_model(tmp_path, tiny_model_dirs, model_type):
    """A folder whose config maps Auto classes to its own module; importing it leaves a marker."""
    src, d = tiny_model_dirs["bert"], tmp_path / f"remote-{model_type}"
    shutil.copytree(src, d)
    marker = tmp_path / f"code-ran-{model_type}"
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "custom_code.MyConfig",
                       "AutoModelForSequenceClassification": "custom_code.MyModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "custom_code.py").write_text(textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("ran")
        from transformers import BertConfig, BertForSequenceClassification

        class MyConfig(BertConfig):
            model_type = {model_type!r}

        class MyModel(BertForSequenceClassification):
            config_class = MyConfig
    """))
    return d, marker


def test_remote_code_refused_with_how_to_and_not_run(tmp_path, tiny_model_dirs, data_env):
    d, marker = _remote_code_model(tmp_path, tiny_model_dirs, "my-bert-kind")
    with pytest.raises(ModelError, match=r"own Python code.*trust_remote_code: true"):
        load_base_model(str(d))
    r = runner.invoke(app, ["run", str(_recipe(tmp_path, d)), "-o", str(tmp_path / "run")])
    assert r.exit_code == 1 and "trust_remote_code: true" in r.stderr and "Traceback" not in r.output
    assert not marker.exists()


def test_remote_code_runs_only_when_trusted(tmp_path, tiny_model_dirs):
    d, marker = _remote_code_model(tmp_path, tiny_model_dirs, "my-bert-kind2")
    model, _ = load_base_model(str(d), trust_remote_code=True)
    assert marker.exists() and type(model).__name__ == "MyModel"


def test_native_model_type_with_auto_map_loads_without_running_code(tmp_path, tiny_model_dirs):
    d, marker = _remote_code_model(tmp_path, tiny_model_dirs, "bert")
    model, _ = load_base_model(str(d))
    assert type(model).__name__ == "BertForSequenceClassification" and not marker.exists()


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """An importable module holding a Pass; importing it leaves a marker."""
    marker = tmp_path / "plugin-imported"
    (tmp_path / "evil_plugin_mod.py").write_text(textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        from stackcomp.passes.base import Pass

        class Shrink(Pass):
            \"\"\"Does nothing.\"\"\"
            name = "shrink"

        NotAPass = object
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evil_plugin_mod", raising=False)
    yield marker
    sys.modules.pop("evil_plugin_mod", None)


def test_plugin_path_refused_unless_allowed_and_not_imported(plugin_module):
    raw = {"name": "p", "model": "m", "stages": {"s": {"pass": "evil_plugin_mod:Shrink"}}}
    with pytest.raises(PlanError, match=r"allow_plugins: \[evil_plugin_mod:Shrink\]"):
        build_plan(recipe_from_dict(raw))
    assert not plugin_module.exists() and "evil_plugin_mod" not in sys.modules
    # allowing another path does not allow this one
    with pytest.raises(PlanError, match="refused"):
        build_plan(recipe_from_dict({**raw, "allow_plugins": ["evil_plugin_mod:Other"]}))
    assert not plugin_module.exists()


def test_plugin_path_allowed_is_imported_and_checked(plugin_module):
    raw = {"name": "p", "model": "m", "stages": {"s": {"pass": "evil_plugin_mod:Shrink"}},
           "allow_plugins": ["evil_plugin_mod:Shrink"]}
    plan = build_plan(recipe_from_dict(raw))
    assert plan.stages["s"].pass_cls.__name__ == "Shrink" and plugin_module.exists()
    raw = {**raw, "stages": {"s": {"pass": "evil_plugin_mod:NotAPass"}}, "allow_plugins": ["evil_plugin_mod:NotAPass"]}
    with pytest.raises(PlanError, match="pass class object has no string `name`"):
        build_plan(recipe_from_dict(raw))


def test_plugin_refusal_through_cli_says_how(tmp_path, plugin_module):
    p = tmp_path / "r.yaml"
    p.write_text("name: p\nmodel: m\nstages: {s: {pass: 'evil_plugin_mod:Shrink'}}\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 2 and "allow_plugins: [evil_plugin_mod:Shrink]" in r.stderr
    assert not plugin_module.exists()
