"""compare/report/diff as a library: rows checked against the files the runs wrote, Pareto marks
against a brute-force check, goals, attribution, the lock's hashes, and the per-layer blocks."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import time

import pytest
import torch
import yaml
from _report_runs import build_runs

from stackcomp.errors import StackcompError
from stackcomp.recipe import Goal, parse_bytes
from stackcomp.report import Run, check_goal, compare, compare_runs, diff_runs, pareto_mask


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dirs, tiny_glue):
    return build_runs(tmp_path_factory, tiny_model_dirs["bert"], tiny_glue)


def _summary(run_dir):
    return {s["stage"]: s for s in json.loads((run_dir / "summary.json").read_text())["stages"]}


def _seconds(run_dir, stage):
    key = _summary(run_dir)[stage]["key"]
    return sum(json.loads((run_dir / "artifacts" / key / "timings.json").read_text()).values())


# ----------------------------------------------------------------------------- rows


def test_rows_match_what_the_runs_wrote(runs):
    c = compare([runs["run1"]])
    s = _summary(runs["run1"])
    rows = {r.leaf: r for r in c.rows}
    assert set(rows) == {"ft", "ds_a", "ds_b"}  # `eval` measures ft: one row per model
    assert c.task == "glue/sst2" and c.metric_name == "accuracy"
    ft_acc = s["eval"]["metrics"]["accuracy"]
    for leaf in ("ds_a", "ds_b"):
        r, m = rows[leaf], s[f"{leaf}.eval"]["metrics"]
        assert r.method == "ds_factorize" and r.path == ["ft", leaf] and r.passes == ["finetune", "ds_factorize"]
        assert r.measured_by == [f"{leaf}.eval"]
        assert r.metric == m["accuracy"]
        assert r.baseline == "ft" and r.baseline_metric == ft_acc
        assert r.delta_points == pytest.approx(100 * (m["accuracy"] - ft_acc))
        assert r.model_bytes == m["model_bytes"] and r.linear_bytes == m["linear_bytes"]
        # ratios against the fp32 dense bytes of the uncompressed parent (same architecture here: the
        # leaf's own dense equivalent gives the same numbers)
        ft_m = s["eval"]["metrics"]
        assert r.ratio_reference == "ft"
        assert r.linear_ratio == pytest.approx(ft_m["linear_dense_bytes"] / m["linear_bytes"])
        assert r.linear_ratio == pytest.approx(m["linear_dense_bytes"] / m["linear_bytes"])
        assert r.model_ratio == pytest.approx(ft_m["model_dense_bytes"] / m["model_bytes"])
        assert r.model_ratio == pytest.approx(m["model_ratio_bytes"])
        assert r.metrics == {"accuracy": m["accuracy"]} and r.metric_deltas["accuracy"] == r.delta_points
        assert r.parent_ratio == pytest.approx(s["eval"]["metrics"]["model_bytes"] / m["model_bytes"])
        assert r.cpu_latency_ms == m["latency_ms_per_batch"] and r.gpu_latency_ms is None
        assert r.compress_seconds == pytest.approx(_seconds(runs["run1"], leaf))
        assert r.path_seconds == pytest.approx(_seconds(runs["run1"], leaf) + _seconds(runs["run1"], "ft"))
    ft = rows["ft"]
    assert ft.method == "uncompressed" and ft.baseline == "ft" and ft.delta_points == 0.0
    assert ft.compress_seconds == 0.0 and ft.metric == ft_acc
    # DS stores fewer linear bytes than the dense parent; the tighter branch (nnz 2) fewer than nnz 4
    assert rows["ds_a"].linear_bytes < rows["ds_b"].linear_bytes < ft.linear_bytes
    # sorted by metric (desc), then bytes (asc)
    keys = [(-r.metric, r.model_bytes) for r in c.rows]
    assert keys == sorted(keys)


def test_attribution_along_each_path(runs):
    c = compare([runs["run1"]])
    r = next(r for r in c.rows if r.leaf == "ds_b")
    ft_step, ds_step = r.attribution
    assert (ft_step.stage, ds_step.stage) == ("ft", "ds_b")
    assert not ft_step.compresses and ds_step.compresses
    assert ft_step.d_metric_points is None  # nothing before the first stage
    assert ds_step.d_model_bytes == pytest.approx(r.model_bytes - ft_step.model_bytes)
    assert ds_step.d_linear_bytes == pytest.approx(r.linear_bytes - ft_step.linear_bytes) and ds_step.d_linear_bytes < 0
    assert ds_step.d_cpu_latency_ms == pytest.approx(r.cpu_latency_ms - ft_step.cpu_latency_ms)
    assert ds_step.seconds == pytest.approx(_seconds(runs["run1"], "ds_b"))
    assert ft_step.sizes_from == ds_step.sizes_from == "measured"


def test_unmeasured_parent_gets_computed_sizes_or_na(runs):
    """run2's ft has no evaluate stage: its metric comes from training, its size from its weights."""
    s2 = _summary(runs["run2"])
    r = compare([runs["run2"]]).rows
    assert [x.leaf for x in r] == ["ds_c"]
    row = r[0]
    assert row.baseline == "ft" and row.baseline_metric == s2["ft"]["metrics"]["accuracy"]
    ft_step = row.attribution[0]
    assert ft_step.sizes_from == "computed" and ft_step.cpu_latency_ms is None
    # same architecture, fp32: equals the size run1's evaluate stage measured for its ft
    assert ft_step.model_bytes == _summary(runs["run1"])["eval"]["metrics"]["model_bytes"]
    assert row.parent_ratio == pytest.approx(ft_step.model_bytes / row.model_bytes)
    bare = compare([runs["run2"]], load_sizes=False).rows[0]
    assert bare.attribution[0].model_bytes is None and bare.attribution[0].sizes_from is None
    assert bare.parent_ratio is None and bare.model_bytes == row.model_bytes  # the leaf measured its own


