"""Every metric a task defines in compare/report (terminal, markdown, HTML, JSON), ``--metric`` to
choose the ranking one, ratios of a layer-dropped student against its original, literal names.

The runs here are written by hand (summary.json, resolved recipe, each artifact's checksums):
an MRPC run whose metrics are chosen so that each ranking metric orders the board differently.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from stackcomp import render
from stackcomp.cli import app, summary_table
from stackcomp.errors import StackcompError
from stackcomp.recipe import Goal
from stackcomp.report import Run, compare, compare_runs

runner = CliRunner()

MRPC = ("accuracy", "f1", "combined_score")
STUDENT = "kd[lr=5e-05]"  # a sweep name: brackets that rich would read as markup


def _sizes(model, model_dense, linear, linear_dense, latency):
    return {"model_bytes": model, "model_dense_bytes": model_dense, "linear_bytes": linear,
            "linear_dense_bytes": linear_dense, "model_ratio_bytes": model_dense / model,
            "linear_ratio_bytes": linear_dense / linear, "latency_ms_per_batch": latency}


def _scores(acc, f1):
    return {"main_metric": "combined_score", "accuracy": acc, "f1": f1, "combined_score": (acc + f1) / 2,
            "eval_loss": 0.4, "train_seconds": 3.0}


def write_run(root, stages, *, model="prajjwal1/bert-tiny", task="glue/mrpc", name="mrpc-run", source_bytes=None):
    """A finished run on disk. ``stages``: (name, pass, parents, changes_model, weights bytes, metrics);
    ``source_bytes``: the source's weights file size, as the lock records it."""
    run = root / name
    names = {s[0] for s in stages}
    summary = {"recipe": name, "run_dir": str(run), "seconds": 1.0, "stages": []}
    for stage, pass_name, parents, changes, weights, metrics in stages:
        key = hashlib.sha256(stage.encode()).hexdigest()[:16]
        folder = run / "artifacts" / key
        folder.mkdir(parents=True)
        (folder / "stage.json").write_text(json.dumps({"stage": stage, "key": key, "params": {}}))
        (folder / "timings.json").write_text(json.dumps({"transform": 1.0}))
        if weights:
            (folder / "CHECKSUMS.json").write_text(json.dumps({"model/model.safetensors": ["0" * 64, weights]}))
        leaf = not any(stage in s[2] for s in stages)
        summary["stages"].append({"stage": stage, "pass": pass_name, "key": key, "parents": parents,
                                  "status": "ran", "seconds": 1.0, "metrics": metrics, "leaf": leaf,
                                  "changes_model": changes})
    assert len(names) == len(stages)
    (run / "summary.json").write_text(json.dumps(summary))
    if source_bytes:
        lock = {"model": {"files": {"model.safetensors": {"bytes": source_bytes}}}}
        (run / "lock.json").write_text(json.dumps(lock))
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump({"name": name, "model": model, "task": task,
                                                              "stages": {}}))
    return run


@pytest.fixture
def mrpc_run(tmp_path):
    """ft (6 layers) -> a 3-layer distilled student and a DS-factorized model, each evaluated.

    combined_score ranks ft, student, ds; f1 ranks student, ft, ds; accuracy ranks ds, ft, student.
    """
    return write_run(tmp_path, [
        ("ft", "finetune", [], True, 4_000_000, _scores(0.80, 0.86)),
        ("ft.eval", "evaluate", ["ft"], False, None, {**_scores(0.81, 0.87), **_sizes(4e6, 4e6, 3e6, 3e6, 10.0)}),
        (STUDENT, "distill", ["ft"], True, 2_500_000, _scores(0.78, 0.88)),
        # the student's own dense equivalent is itself: 3 layers, fp32
        (f"{STUDENT}.eval", "evaluate", [STUDENT], False, None,
         {**_scores(0.79, 0.88), **_sizes(2.5e6, 2.5e6, 1.5e6, 1.5e6, 5.0)}),
        ("ds", "ds_factorize", ["ft"], True, 2_000_000, _scores(0.80, 0.80)),
        ("ds.eval", "evaluate", ["ds"], False, None, {**_scores(0.82, 0.80), **_sizes(2e6, 4e6, 1e6, 3e6, 8.0)}),
    ])


