"""End to end through the engine on tiny models and tiny real GLUE data: finetune, evaluate, export."""

import textwrap

import torch
from typer.testing import CliRunner

from stackcomp import load
from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.plan import build_plan
from stackcomp.recipe import load_recipe


def test_finetune_evaluate_export_via_cli(tmp_path, tiny_model_dirs, data_env):
    export_dir = tmp_path / "exported"
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(f"""
        name: tiny
        model: {tiny_model_dirs['bert']}
        task: glue/sst2
        data: {{max_length: 32}}
        stages:
          ft: {{pass: finetune, params: {{max_steps: 6, batch_size: 16, lr: 1.0e-3}}}}
          eval: {{pass: evaluate, after: ft, params: {{latency_batches: 2, latency_repeats: 1}}}}
          out: {{pass: export, after: ft, params: {{path: {export_dir}}}}}
    """))
    r = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    import json

    summary = json.loads(r.stdout[r.stdout.index("{"):])
    ev = next(s for s in summary["stages"] if s["stage"] == "eval")["metrics"]
    assert ev["main_metric"] == "accuracy" and 0.0 <= ev["accuracy"] <= 1.0
    assert ev["latency_ms_per_batch"] > 0 and ev["model_bytes"] > 0
    ft = next(s for s in summary["stages"] if s["stage"] == "ft")["metrics"]
    assert ft["train_steps"] == 6
    model = load(export_dir)
    assert (export_dir / "tokenizer.json").exists() or (export_dir / "vocab.txt").exists()
    x = torch.randint(0, 1000, (1, 9))
    assert model(input_ids=x).logits.shape == (1, 2)
    # second invocation: everything cached
    r2 = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "run"), "--json"])
    assert r2.exit_code == 0
    s2 = json.loads(r2.stdout[r2.stdout.index("{"):])
    assert s2["ran"] == []


def test_pair_task_and_regression_heads(tmp_path, tiny_model_dirs, data_env):
    rec = tmp_path / "rte.yaml"
    rec.write_text(textwrap.dedent(f"""
        name: tiny-rte
        model: {tiny_model_dirs['albert']}
        task: glue/rte
        data: {{max_length: 48}}
        stages:
          ft: {{pass: finetune, params: {{max_steps: 3, batch_size: 8}}}}
    """))
    plan = build_plan(load_recipe(rec))
    summary = Engine(plan, tmp_path / "run").run()
    ev = next(s for s in summary["stages"] if s["stage"] == "ft.eval")["metrics"]
    assert "accuracy" in ev


def test_only_runs_add_up_in_the_run_summary(tmp_path, tiny_model_dirs, data_env):
    """Two ``--only`` runs of one recipe: the second summary lists both branches (done ones from
    the cache, nothing recomputed), never the branch that was not run."""
    import json

    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(f"""
        name: tiny-only
        model: {tiny_model_dirs['bert']}
        task: glue/sst2
        data: {{max_length: 32}}
        x-ft: &ft {{max_steps: 2, batch_size: 8}}
        stages:
          ft: {{pass: finetune, params: *ft}}
          a: {{pass: finetune, after: ft, params: {{max_steps: 2, batch_size: 8, lr: 1.0e-4}}}}
          b: {{pass: finetune, after: ft, params: {{max_steps: 2, batch_size: 8, lr: 2.0e-4}}}}
          c: {{pass: finetune, after: ft, params: {{max_steps: 2, batch_size: 8, lr: 3.0e-4}}}}
    """))
    run = ["run", str(p), "-o", str(tmp_path / "run"), "--json", "--only"]
    r = CliRunner().invoke(app, [*run, "a"])
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout[r.stdout.index("{"):])
    assert {s["stage"] for s in first["stages"]} == {"ft", "a", "a.eval"}
    r = CliRunner().invoke(app, [*run, "b"])
    assert r.exit_code == 0, r.output
    second = json.loads(r.stdout[r.stdout.index("{"):])
    assert set(second["ran"]) == {"b", "b.eval"}  # ft and a came from the cache
    assert {s["stage"] for s in second["stages"]} == {"ft", "a", "a.eval", "b", "b.eval"}
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {s["stage"] for s in on_disk["stages"]} == {"ft", "a", "a.eval", "b", "b.eval"}
    assert on_disk["ran"] == second["ran"] and on_disk["seconds"] == second["seconds"]
    status = {s["stage"]: s["status"] for s in on_disk["stages"]}
    assert status["b"] == status["b.eval"] == "ran" and status["a"] == status["ft"] == "cached"