def test_several_runs_one_leaderboard(runs):
    c = compare([runs["run1"], runs["run2"], runs["run1"] / "summary.json"])  # the same run twice counts once
    assert len(c.runs) == 2
    assert sorted((r.run, r.leaf) for r in c.rows) == [("tiny-branches", "ds_a"), ("tiny-branches", "ds_b"),
                                                       ("tiny-branches", "ft"), ("tiny-other", "ds_c")]


# ----------------------------------------------------------------------------- Pareto


def _brute(points):
    out = []
    for i, p in enumerate(points):
        if p is None:
            out.append(None)
            continue
        dominated = any(q is not None and j != i and q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])
                        for j, q in enumerate(points))
        out.append(not dominated)
    return out


def test_pareto_mask_matches_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 12)
        grid = rng.choice([3, 5, 1000])  # small grids force ties in metric, in cost, and in both
        pts = [None if rng.random() < 0.15 else (rng.randrange(grid) / grid, float(rng.randrange(grid)))
               for _ in range(n)]
        assert pareto_mask(pts) == _brute(pts), pts
    planted = [(0.9, 10.0), (0.9, 10.0), (0.8, 5.0), (0.95, 20.0), (0.7, 6.0)]
    assert pareto_mask(planted) == [True, True, True, True, False]


def test_pareto_marks_on_real_rows(runs):
    c = compare([runs["run1"], runs["run2"]])
    for attr, cost in (("pareto_bytes", "model_bytes"), ("pareto_latency", "cpu_latency_ms")):
        expected = _brute([(r.metric, getattr(r, cost)) for r in c.rows])
        assert [getattr(r, attr) for r in c.rows] == expected
    assert any(r.pareto_bytes for r in c.rows)


# ----------------------------------------------------------------------------- goals


def test_parse_bytes_and_goal_validation():
    assert parse_bytes("20MB") == 20e6 and parse_bytes("1.5 GiB") == 1.5 * 2**30 and parse_bytes("512") == 512
    assert Goal(max_bytes="3kB").max_bytes == 3000
    with pytest.raises(ValueError, match="not a size"):
        Goal(max_bytes="20 parsecs")