def _leaves(c):
    return [r.leaf for r in c.rows]


# ----------------------------------------------------------------------------- the library


def test_rows_carry_every_task_metric_with_its_change(mrpc_run):
    c = compare([mrpc_run], load_sizes=False)
    assert c.metric_name == "combined_score" and c.metrics == ["combined_score", "accuracy", "f1"]
    rows = {r.leaf: r for r in c.rows}
    kd = rows[STUDENT]
    assert set(kd.metrics) == set(MRPC)  # no eval_loss or train_seconds
    assert kd.metrics["f1"] == 0.88 and kd.metrics["accuracy"] == 0.79
    assert kd.metric_deltas["f1"] == pytest.approx(1.0) and kd.metric_deltas["accuracy"] == pytest.approx(-2.0)
    assert kd.metric_deltas["combined_score"] == pytest.approx(kd.delta_points)
    assert rows["ft"].metric_deltas == {"accuracy": 0.0, "f1": 0.0, "combined_score": 0.0}
    out = json.loads(json.dumps(c.to_json(), allow_nan=False))
    assert out["metrics"] == ["combined_score", "accuracy", "f1"]
    assert all(set(row["metrics"]) == set(MRPC) and set(row["metric_deltas"]) == set(MRPC) for row in out["rows"])


def test_metric_chooses_the_ranking_goals_and_pareto_front(mrpc_run):
    assert _leaves(compare([mrpc_run], load_sizes=False)) == ["ft", STUDENT, "ds"]
    by_f1 = compare([mrpc_run], load_sizes=False, metric="f1")
    assert by_f1.metric_name == "f1" and _leaves(by_f1) == [STUDENT, "ft", "ds"]
    assert by_f1.metrics[0] == "f1"
    kd = next(r for r in by_f1.rows if r.leaf == STUDENT)
    assert kd.metric == 0.88 and kd.delta_points == pytest.approx(1.0) and kd.baseline_metric == 0.87
    assert kd.attribution[-1].metric == 0.88  # per-stage attribution follows the chosen metric
    assert {r.leaf: r.pareto_bytes for r in by_f1.rows} == {"ft": False, STUDENT: True, "ds": True}
    by_acc = compare([mrpc_run], load_sizes=False, metric="accuracy")
    assert _leaves(by_acc) == ["ds", "ft", STUDENT]
    assert {r.leaf: r.pareto_bytes for r in by_acc.rows} == {"ft": False, STUDENT: False, "ds": True}
    run = Run(mrpc_run)
    goal = Goal(metric_drop=1.0)
    meets = {m: {r.leaf: r.meets_goal for r in compare_runs([run], goal=goal, load_sizes=False, metric=m).rows}
             for m in ("combined_score", "accuracy")}
    assert meets["combined_score"] == {"ft": True, STUDENT: True, "ds": False}  # drops 0.5 and 3 points
    assert meets["accuracy"] == {"ft": True, STUDENT: False, "ds": True}  # drops 2 points and gains 1


def test_unknown_metric_lists_the_available_ones(mrpc_run):
    with pytest.raises(StackcompError, match=r"'f2'.*glue/mrpc.*available: accuracy, f1, combined_score"):
        compare([mrpc_run], load_sizes=False, metric="f2")
    with pytest.raises(StackcompError, match="available"):
        compare([mrpc_run], load_sizes=False, metric="eval_loss")  # recorded, but not a task metric


