"""The pass contract: duck-typed passes, strict params, analysis handed over, broken plugins isolated."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest
import torch
from pydantic import BaseModel
from typer.testing import CliRunner

import stackcomp.passes.base as base
from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.errors import PlanError
from stackcomp.passes.base import Analysis, Pass, as_pass_class, register_pass
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

runner = CliRunner()


class DuckParams(BaseModel):  # a plain pydantic model: extra keys would be ignored by default
    factor: float = 2.0


class DuckPass:
    """A pass that does not subclass Pass: a name, Params and transform."""

    name = "_test_duck"
    Params = DuckParams

    def __init__(self, params=None):
        self.params = self.Params.model_validate(params or {})

    def transform(self, model, ctx):
        with torch.no_grad():
            model.classifier.weight.mul_(self.params.factor)
        return model


SEEN: dict = {}


class Handover(Pass):
    """analyze finds an object; transform receives that very object through ctx.analysis."""

    name = "_test_handover"

    def analyze(self, model, ctx):
        found = object()
        SEEN["found"] = found
        return Analysis(report={"layers": 3}, state={"found": found, "tensor": torch.ones(3)})

    def transform(self, model, ctx):
        SEEN["received"] = ctx.analysis.state["found"]
        SEEN["self_state"] = dict(vars(self))
        return model


def _plan(model_dir, stages):
    return build_plan(recipe_from_dict({"name": "c", "model": str(model_dir), "stages": stages}))


def test_duck_typed_pass_runs_like_a_builtin(tmp_path, tiny_model_dirs):
    cls = register_pass(DuckPass)
    assert issubclass(cls, Pass) and cls.name == "_test_duck" and cls.version == "1"
    summary = Engine(_plan(tiny_model_dirs["bert"], {"d": {"pass": "_test_duck", "params": {"factor": 3.0}}}),
                     tmp_path / "run").run()
    assert [s["stage"] for s in summary["stages"] if s["status"] == "ran"] == ["d", "d.eval"]


def test_plain_pydantic_params_reject_unknown_keys(tiny_model_dirs):
    register_pass(DuckPass)
    with pytest.raises(PlanError, match="params.factr"):
        _plan(tiny_model_dirs["bert"], {"d": {"pass": "_test_duck", "params": {"factr": 3.0}}})


def test_classes_that_fit_no_contract_are_refused_with_the_reason():
    class NoMethods:
        name = "x"

    class NoName:
        def transform(self, model, ctx):
            return model

    class BadParams:
        name = "y"
        Params = dict

        def transform(self, model, ctx):
            return model

    with pytest.raises(PlanError, match="defines none of analyze, transform, finetune"):
        as_pass_class(NoMethods, "here")
    with pytest.raises(PlanError, match="no string `name`"):
        as_pass_class(NoName, "here")
    with pytest.raises(PlanError, match="pydantic model"):
        as_pass_class(BadParams, "here")
    with pytest.raises(PlanError, match="not a pass class"):
        as_pass_class(len, "here")


def test_analysis_state_is_handed_to_transform_and_only_the_report_is_saved(tmp_path, tiny_model_dirs):
    register_pass(Handover)
    run = tmp_path / "run"
    summary = Engine(_plan(tiny_model_dirs["bert"], {"h": {"pass": "_test_handover"}}), run).run()
    assert SEEN["received"] is SEEN["found"]
    assert set(SEEN["self_state"]) == {"params"}  # nothing kept on the pass
    key = next(s["key"] for s in summary["stages"] if s["stage"] == "h")
    report = json.loads((run / "artifacts" / key / "report.json").read_text())
    assert report["analyze"] == {"layers": 3}


# ----------------------------------------------------------------------------- installed plugins


@pytest.fixture
def broken_plugins(tmp_path, monkeypatch):
    """Two installed distributions (a dist-info on sys.path, as pip leaves them) whose entry
    points are unusable: one fails to import, one names a class that is no pass."""
    site = tmp_path / "site"
    (site / "broken_plugin_mod").mkdir(parents=True)
    (site / "broken_plugin_mod" / "__init__.py").write_text("import libfoo_that_is_not_installed\n")
    (site / "not_a_pass_mod").mkdir()
    (site / "not_a_pass_mod" / "__init__.py").write_text("class Helper:\n    name = 'not_a_pass'\n")
    info = site / "stackcomp_broken_fixture-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stackcomp-broken-fixture\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [stackcomp.passes]
        broken_import = broken_plugin_mod:Thing
        not_a_pass = not_a_pass_mod:Helper
    """))
    monkeypatch.syspath_prepend(str(site))
    registry, broken, origin = base._REGISTRY, dict(base._BROKEN), dict(base._ORIGIN)
    base._REGISTRY = None
    base._BROKEN.clear()
    yield
    base._REGISTRY = registry
    base._BROKEN.clear()
    base._BROKEN.update(broken)
    base._ORIGIN.clear()
    base._ORIGIN.update(origin)
    sys.modules.pop("not_a_pass_mod", None)


def _recipe(tmp_path, model_dir, pass_name):
    p = tmp_path / f"{pass_name}.yaml"
    p.write_text(f"name: r\nmodel: {model_dir}\nstages:\n  a: {{pass: {pass_name}}}\n  b: {{pass: evaluate, after: a}}\n")
    return p


def test_a_broken_plugin_never_affects_recipes_that_do_not_use_it(tmp_path, tiny_model_dirs, broken_plugins):
    ok = runner.invoke(app, ["validate", str(_recipe(tmp_path, tiny_model_dirs["bert"], "int8"))])
    assert ok.exit_code == 0, ok.output

    listed = runner.invoke(app, ["passes", "list"])
    assert listed.exit_code == 0, listed.output
    text = " ".join(re.sub("[│┃]", " ", listed.output).split())  # the table's cells wrap: read them as prose
    assert "broken_import unusable entry point 'broken_import'" in text and "failed to import" in text
    assert "libfoo_that_is_not_installed" in text
    assert "not_a_pass unusable" in text and "defines none of" in text
    assert "finetune" in text  # the built-ins are still there

    for name, needle in (("broken_import", "failed to import"), ("not_a_pass", "defines none of")):
        bad = runner.invoke(app, ["validate", str(_recipe(tmp_path, tiny_model_dirs["bert"], name))])
        assert bad.exit_code == 2, bad.output
        assert f"pass {name!r} is installed but cannot be used" in bad.output and needle in bad.output
        assert "Traceback" not in bad.output