def test_goals_mark_rows_and_set_the_exit_code(runs):
    run = Run(runs["run1"])
    by_leaf = {r.leaf: r for r in compare_runs([run]).rows}
    # the recipe's own goal (drop <= 50 points, <= 100 MB) holds for all
    assert all(r.meets_goal for r in by_leaf.values())
    between = (by_leaf["ds_a"].model_bytes + by_leaf["ft"].model_bytes) / 2
    c = compare_runs([run], goal=Goal(max_bytes=between))
    meets = {r.leaf: r.meets_goal for r in c.rows}
    assert meets == {"ds_a": True, "ds_b": by_leaf["ds_b"].model_bytes <= between, "ft": False}
    assert c.exit_code == 0 and c.any_goal_met
    c = compare_runs([run], goal={"max_bytes": by_leaf["ds_a"].model_bytes - 1})
    assert c.exit_code == 1 and not c.any_goal_met
    assert all("MB >" in r.goal_failures[0] for r in c.rows)
    c = compare_runs([run], goal={"max_latency_ms": 1e-6})
    assert c.exit_code == 1
    # a metric drop cannot be checked without a measured parent: it fails, saying why
    row = next(r for r in compare([runs["run2"]]).rows)
    row.delta_points = None
    assert not check_goal(row, Goal(metric_drop=1.0)) and "unknown" in row.goal_failures[0]


def test_no_goal_means_exit_zero(runs):
    c = compare([runs["run2"]])
    assert not c.goals_given and c.any_goal_met is None and c.exit_code == 0
    assert all(r.meets_goal is None for r in c.rows)


# ----------------------------------------------------------------------------- errors