def test_student_ratios_count_the_removed_layers(mrpc_run):
    rows = {r.leaf: r for r in compare([mrpc_run], load_sizes=False).rows}
    kd = rows[STUDENT]
    # 3 of 6 layers: its own dense equivalent is itself (1.00x); against ft's fp32 dense bytes it is smaller
    assert kd.model_ratio == pytest.approx(4e6 / 2.5e6) and kd.linear_ratio == pytest.approx(3e6 / 1.5e6)
    assert kd.parent_ratio == pytest.approx(4e6 / 2.5e6) and kd.ratio_reference == "ft"
    ds = rows["ds"]  # same architecture as its parent: the same ratios as before
    assert ds.model_ratio == pytest.approx(2.0) and ds.linear_ratio == pytest.approx(3.0)
    assert rows["ft"].model_ratio == pytest.approx(1.0) and rows["ft"].ratio_reference == "ft"


def test_student_of_the_source_is_compared_to_the_source(tmp_path, tiny_model_dirs):
    """A first stage that compresses has the source as its parent: the source model is sized."""
    from stackcomp.data.glue import get_task
    from stackcomp.evaluate import size_report
    from stackcomp.models import load_base_model

    source = size_report(load_base_model(str(tiny_model_dirs["bert"]), get_task("glue/mrpc"))[0])
    half = {k: source[k] // 2 for k in ("model_bytes", "linear_bytes")}
    run = write_run(tmp_path, [
        ("kd", "distill", [], True, 1000, _scores(0.7, 0.8)),
        ("kd.eval", "evaluate", ["kd"], False, None,
         {**_scores(0.7, 0.8), **_sizes(half["model_bytes"], half["model_bytes"], half["linear_bytes"],
                                        half["linear_bytes"], 1.0)}),
    ], model=str(tiny_model_dirs["bert"]), source_bytes=(tiny_model_dirs["bert"] / "model.safetensors").stat().st_size)
    (row,) = compare([run]).rows
    assert row.baseline == "source" and row.ratio_reference == "source"
    assert row.model_ratio == pytest.approx(source["model_dense_bytes"] / half["model_bytes"])
    assert row.linear_ratio == pytest.approx(source["linear_dense_bytes"] / half["linear_bytes"])
    assert row.parent_ratio == pytest.approx(source["model_bytes"] / half["model_bytes"])
    (bare,) = compare([run], load_sizes=False).rows  # the source is not sized: its own dense equivalent
    assert bare.ratio_reference == "kd" and bare.model_ratio == pytest.approx(1.0) and bare.parent_ratio is None


# ----------------------------------------------------------------------------- outputs


def _terminal(c, width):
    console = Console(record=True, width=width)
    console.print(render.rich_leaderboard(c))
    return console.export_text()


def test_terminal_table_has_the_markdown_columns_and_folds(mrpc_run):
    c = compare([mrpc_run], load_sizes=False)
    md = render.markdown_comparison(c)
    md_header = [h.strip() for h in next(line for line in md.splitlines() if line.startswith("| leaf")).split("|")[1:-1]]
    assert md_header[:6] == ["leaf", "method", "combined_score %", "Δ pts", "accuracy % (Δ)", "f1 % (Δ)"]
    assert {"vs", "model ×", "× parent"} <= set(md_header)
    assert "| 79.00 (-2.00) | 88.00 (+1.00) |" in next(line for line in md.splitlines() if "distill" in line)
    html = render.html_comparison(c, {})
    assert all(f">{h}</th>" in html for h in md_header)
    wide = _terminal(c, 200)
    header = next(line for line in wide.splitlines() if "leaf" in line)
    positions = [header.find(h) for h in md_header]
    assert -1 not in positions and positions == sorted(positions), header  # every column, same order
    assert "1.60×" in wide and STUDENT in wide and "79.00 (-2.00)" in wide
    narrow = _terminal(c, 80)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    # the columns that do not fit continue below, each whole, with the row names repeated
    assert all(h in narrow for h in md_header) and "continued" in narrow
    assert narrow.count(STUDENT) >= 2 and "ds_factorize" in narrow
    for cell in ("1.60×", "88.00 (+1.00)", "itself", "★SL"):
        assert cell in narrow


def test_cli_json_metric_option_and_unknown_metric(mrpc_run):
    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})

    r = invoke("compare", mrpc_run, "--json", "--no-load")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["metric"] == "combined_score" and [x["leaf"] for x in out["rows"]] == ["ft", STUDENT, "ds"]
    assert all(set(x["metrics"]) == set(MRPC) for x in out["rows"])
    r = invoke("compare", mrpc_run, "--json", "--no-load", "--metric", "f1")
    assert json.loads(r.stdout)["metric"] == "f1"
    assert [x["leaf"] for x in json.loads(r.stdout)["rows"]] == [STUDENT, "ft", "ds"]
    r = invoke("compare", mrpc_run, "--no-load", "--metric", "f1")
    assert r.exit_code == 0 and "sorted by f1" in r.output and STUDENT in r.output
    r = invoke("report", mrpc_run, "--no-load", "--metric", "accuracy", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["comparison"]["rows"][0]["leaf"] == "ds"
    r = invoke("compare", mrpc_run, "--no-load", "--metric", "f2")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and "available: accuracy, f1, combined_score" in r.output


def test_run_summary_shows_every_task_metric_and_literal_names(mrpc_run):
    summary = json.loads((mrpc_run / "summary.json").read_text())
    console = Console(record=True, width=200)
    console.print(summary_table(summary, "glue/mrpc"))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "stage" in line)
    assert re.search(r"combined_score.*accuracy.*f1", header) and "eval_loss" not in header
    student = next(line for line in text.splitlines() if f"│ {STUDENT}.eval " in line)
    assert "0.8350" in student and "0.7900" in student and "0.8800" in student


