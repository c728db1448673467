"""`stackcomp compare / report / diff` on the command line: exit codes for goals (CI), JSON, markdown
and HTML outputs with their plots, the run report's per-layer analysis, and diff output."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest
import yaml
from _report_runs import build_runs
from typer.testing import CliRunner

from stackcomp.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dirs, tiny_glue):
    return build_runs(tmp_path_factory, tiny_model_dirs["bert"], tiny_glue)


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


def _json(result):
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_compare_table_and_json(runs):
    r = invoke("compare", runs["run1"], runs["run2"])
    assert r.exit_code == 0, r.output
    for leaf in ("ds_a", "ds_b", "ds_c", "ft"):
        assert leaf in r.output
    assert "ds_factorize" in r.output and "uncompressed" in r.output and "★" in r.output
    assert "per-stage attribution" in r.output
    r = invoke("compare", runs["run1"], runs["run2"], "--json")
    assert r.exit_code == 0
    out = _json(r)
    assert out["schema"] == "stackcomp-compare-1" and out["task"] == "glue/sst2" and out["metric"] == "accuracy"
    assert len(out["rows"]) == 4 and [x["label"] for x in out["runs"]] == ["tiny-branches", "tiny-other"]
    numeric = ("metric", "delta_points", "model_bytes", "linear_bytes", "model_ratio", "linear_ratio",
               "cpu_latency_ms", "compress_seconds", "path_seconds")
    for row in out["rows"]:
        for k in numeric:
            assert isinstance(row[k], (int, float)), (k, row)
        assert isinstance(row["pareto_bytes"], bool) and isinstance(row["pareto_latency"], bool)
        assert row["gpu_latency_ms"] is None
        for step in row["attribution"]:
            assert {"stage", "pass_name", "compresses", "seconds", "metric", "model_bytes", "d_metric_points",
                    "d_model_bytes", "d_cpu_latency_ms", "sizes_from"} <= set(step)
    # the recipe goal of run1 is met; run2 has none
    assert out["goals_given"] and out["any_goal_met"]
    assert {x["leaf"]: x["meets_goal"] for x in out["rows"]}["ds_c"] is None


def test_goal_exit_codes(runs):
    rows = {x["leaf"]: x for x in _json(invoke("compare", runs["run1"], "--json"))["rows"]}
    smallest = min(x["model_bytes"] for x in rows.values())
    r = invoke("compare", runs["run1"], "--max-bytes", f"{int(smallest)}B", "--json")
    assert r.exit_code == 0, r.output
    met = [x["leaf"] for x in _json(r)["rows"] if x["meets_goal"]]
    assert met == [min(rows, key=lambda k: rows[k]["model_bytes"])]
    r = invoke("compare", runs["run1"], "--max-bytes", f"{int(smallest) - 1}B")
    assert r.exit_code == 1
    assert "no stack meets the goal" in r.output and "Traceback" not in r.output
    r = invoke("compare", runs["run1"], "--metric-drop", "0", "--max-latency-ms", "1e-9")
    assert r.exit_code == 1
    r = invoke("compare", runs["run1"], "--max-bytes", "lots")
    assert r.exit_code == 2 and "not a size" in r.output and "Traceback" not in r.output


def test_recipe_goal_decides_the_exit_code(runs, tmp_path):
    strict = tmp_path / "strict"
    shutil.copytree(runs["run1"], strict)
    recipe = yaml.safe_load((strict / "recipe.resolved.yaml").read_text())
    recipe["goal"] = {"max_bytes": "1kB"}
    (strict / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    r = invoke("compare", strict)
    assert r.exit_code == 1 and "no stack meets the goal" in r.output
    assert invoke("compare", runs["run1"]).exit_code == 0
    # together: run1's rows meet run1's goal, so the comparison passes
    assert invoke("compare", runs["run1"], strict).exit_code == 0


def test_compare_a_recipe_resolves_to_its_run(runs, tmp_path):
    r = invoke("compare", runs["recipe1"], "--json", env={"STACKCOMP_RUNS": str(runs["root"])})
    assert r.exit_code == 0, r.output
    assert _json(r)["runs"][0]["run_dir"] == str(runs["run1"])
    r = invoke("compare", runs["recipe1"], env={"STACKCOMP_RUNS": str(tmp_path)})
    assert r.exit_code == 2 and "stackcomp run" in r.output and "Traceback" not in r.output


def test_html_is_self_contained_with_both_plots(runs, tmp_path):
    html_file = tmp_path / "out" / "compare.html"
    r = invoke("compare", runs["run1"], runs["run2"], "--html", html_file)
    assert r.exit_code == 0, r.output
    text = html_file.read_text()
    images = re.findall(r'<img alt="metric vs (\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert [a for a, _ in images] == ["bytes", "latency"]
    for _, b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in text and "https://" not in text and "<script" not in text
    for leaf in ("ds_a", "ds_b", "ds_c"):
        assert f">{leaf}<" in text
    assert "Per-stage attribution" in text


def test_markdown_and_plot_dir(runs, tmp_path):
    md = tmp_path / "docs" / "cmp.md"
    plots = tmp_path / "docs" / "img"
    r = invoke("compare", runs["run1"], "--markdown", md, "--plot-dir", plots)
    assert r.exit_code == 0, r.output
    text = md.read_text()
    links = re.findall(r"!\[metric vs \w+\]\(([^)]+)\)", text)
    assert sorted(links) == ["img/metric_vs_bytes.png", "img/metric_vs_latency.png"]
    for link in links:
        assert (md.parent / link).read_bytes()[:4] == b"\x89PNG"
    header = next(line for line in text.splitlines() if line.startswith("| leaf"))
    for col in ("accuracy %", "Δ pts", "model MB", "linear MB", "linear ×", "CPU ms", "compress s", "Pareto", "goal"):
        assert col in header
    assert sum(line.startswith("| ds_a | ds_factorize |") for line in text.splitlines()) == 1
    assert "## Per-stage attribution" in text


def test_report_shows_layers_and_recipe(runs, tmp_path):
    r = invoke("report", runs["run1"])
    assert r.exit_code == 0, r.output
    for needle in ("ds_error", "svd_error", "0.attention.self.query", "names after bert.encoder.layer.",
                   "resolved recipe", "pass: ds_factorize", "train history"):
        assert needle in r.output, needle
    r = invoke("report", runs["run1"], "--json")
    out = _json(r)
    ds = next(s for s in out["stages"] if s["stage"] == "ds_a")
    assert len(ds["report"]["analyze"]["layers"]) == 12 and out["comparison"]["rows"]
    assert out["lock"]["seeds"]["recipe"] == 42 and "stages:" in out["recipe_text"]
    html_file = tmp_path / "report.html"
    assert invoke("report", runs["run1"], "--html", html_file).exit_code == 0
    text = html_file.read_text()
    assert text.count("data:image/png;base64,") == 2
    assert "Resolved recipe" in text and "ds_error" in text and "Lock" in text


def test_diff_cli(runs):
    r = invoke("diff", runs["run1"], runs["run2"])
    assert r.exit_code == 0, r.output
    assert "seeds.recipe" in r.output and "stages.ft.params.max_steps" in r.output and "(absent)" in r.output
    r = invoke("diff", runs["run1"], runs["run2"], "--json")
    out = _json(r)
    assert {x["field"] for x in out["recipe"]} >= {"name", "seed", "stages.ft.params.max_steps", "stages.ds_a"}
    r = invoke("diff", runs["run1"], runs["run1"])
    assert r.exit_code == 0 and "0 difference(s)" in r.output


def test_terminal_leaderboard_has_every_column_at_any_width(runs, tmp_path):
    """The terminal board has the markdown's columns (vs, × parent too); narrow, they continue below."""
    assert invoke("compare", runs["run1"], "--markdown", tmp_path / "cmp.md").exit_code == 0
    md = (tmp_path / "cmp.md").read_text()
    headers = [h.strip() for h in next(l for l in md.splitlines() if l.startswith("| leaf")).split("|")[1:-1]]
    assert {"vs", "× parent", "model ×"} <= set(headers)
    for width in ("80", "200"):
        r = invoke("compare", runs["run1"], env={"COLUMNS": width})
        assert r.exit_code == 0, r.output
        board = r.output[:r.output.index("per-stage attribution")]
        assert all(h in board for h in headers), (width, board)
        assert max(len(line) for line in board.splitlines()) <= int(width)
        assert ("continued" in board) == (width == "80")


def test_metric_option_on_a_one_metric_task(runs):
    r = invoke("compare", runs["run1"], "--metric", "accuracy", "--json")
    assert r.exit_code == 0 and _json(r)["metric"] == "accuracy" and _json(r)["metrics"] == ["accuracy"]
    r = invoke("compare", runs["run1"], "--metric", "f1")
    assert r.exit_code == 2 and "available: accuracy" in r.output and "Traceback" not in r.output