def test_user_errors(runs, tmp_path, monkeypatch):
    with pytest.raises(StackcompError, match="did not finish"):
        (tmp_path / "half" / "artifacts").mkdir(parents=True)
        compare([tmp_path / "half"])
    with pytest.raises(StackcompError, match="not a run directory"):
        compare([tmp_path])
    with pytest.raises(StackcompError, match="no run directory or recipe"):
        compare([tmp_path / "missing"])
    monkeypatch.setenv("STACKCOMP_RUNS", str(tmp_path))
    with pytest.raises(StackcompError, match="stackcomp run"):
        compare([runs["recipe1"]])
    monkeypatch.setenv("STACKCOMP_RUNS", str(runs["root"]))
    assert [r.dir for r in compare([runs["recipe1"]]).runs] == [runs["run1"]]
    other = tmp_path / "rte"
    shutil.copytree(runs["run2"], other)
    recipe = yaml.safe_load((other / "recipe.resolved.yaml").read_text())
    recipe["task"] = "glue/rte"
    (other / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(StackcompError, match="different tasks"):
        compare([runs["run1"], other])


# ----------------------------------------------------------------------------- lock


def test_lock_records_versions_seeds_hashes_and_hardware(runs, tiny_model_dirs, tiny_glue):
    lock = json.loads((runs["run1"] / "lock.json").read_text())
    assert lock["packages"]["torch"] == torch.__version__
    assert lock["packages"]["stackcomp"] and lock["python"]["version"]
    assert lock["passes"]["ds_factorize"]["class"] == "stackcomp.passes.ds_factorize:DSFactorizePass"
    assert lock["seeds"]["recipe"] == 42 and lock["seeds"]["stages.ds_a.params.seed"] == 0
    assert lock["seeds"]["stages.ft.params.train.seed"] == 42  # finetune's loop settings sit under train:
    train = tiny_glue / "glue" / "SST-2" / "train.tsv"
    assert lock["data"]["source"] == "local"
    assert lock["data"]["files"]["train"]["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()
    dev = tiny_glue / "glue" / "SST-2" / "dev.tsv"
    assert lock["data"]["files"]["dev"]["sha256"] == hashlib.sha256(dev.read_bytes()).hexdigest()
    weights = tiny_model_dirs["bert"] / "model.safetensors"
    assert lock["model"]["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert lock["hardware"]["logical_cores"] == os.cpu_count() and lock["hardware"]["cpu"]
    assert lock["stage_keys"]["ds_a"] == _summary(runs["run1"])["ds_a"]["key"]
    lock2 = json.loads((runs["run2"] / "lock.json").read_text())
    assert lock2["seeds"]["recipe"] == 7 and lock2["model"]["sha256"] == lock["model"]["sha256"]


def test_lock_reuses_hashes_of_unchanged_files(runs, tmp_path, monkeypatch):
    from stackcomp import fingerprint
    from stackcomp.fingerprint import HashCache

    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0)  # cache a file just written
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x" * 1000)
    cache_file = tmp_path / "hashes.json"
    cache = HashCache(cache_file)
    entry = cache.record(f)
    assert entry["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    cache.save()
    stored = json.loads(cache_file.read_text())
    stored["files"][entry["path"]][3] = "planted"
    cache_file.write_text(json.dumps(stored))
    assert HashCache(cache_file).record(f)["sha256"] == "planted"  # same path, size and times: not re-read
    time.sleep(0.05)  # past the timestamp granularity
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(entry["mtime_ns"], entry["mtime_ns"]))  # mtime set back: the ctime still tells
    assert HashCache(cache_file).record(f)["sha256"] == hashlib.sha256(b"y" * 1000).hexdigest()


# ----------------------------------------------------------------------------- diff


def test_diff_names_what_differs(runs):
    d = diff_runs(runs["run1"], runs["run2"])
    recipe = {x["field"]: x for x in d["recipe"]}
    assert (recipe["seed"]["a"], recipe["seed"]["b"]) == (42, 7)
    assert (recipe["stages.ft.params.max_steps"]["a"], recipe["stages.ft.params.max_steps"]["b"]) == (2, 3)
    assert recipe["stages.ds_a"]["only_in"] == "a" and recipe["stages.ds_c"]["only_in"] == "b"
    lock = {x["field"]: x for x in d["lock"]}
    assert (lock["seeds.recipe"]["a"], lock["seeds.recipe"]["b"]) == (42, 7)
    assert "created_at" not in lock and not any(k.endswith("mtime_ns") for k in lock)
    assert "packages.torch" not in lock and "model.sha256" not in lock  # same environment, same model
    results = {(x["leaf"], x["field"]): x for x in d["results"]}
    assert results[("ds_a", "(leaf)")]["only_in"] == "a" and results[("ds_c", "(leaf)")]["only_in"] == "b"


def test_diff_of_a_run_with_itself_is_empty(runs):
    d = diff_runs(runs["run1"], runs["run1"])
    assert d["recipe"] == [] and d["lock"] == [] and d["results"] == []


def test_diff_shows_changed_results_and_inputs(runs, tmp_path):
    """A copy whose lock (torch version) and leaf metric were edited: both differences are reported."""
    copy = tmp_path / "copy"
    shutil.copytree(runs["run1"], copy)
    lock = json.loads((copy / "lock.json").read_text())
    lock["packages"]["torch"] = "0.0.1"
    (copy / "lock.json").write_text(json.dumps(lock))
    summary = json.loads((copy / "summary.json").read_text())
    for st in summary["stages"]:
        if st["stage"] == "ds_a.eval":
            st["metrics"]["accuracy"] = st["metrics"]["accuracy"] - 0.25
    (copy / "summary.json").write_text(json.dumps(summary))
    d = diff_runs(runs["run1"], copy)
    assert [x["field"] for x in d["lock"]] == ["packages.torch"]
    fields = {(x["leaf"], x["field"]): x for x in d["results"]}
    assert fields[("ds_a", "metric")]["a"] - fields[("ds_a", "metric")]["b"] == pytest.approx(0.25)
    assert ("ds_b", "metric") not in fields


# ----------------------------------------------------------------------------- per-layer blocks


def test_analysis_blocks_planted_report():
    from stackcomp.render import analysis_blocks

    report = {"analyze": {"layers": {"enc.layer.0.q": {"shape": [4, 8], "error": 0.5},
                                     "enc.layer.1.q": {"shape": [4, 8], "error": 0.25, "note": "x"}},
                          "worse_than_svd": ["enc.layer.1.q"], "ratio": 2.0},
              "train_history": [{"step": i, "loss": 1.0 / (i + 1)} for i in range(25)], "stf": True}
    blocks = {b["title"]: b for b in analysis_blocks(report)}
    layers = blocks["layers (2)"]
    assert layers["columns"] == ["name", "shape", "error", "note"]
    assert layers["rows"][0] == ["0.q", "4×8", "0.5", "—"] and layers["note"] == "names after enc.layer."
    assert blocks["⚠ worse than svd (1)"]["rows"] == [["enc.layer.1.q"]]
    assert blocks["summary"]["rows"] == [["ratio", "2"], ["stf", "yes"]]
    hist = blocks["train history (25)"]
    assert len(hist["rows"]) == 10 and hist["rows"][-1][0] == "24" and "last 10 of 25" in hist["note"]


def test_plots_hold_every_point(runs):
    from stackcomp.plots import all_plots

    c = compare([runs["run1"], runs["run2"]])
    pngs = all_plots(c)
    assert set(pngs) == {"bytes", "latency"}
    for png in pngs.values():
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert 900 <= w <= 2400 and 500 <= h <= 1400
    for r in c.rows:
        r.cpu_latency_ms = None
    assert set(all_plots(c)) == {"bytes"}  # no latency measured: no latency plot


def test_json_is_strict_and_complete(runs):
    out = compare([runs["run1"]]).to_json()
    text = json.dumps(out, allow_nan=False)  # no NaN/inf sneaks in
    back = json.loads(text)
    assert back["schema"] == "stackcomp-compare-1" and len(back["rows"]) == 3
    assert {"leaf", "metric", "delta_points", "model_bytes", "linear_bytes", "pareto_bytes", "pareto_latency",
            "meets_goal", "attribution"} <= set(back["rows"][0])
    assert list(itertools.chain.from_iterable(r["path"] for r in back["rows"])).count("ft") == 3


def test_missing_metric_and_gpu_latency(runs, tmp_path):
    """A leaf without a task metric is ranked nowhere and shows n/a; a GPU latency a pass wrote is shown."""
    from stackcomp.plots import all_plots
    from stackcomp.render import markdown_comparison

    copy = tmp_path / "copy"
    shutil.copytree(runs["run1"], copy)
    summary = json.loads((copy / "summary.json").read_text())
    for st in summary["stages"]:
        if st["stage"] in ("ds_b", "ds_b.eval"):  # ds_b trained, so it measured accuracy too
            del st["metrics"]["accuracy"], st["metrics"]["main_metric"]
        if st["stage"] == "ds_a.eval":
            st["metrics"]["gpu_latency_ms_per_batch"] = 1.25
    (copy / "summary.json").write_text(json.dumps(summary))
    c = compare([copy], load_sizes=False)
    rows = {r.leaf: r for r in c.rows}
    assert rows["ds_b"].metric is None and rows["ds_b"].pareto_bytes is None and rows["ds_b"].delta_points is None
    assert c.rows[-1].leaf == "ds_b"  # unranked rows sort last
    assert rows["ds_a"].gpu_latency_ms == 1.25 and rows["ft"].gpu_latency_ms is None
    md = markdown_comparison(c)
    header = next(line for line in md.splitlines() if line.startswith("| leaf"))
    assert "GPU ms" in header
    ds_b_line = next(line for line in md.splitlines() if line.startswith("| ds_b | ds_factorize"))
    assert "| n/a |" in ds_b_line
    assert set(all_plots(c)) == {"bytes", "latency"}  # drawn from the rows that have a metric


def test_artifacts_in_a_shared_cache(runs, tmp_path):
    """A run made with --cache keeps its artifacts elsewhere; summary.json says where."""
    copy = tmp_path / "copy"
    shutil.copytree(runs["run1"], copy)
    cache = tmp_path / "cache"
    shutil.move(copy / "artifacts", cache)
    summary = json.loads((copy / "summary.json").read_text())
    summary["artifacts_dir"] = str(cache)
    (copy / "summary.json").write_text(json.dumps(summary))
    fields = ("leaf", "method", "metric", "model_bytes", "compress_seconds", "baseline")
    want = [[getattr(r, f) for f in fields] for r in compare([runs["run1"]]).rows]
    got = compare([copy]).rows
    assert [[getattr(r, f) for f in fields] for r in got] == want
    assert next(r for r in got if r.leaf == "ds_a").method == "ds_factorize"  # read from the cached manifests


def test_method_names_a_pass_variant_only_where_rows_differ(runs, tmp_path):
    assert {r.leaf: r.method for r in compare([runs["run1"]]).rows}["ds_a"] == "ds_factorize"  # both use mod
    copy = tmp_path / "copy"
    shutil.copytree(runs["run1"], copy)
    key = _summary(copy)["ds_a"]["key"]
    stage_json = copy / "artifacts" / key / "stage.json"
    info = json.loads(stage_json.read_text())
    info["params"]["method"] = "ksvd"
    stage_json.write_text(json.dumps(info))
    methods = {r.leaf: r.method for r in compare([copy]).rows}
    assert methods == {"ds_a": "ds_factorize:ksvd", "ds_b": "ds_factorize:mod", "ft": "uncompressed"}


def test_leaves_shared_by_several_runs_are_listed_once(runs, tmp_path):
    """Two recipes run with one cache share stages (same keys): each model is one row, not two."""
    copy = tmp_path / "tiny-copy"
    shutil.copytree(runs["run1"], copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["recipe"] = "tiny-copy"
    (copy / "summary.json").write_text(json.dumps(summary))
    alone = compare([runs["run1"]])
    both = compare([runs["run1"], copy])
    assert len(both.runs) == 2
    assert [(r.run, r.leaf) for r in both.rows] == [(r.run, r.leaf) for r in alone.rows]
    assert all(len(r.also_in) == 1 and r.also_in[0] != r.run for r in both.rows)
    assert any("listed once" in n for n in both.notes) and not any("listed once" in n for n in alone.notes)


def _row(leaf, metric, delta, run="r"):
    from dataclasses import MISSING, fields

    from stackcomp.report import Row

    required = {f.name: None for f in fields(Row) if f.default is MISSING and f.default_factory is MISSING}
    required.update(run=run, leaf=leaf, metric=metric, delta_points=delta, measured_by=[], path=[], passes=[],
                    compress_seconds=0.0, path_seconds=0.0)
    return Row(**required)


def test_seed_groups_pool_rows_that_differ_only_in_the_seed():
    from stackcomp.report import seed_groups

    rows = [_row("kd3[seed=42]", 0.8842, -1.95), _row("kd3[seed=1]", 0.8888, -1.49), _row("kd3[seed=2]", 0.8796, -2.41),
            _row("nokd3[seed=1]", 0.88, -2.37), _row("nokd3[seed=2]", None, None),  # no metric: left out
            _row("ds[seed=1].int8", 0.9, 0.0), _row("ds[seed=3].int8", 0.8, -10.0),  # a tag inside the name
            _row("kd3[seed=1]", 0.5, 0.0, run="other"),  # another run: its own (single-seed) group, dropped
            _row("plain", 0.9, 0.0)]
    groups = {g.name: g for g in seed_groups(rows)}
    assert set(groups) == {"kd3", "ds.int8"}  # nokd3 has one seed with a metric
    g = groups["kd3"]
    assert g.seeds == ["1", "2", "42"] and g.leaves == ["kd3[seed=1]", "kd3[seed=2]", "kd3[seed=42]"]
    vals = [0.8888, 0.8796, 0.8842]
    assert g.mean == pytest.approx(sum(vals) / 3)
    assert g.std == pytest.approx(float(torch.tensor(vals, dtype=torch.float64).std()))  # n - 1
    assert (g.min, g.max) == (0.8796, 0.8888)
    assert g.mean_delta_points == pytest.approx((-1.95 - 1.49 - 2.41) / 3)
    assert groups["ds.int8"].std == pytest.approx(0.1 / 2 ** 0.5)
    assert [g.name for g in seed_groups(rows)] == ["kd3", "ds.int8"]  # best mean first


def test_seed_table_in_every_output(runs):
    from rich.console import Console

    from stackcomp import render
    from stackcomp.report import seed_groups

    c = compare([runs["run1"]], load_sizes=False)
    assert c.seed_groups == [] and "Over seeds" not in render.markdown_comparison(c)
    c.seed_groups = seed_groups([_row("kd3[seed=1]", 0.88, -2.0), _row("kd3[seed=2]", 0.89, -1.0)])
    md = render.markdown_comparison(c)
    assert "## Over seeds" in md and "| kd3 | 1,2 | 88.50 | 0.71 |" in md
    assert "Over seeds" in render.html_comparison(c, {})
    console = Console(record=True, width=250)
    render.print_comparison(c, console, attribution=False)
    text = console.export_text()
    assert "over seeds" in text and "88.00 89.00" in text
    assert json.loads(json.dumps(c.to_json()))["seed_groups"][0]["seeds"] == ["1", "2"]