def test_live_run_tree_prints_sweep_names_literally(tmp_path):
    """The live ``run`` tree: ``ft[lr=5e-05]`` is a stage name, not rich markup."""
    from stackcomp.plan import build_plan
    from stackcomp.recipe import recipe_from_dict
    from stackcomp.view import RunView, headline

    recipe = recipe_from_dict({"name": "sweep[x]", "model": "minilm-l6", "task": "glue/sst2",
                               "stages": {"ft": {"pass": "finetune"}, "ev": {"pass": "evaluate", "after": "ft"}}},
                              ["stages.ft.params.lr=5e-05,1e-4"])
    plan = build_plan(recipe)
    console = Console(record=True, width=200)
    console.print(RunView(plan, tmp_path / "run[x]", {}, console=None)._tree())
    text = console.export_text()
    for name in ("sweep[x]", "run[x]", "ft[lr=5e-05]", "ev[lr=5e-05]", "ft[lr=0.0001]"):
        assert name in text, text
    console = Console(record=True, width=200)
    console.print(headline({"main_metric": "f1[dev]", "f1[dev]": 0.5}))
    assert "f1[dev]=0.5000" in console.export_text()


def test_diff_names_a_changed_secondary_metric(mrpc_run, tmp_path):
    import shutil

    from stackcomp.report import diff_runs

    copy = tmp_path / "copy"
    shutil.copytree(mrpc_run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    next(s for s in summary["stages"] if s["stage"] == "ds.eval")["metrics"]["f1"] = 0.5
    (copy / "summary.json").write_text(json.dumps(summary))
    fields = {(x["leaf"], x["field"]): x for x in diff_runs(mrpc_run, copy, load_sizes=False)["results"]}
    assert (fields[("ds", "metrics.f1")]["a"], fields[("ds", "metrics.f1")]["b"]) == (0.80, 0.5)
    assert ("ds", "metrics.accuracy") not in fields and ("ft", "metrics.f1") not in fields


def test_plan_tree_prints_recipe_and_sweep_names_literally(tmp_path, data_env):  # plan checks the data
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: sweep[x]\nmodel: minilm-l6\ntask: glue/sst2\nstages: {ft: {pass: finetune}}\n")
    r = runner.invoke(app, ["plan", str(recipe), "-o", str(tmp_path / "run"), "stages.ft.params.lr=5e-05,1e-4"],
                      terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "sweep[x]" in r.output and "ft[lr=5e-05]" in r.output and "ft[lr=0.0001]" in r.output
