"""CLI: user mistakes give one line and exit code 2; passes list/describe; new-pass scaffold."""

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from stackcomp.cli import app

runner = CliRunner()


DEMO = """
    name: demo
    model: minilm-l6
    task: glue/sst2
    stages:
      ft: {pass: finetune}
      ev: {pass: evaluate, after: ft}
"""


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("text,needle", [
    ("name: x\nmodel: m\nstages: {a: {pass: nope}}\n", "unknown pass 'nope'"),
    ("name: x\nmodel: m\nstages: {a: {pass: finetune, after: a}}\n", "after itself"),
    ("name: x\nstages: [\n", "invalid YAML"),
    ("name: x\nmodel: m\nstages: {a: {pass: finetune}}\n", "needs a task"),
])
def test_validate_errors_exit_2_without_traceback(tmp_path, text, needle):
    result = runner.invoke(app, ["validate", str(write(tmp_path, text))])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_validate_ok_and_plan_draws_the_tree(tmp_path, data_env):  # validate checks the data is there
    p = write(tmp_path, DEMO)
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 0 and "2 stages" in r.output
    r = runner.invoke(app, ["plan", str(p), "-o", str(tmp_path / "run")])
    assert r.exit_code == 0 and "ft" in r.output and "to run" in r.output


def test_plan_and_summary_show_swept_stage_names_literally(tmp_path, data_env):
    """Sweep clones are named like ``ft[lr=1e-05]``, which rich would read as markup and drop."""
    from stackcomp.cli import summary_table
    from rich.console import Console

    p = write(tmp_path, DEMO)
    r = runner.invoke(app, ["plan", str(p), "-o", str(tmp_path / "run"), "stages.ft.params.seed=1,2"],
                      terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "ft[seed=1]" in r.output and "ev[seed=2]" in r.output
    console = Console(record=True, width=200)
    console.print(summary_table({"recipe": "demo", "seconds": 1.0, "stages": [
        {"stage": "ft[seed=1]", "pass": "finetune", "status": "ran", "seconds": 1.0, "metrics": {}}]}))
    assert "ft[seed=1]" in console.export_text()


def test_missing_recipe_file(tmp_path):
    r = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "not found" in r.output


def test_passes_list_and_describe():
    r = runner.invoke(app, ["passes", "list"])
    assert r.exit_code == 0
    for name in ("finetune", "evaluate", "export"):
        assert name in r.output
    r = runner.invoke(app, ["passes", "describe", "finetune"])
    assert r.exit_code == 0 and "lr" in r.output and "epochs" in r.output
    r = runner.invoke(app, ["passes", "describe", "nonexistent"])
    assert r.exit_code == 2 and "unknown pass" in r.output
    r = runner.invoke(app, ["passes", "describe", "distill"], env={"COLUMNS": "200"})
    assert "AugmentOptions | None" in r.output and "augment.AugmentOptions" not in r.output


def test_real_process_exit_code(tmp_path):
    p = write(tmp_path, "name: x\nmodel: m\nstages: {a: {pass: nope}}\n")
    proc = subprocess.run([sys.executable, "-m", "stackcomp.cli", "validate", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown pass" in proc.stderr


def test_new_pass_writes_a_plugin_whose_test_passes(tmp_path):
    r = runner.invoke(app, ["new-pass", "my_prune", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    pkg = tmp_path / "stackcomp-my-prune"
    assert (pkg / "pyproject.toml").read_text().count('my_prune = "stackcomp_my_prune:MyPrunePass"') == 1
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                          cwd=pkg, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(pkg)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = runner.invoke(app, ["new-pass", "my_prune", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["new-pass", "Bad-Name", "-o", str(tmp_path)])
    assert r.exit_code == 2


def test_plan_only_keeps_what_the_named_stages_need(tmp_path, data_env):
    import json

    p = write(tmp_path, """
        name: sel
        model: minilm-l6
        task: glue/sst2
        stages:
          ft: {pass: finetune}
          a: {pass: finetune, after: ft}
          b: {pass: finetune, after: ft}
          c: {pass: finetune, after: b}
        """)
    r = runner.invoke(app, ["plan", str(p), "-o", str(tmp_path / "run"), "--json", "--only", "a"])
    assert r.exit_code == 0, r.output
    assert [s["stage"] for s in json.loads(r.stdout)] == ["ft", "a", "a.eval"]
    full = runner.invoke(app, ["plan", str(p), "-o", str(tmp_path / "run"), "--json"])
    keys = {s["stage"]: s["key"] for s in json.loads(full.stdout)}
    assert json.loads(r.stdout)[1]["key"] == keys["a"]  # same keys: the cache is shared with full runs
    r = runner.invoke(app, ["plan", str(p), "-o", str(tmp_path / "run"), "--json", "--only", "c,a"])
    assert {s["stage"] for s in json.loads(r.stdout)} == {"ft", "a", "b", "c", "a.eval", "c.eval"}
    r = runner.invoke(app, ["plan", str(p), "-o", str(tmp_path / "run"), "--only", "zz"])
    assert r.exit_code == 2 and "unknown stage" in r.output and "Traceback" not in r.output
