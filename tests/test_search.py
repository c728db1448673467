"""``stackcomp search``: a planted space whose best stack under a byte budget is known by
construction, orders the planner forbids rejected at sampling time, a pruned trial, resume after
SIGKILL, and the CLI's errors and dry run.

The planted passes truncate the tiny model's word-embedding table (its bytes are ~97 % of the
model, so bytes follow the kept fraction; ``evaluate`` measures them for real) and record a
``score`` that falls by a known rule, so the best stack under the budget is known:

- ``_test_shrink(keep)``: keeps ``keep`` of the rows; score x (1 - 0.5 (1 - keep)^2);
- ``_test_quant``: keeps half the rows; score x 0.8; ``_test_shrink`` may not follow it and it
  may not follow itself (both refused by the planner through ``forbid_after``).

Under a budget of 0.65 x the table plus the rest, ``shrink(keep=0.6)`` alone (score 0.92) beats
every other valid chain (anything with quant scores <= 0.8; keep 0.8 and 1.0 are over budget).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from pydantic import Field
from typer.testing import CliRunner

from stackcomp.cli import app
from stackcomp.passes.base import Pass, PassParams, register_pass

runner = CliRunner()
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
#: env: a file each planted pass appends "pid <tab> stage <tab> key" to, per call
LOG_ENV = "STACKCOMP_TEST_SEARCH_LOG"
#: env: the planted shrink pass hangs (until killed) at its N-th call in the process
HANG_ENV = "STACKCOMP_TEST_SEARCH_HANG_AT"
#: env: seconds each planted shrink/quant stage takes (so that trials side by side visibly overlap)
SLEEP_ENV = "STACKCOMP_TEST_SEARCH_SLEEP"
_calls = {"n": 0}


@pytest.fixture(autouse=True)
def _one_distribution_scan(monkeypatch):
    """Every trial's lock.json names the distribution of each pass; for these test passes (in no
    distribution) that scans all installed ones, ~1.5 s per trial: scan once."""
    import functools
    import importlib.metadata as md

    monkeypatch.setattr(md, "packages_distributions", functools.lru_cache(md.packages_distributions))


def _parent_score(ctx) -> float:
    for report in ctx.parent_reports.values():  # nearest ancestor first
        if isinstance(report.get("score"), (int, float)):
            return float(report["score"])
    return 1.0


def _keep_rows(model, keep: float) -> None:
    emb = model.get_input_embeddings()
    rows = max(1, math.ceil(emb.num_embeddings * keep))
    with torch.no_grad():
        model.resize_token_embeddings(rows)


def _record(ctx, score: float) -> None:
    time.sleep(float(os.environ.get(SLEEP_ENV, "0")))
    ctx.metrics.update({"main_metric": "score", "score": score})
    ctx.report["score"] = score
    if os.environ.get(LOG_ENV):
        key = ctx.work_dir.name.removeprefix(".tmp-").split("-")[0]
        with open(os.environ[LOG_ENV], "a") as f:
            f.write(f"{os.getpid()}\t{ctx.stage}\t{key}\n")


class ShrinkParams(PassParams):
    keep: float = Field(default=1.0, gt=0, le=1)


@register_pass
class _ShrinkPass(Pass):
    """Test pass: keeps a fraction of the embedding rows; the score falls as 1 - 0.5 (1 - keep)^2."""

    name = "_test_shrink"
    Params = ShrinkParams
    forbid_after = {"_test_quant": "shrink before quantizing"}  # noqa: RUF012 (the pass contract's form)

    def transform(self, model, ctx):
        _calls["n"] += 1
        if os.environ.get(HANG_ENV) and _calls["n"] >= int(os.environ[HANG_ENV]):
            with open(os.environ[LOG_ENV], "a") as f:
                f.write(f"{os.getpid()}\thang\t-\n")
            time.sleep(600)  # until the test kills the process
        _keep_rows(model, self.params.keep)
        _record(ctx, _parent_score(ctx) * (1 - 0.5 * (1 - self.params.keep) ** 2))
        return model


@register_pass
class _QuantPass(Pass):
    """Test pass: keeps half the embedding rows; the score falls by a fifth."""

    name = "_test_quant"
    forbid_after = {"_test_quant": "quantize once"}  # noqa: RUF012

    def transform(self, model, ctx):
        _keep_rows(model, 0.5)
        _record(ctx, _parent_score(ctx) * 0.8)
        return model


@register_pass
class _BasePass(Pass):
    """Test pass: the uncompressed prefix, score 1."""

    name = "_test_base"

    def transform(self, model, ctx):
        _record(ctx, 1.0)
        return model


def planted_space(model_dir: Path, budget: float, startup: int = 6) -> str:
    return textwrap.dedent(f"""\
        name: planted
        model: {model_dir}
        seed: 3
        stages:
          base: {{pass: _test_base}}
        search:
          after: base
          objectives: [metric, bytes]
          goal: {{max_bytes: {budget:.0f}}}
          evaluate: {{latency: false}}
          startup_trials: {startup}
          slots:
            - {{name: pre, optional: true, choices: {{_test_quant: {{}}}}}}
            - name: shrink
              optional: true
              choices: {{_test_shrink: {{params: {{keep: [0.2, 0.4, 0.6, 0.8, 1.0]}}}}}}
            - {{name: post, optional: true, choices: {{_test_quant: {{}}}}}}
        """)


def _budget(model_dir: Path) -> float:
    """0.65 x the embedding table + every other tensor, in bytes (fp32)."""
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(model_dir)
    table = m.get_input_embeddings().weight.numel() * 4
    total = sum(p.numel() * 4 for p in m.parameters())
    return total - table + 0.65 * table


def _search_json(folder: Path) -> dict:
    return json.loads((folder / "search.json").read_text())


def test_planted_search_finds_the_best_stack_and_rejects_forbidden_orders(tmp_path, tiny_model_dirs):
    from stackcomp.search import load_space, run_search
    from stackcomp.search.output import write_outputs

    model = tiny_model_dirs["bert"]
    space_file = tmp_path / "space.yaml"
    space_file.write_text(planted_space(model, _budget(model)))
    space = load_space(space_file)
    out = tmp_path / "search"
    run = run_search(space, out, trials=12)
    result = write_outputs(space, run.study, run.paths)
    data = _search_json(out)

    counted = [t for t in data["trials"] if t["outcome"] in ("complete", "pruned", "failed")]
    assert len(counted) == 12
    best = next(t for t in data["trials"] if t["number"] == data["best"])
    assert best["chain"] == ["shrink=_test_shrink"] and best["stages"][0]["params"] == {"keep": 0.6}
    assert best["objectives"]["metric"] == pytest.approx(0.92)
    assert best["meets_goal"] is True and data["verdict"].startswith("best stack meeting the goal: trial")
    # every completed trial's score is the constructed one
    for t in (t for t in data["trials"] if t["outcome"] == "complete"):
        want = 1.0
        for stage in t["stages"]:
            want *= 0.8 if stage["pass"] == "_test_quant" else 1 - 0.5 * (1 - stage["params"]["keep"]) ** 2
        assert t["objectives"]["metric"] == pytest.approx(want)

    # orders the planner forbids were sampled, rejected with its message and never run
    rejected = [t for t in data["trials"] if t["outcome"] == "rejected"]
    assert rejected, "the seeded sampler should have tried quant before shrink"
    for t in rejected:
        assert t["state"] == "PRUNED" and "cannot come after" in t["reason"]
        assert t["chain"][0] == "pre=_test_quant"
        assert not (out / "runs" / str(t["number"])).exists() and "recipe" not in t

    # outputs: runnable Pareto recipes, the leaderboard through compare, the trials' recipes
    assert result.pareto and sorted(p.name for p in (out / "pareto").iterdir()) == \
        sorted(f"trial-{n}.yaml" for n in result.pareto)
    assert data["best"] in result.pareto
    from stackcomp.plan import build_plan
    from stackcomp.recipe import load_recipe

    plan = build_plan(load_recipe(out / "pareto" / f"trial-{data['best']}.yaml"))
    assert [plan.stages[n].pass_name for n in plan.order] == ["_test_base", "_test_shrink", "evaluate"]
    assert (out / "leaderboard.md").read_text().count("planted-t") >= 2
    assert (out / "leaderboard.html").exists() and (out / "img" / "metric_vs_bytes.png").exists()
    # a shared prefix is computed once: one artifact for `base` whatever the number of trials
    base_key = plan.stages["base"].key
    runs = [json.loads((out / "runs" / str(t["number"]) / "summary.json").read_text()) for t in counted]
    assert sum("base" in s["ran"] for s in runs) == 1
    assert all(s["stages"][0]["key"] == base_key for s in runs)


def hopeless_space(model_dir: Path, name: str) -> str:
    """A space whose one trial fine-tunes the tiny model further under a floor (0.99) it cannot reach."""
    return textwrap.dedent(f"""\
        name: {name}
        model: {model_dir}
        task: glue/sst2
        data: {{max_length: 32}}
        stages:
          ft: {{pass: finetune, params: {{train: {{max_steps: 2, batch_size: 16, eval_every: 1}}}}}}
        search:
          after: ft
          pruning: {{min_metric: 0.99, warmup_evals: 1}}
          evaluate: {{latency: false}}
          slots:
            - name: tune
              choices:
                finetune: {{params: {{train: {{max_steps: 4, batch_size: 16, eval_every: 1,
                                               lr: [1.0e-3, 2.0e-3]}}}}}}
        """)


def test_a_hopeless_trial_is_pruned_and_leaves_nothing_in_the_cache(tmp_path, tiny_model_dirs, data_env):
    from stackcomp.plan import build_plan
    from stackcomp.recipe import load_recipe
    from stackcomp.search import load_space, run_search
    from stackcomp.search.output import write_outputs

    space_file = tmp_path / "space.yaml"
    space_file.write_text(hopeless_space(tiny_model_dirs["bert"], "prune"))
    space = load_space(space_file)
    out = tmp_path / "search"
    run = run_search(space, out, trials=1)
    data = write_outputs(space, run.study, run.paths).to_json()
    [trial] = data["trials"]
    assert trial["outcome"] == "pruned" and trial["state"] == "PRUNED"
    assert "below the floor 0.9900 (min_metric 0.99)" in trial["reason"] and "evaluation 1" in trial["reason"]
    assert _search_json(out)["trials"][0]["outcome"] == "pruned"
    plan = build_plan(load_recipe(out / "trials" / "0.yaml"))
    artifacts = out / "artifacts"
    # the prefix trained (below the floor too, but the prefix is never judged) and is cached ...
    assert (artifacts / plan.stages["ft"].key / "CHECKSUMS.json").exists()
    # ... the pruned stage committed nothing (no half-trained model for a later trial to take)
    assert not (artifacts / plan.stages["tune"].key).exists()
    assert not [p for p in artifacts.iterdir() if p.name.startswith(".tmp")]
    assert data["best"] is None and data["verdict"] == "no trial completed" and data["pareto"] == []


def test_a_stage_pruned_once_is_not_trained_again(tmp_path, tiny_model_dirs, data_env):
    """The same learning rate enqueued twice: the second trial is pruned from the record of the
    first, without training and without counting; the search goes on to the other rate."""
    from stackcomp.search import load_space, run_search
    from stackcomp.search.output import write_outputs

    space_file = tmp_path / "space.yaml"
    text = hopeless_space(tiny_model_dirs["bert"], "prune-memo").replace(
        "  slots:\n", "  enqueue: [{tune: {finetune: {train.lr: 1.0e-3}}}, {tune: {finetune: {train.lr: 1.0e-3}}}]\n"
                      "  slots:\n")
    assert "enqueue" in text
    space_file.write_text(text)
    space = load_space(space_file)
    out = tmp_path / "search"
    run = run_search(space, out, trials=2)
    trials = write_outputs(space, run.study, run.paths, leaderboard=False).to_json()["trials"]
    lrs = [t["params"]["tune.finetune.train.lr"] for t in trials]
    assert lrs[:2] == [1.0e-3, 1.0e-3] and lrs[-1] == 2.0e-3
    assert trials[0]["outcome"] == "pruned" and "below the floor" in trials[0]["reason"]
    assert trials[-1]["outcome"] == "pruned" and "not trained again" not in trials[-1]["reason"]
    for t in trials[1:-1]:  # the enqueued repeat, and any 1e-3 the sampler drew before 2e-3
        assert t["outcome"] == "repeated" and t["state"] == "PRUNED"
        assert t["reason"].startswith("stage 'tune' is the stage 'tune' pruned in trial 0 (not trained again, "
                                      "not counted): ") and trials[0]["reason"] in t["reason"]
        assert not (out / "runs" / str(t["number"])).exists()
    trained = [n for n in range(len(trials)) if (out / "runs" / str(n) / "logs" / "tune.log").exists()]
    assert trained == [0, len(trials) - 1]


def test_the_pruning_floor_follows_the_goal_and_waits_for_the_prefix():
    from types import SimpleNamespace

    from stackcomp.search.pruning import FloorPruner, PrunedByRule

    base = {"main_metric": "accuracy", "accuracy": 0.90}
    ready = {"now": False}
    p = FloorPruner(metric=None, min_metric=None, metric_drop=1.0, slack=2.0, warmup_evals=2,
                    baseline=lambda: base if ready["now"] else None)
    state = SimpleNamespace(step=10, metrics={"accuracy": 0.5})
    p.on_train_begin(state)
    p.on_evaluate(state)
    p.on_evaluate(state)  # the prefix is still training: never judged
    assert p.verdict is None
    ready["now"] = True
    p.on_train_begin(state)
    p.on_evaluate(state)  # first evaluation of the stage: warm-up
    assert p.floor() == (pytest.approx(0.87), "baseline 0.9000 - (1 + slack 2) points")
    state.metrics = {"accuracy": 0.871}
    p.on_evaluate(state)  # above the floor 0.87
    state.metrics = {"accuracy": 0.869}
    with pytest.raises(PrunedByRule, match=r"accuracy 0.8690 at step 10 \(evaluation 3\) is below the floor 0.8700"):
        p.on_evaluate(state)
    # an absolute floor above the goal's wins; no floor at all: never pruned
    assert FloorPruner(metric=None, min_metric=0.88, metric_drop=1.0, slack=2.0, warmup_evals=1,
                       baseline=lambda: base).floor()[0] == 0.88
    assert not FloorPruner(metric=None, min_metric=None, metric_drop=None, slack=2.0, warmup_evals=1,
                           baseline=lambda: base).active


def test_extra_training_callbacks_reach_train_on_task_only_inside_the_block():
    import unittest.mock
    from types import SimpleNamespace

    from stackcomp.train import TrainConfig, TrainResult, task

    seen = []

    def fake_train(model, loader, config, **kw):
        seen.append(list(kw["callbacks"]))
        return TrainResult(model=model)

    def ctx():
        data = SimpleNamespace(train_loader=lambda *a, **k: [], eval_loader=lambda *a, **k: [], compute_metrics=None)
        return SimpleNamespace(data=data, task=SimpleNamespace(main_metric="accuracy"), progress=None, log=None,
                               metrics={}, report={})

    own, extra, inner = object(), object(), object()
    with unittest.mock.patch.object(task, "train", fake_train):
        with task.extra_training_callbacks([extra]):
            task.train_on_task(None, ctx(), TrainConfig(), callbacks=[own])
            with task.extra_training_callbacks([inner]):
                task.train_on_task(None, ctx(), TrainConfig())
        task.train_on_task(None, ctx(), TrainConfig(), callbacks=[own])
    assert seen == [[own, extra], [extra, inner], [own]]


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    code = (f"import sys, functools, importlib.metadata as md; sys.path.insert(0, {str(TESTS)!r}); "
            "import test_search; md.packages_distributions = functools.lru_cache(md.packages_distributions); "
            f"from stackcomp.cli import main; sys.argv = ['stackcomp'] + {args!r}; main()")
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _log(path: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.split("\t")) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_killed_search_resumes_without_rerunning_finished_trials(tmp_path, tiny_model_dirs):
    import optuna

    model = tiny_model_dirs["bert"]
    space_file = tmp_path / "space.yaml"
    space_file.write_text(planted_space(model, _budget(model), startup=10))
    out, log_file = tmp_path / "search", tmp_path / "calls.log"
    env = {**os.environ, LOG_ENV: str(log_file), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    args = ["search", str(space_file), "--trials", "6", "-o", str(out)]

    first = _child(args, {**env, HANG_ENV: "2"})  # hangs in the second shrink stage it runs
    deadline = time.monotonic() + 120
    while not any(c[1] == "hang" for c in _log(log_file)):
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the search never reached the second shrink stage"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    storage = f"sqlite:///{out / 'study.db'}"
    before = optuna.load_study(study_name="stackcomp-search", storage=storage).get_trials()
    finished = {t.number: t for t in before if t.state != optuna.trial.TrialState.RUNNING}
    running = [t.number for t in before if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1 and any(t.user_attrs.get("outcome") == "complete" for t in finished.values())
    stamps = {n: (out / "runs" / str(n) / "summary.json").stat().st_mtime_ns for n, t in finished.items()
              if t.user_attrs.get("outcome") == "complete"}
    keys_before = {c[2] for c in _log(log_file) if c[1] != "hang"}

    second = _child(args, env)
    text, _ = second.communicate(timeout=300)
    assert second.returncode == 0, text

    after = {t.number: t for t in optuna.load_study(study_name="stackcomp-search", storage=storage).get_trials()}
    # finished trials are kept as they were, and their runs were not redone
    for n, t in finished.items():
        assert after[n].state == t.state and after[n].values == t.values and after[n].user_attrs == t.user_attrs
    for n, stamp in stamps.items():
        assert (out / "runs" / str(n) / "summary.json").stat().st_mtime_ns == stamp
    second_pid_calls = [c for c in _log(log_file) if c[0] == str(second.pid)]
    assert not {c[2] for c in second_pid_calls} & keys_before  # no finished stage ran again
    # the interrupted trial is marked so and retried with its params; the total is the one asked
    [killed] = running
    assert after[killed].state.name == "FAIL"
    [retry] = [t for t in after.values() if t.user_attrs.get("retry_of") == killed]
    assert retry.params == after[killed].params and retry.user_attrs["outcome"] == "complete"
    outcomes = [t.user_attrs.get("outcome") for t in after.values()]
    assert sum(o in ("complete", "pruned", "failed") for o in outcomes) == 6
    shown = {t["number"]: t for t in _search_json(out)["trials"]}
    assert shown[killed]["outcome"] == "interrupted"
    assert shown[killed]["reason"].endswith(f"retried as trial {retry.number}")


@pytest.mark.parametrize("section,needle", [
    ("search: {after: base, slots: [{name: s, choises: {_test_quant: {}}}]}",
     "search.slots.0.choises: unknown field (did you mean 'choices'?)"),
    ("search: {after: nope, slots: [{name: s, choices: {_test_quant: {}}}]}", "search.after: no stage 'nope'"),
    ("search: {after: base, slots: [{name: s, choices: {_test_shrink: {params: {kepe: [0.5]}}}}]}",
     "has no such param (did you mean 'keep'?)"),
    ("search: {after: base, objectives: [accuracy], slots: [{name: s, choices: {_test_quant: {}}}]}",
     "unknown objective 'accuracy'"),
    ("search: {after: base, slots: [{name: s, choices: {_test_shrink: {params: {keep: {low: 2, high: 1}}}}}]}",
     "a range needs numbers low <= high"),
    ("", "needs a `search:` section"),
    ("search: {after: base, enqueue: [{shrnk: _test_shrink}], slots: [{name: shrink, choices: {_test_shrink: {}}}]}",
     "search.enqueue[0]: no slot 'shrnk' (slots: shrink)"),
    (("search: {after: base, enqueue: [{shrink: {_test_shrink: {keep: 0.5}}}], "
      "slots: [{name: shrink, choices: {_test_shrink: {params: {keep: [0.2, 0.6]}}}}]}"),
     "shrink.keep = 0.5: not one of the space's choices [0.2, 0.6]"),
    (("search: {after: base, enqueue: [{shrink: {_test_shrink: {kep: 0.6}}}], "
      "slots: [{name: shrink, choices: {_test_shrink: {params: {keep: [0.2, 0.6]}}}}]}"),
     "'kep' is not a param of this choice in the space (did you mean 'keep'?)"),
    (("search: {after: base, enqueue: [{shrink: {_test_shrink: {keep: 0.6}}}], "
      "slots: [{name: shrink, choices: {_test_shrink: {params: {keep: 0.2}}}}]}"),
     "shrink._test_shrink.keep is fixed at 0.2 in the space; 0.6 cannot be tried"),
    (("search: {after: base, enqueue: [{pre: _test_quant}], slots: [{name: pre, choices: {_test_quant: {}}}, "
      "{name: shrink, choices: {_test_shrink: {params: {keep: {low: 0.1, high: 0.9}}}}}]}"),
     "search.enqueue[0]: slot 'shrink' is required; name one of _test_shrink"),
    (("search: {after: base, enqueue: [{shrink: {_test_shrink: {keep: 1.5}}}], "
      "slots: [{name: shrink, choices: {_test_shrink: {params: {keep: {low: 0.1, high: 0.9}}}}}]}"),
     "shrink._test_shrink.keep = 1.5: expected a number in [0.1, 0.9]"),
])
def test_bad_space_file_exits_2_with_one_line(tmp_path, tiny_model_dirs, section, needle):
    space = tmp_path / "space.yaml"
    space.write_text(f"name: bad\nmodel: {tiny_model_dirs['bert']}\nstages:\n  base: {{pass: _test_base}}\n{section}\n")
    r = runner.invoke(app, ["search", str(space), "--trials", "1", "-o", str(tmp_path / "s")])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "s").exists()


def test_enqueued_stacks_run_first_once_and_the_sampler_fills_what_they_leave_open(tmp_path, tiny_model_dirs):
    """``search.enqueue``: hand-written stacks are the first trials, a resumed search does not
    queue them again, and a param an entry leaves open is sampled from the space."""
    from stackcomp.search import load_space, run_search

    model = tiny_model_dirs["bert"]
    text = planted_space(model, _budget(model)).replace(
        "  slots:\n",
        "  enqueue:\n"
        "    - {shrink: {_test_shrink: {keep: 0.8}}, post: _test_quant}\n"
        "    - {shrink: _test_shrink}\n"
        "    - {shrink: {_test_shrink: {keep: 0.8}}, post: _test_quant}\n"
        "  slots:\n")
    assert "enqueue:" in text
    space_file = tmp_path / "space.yaml"
    space_file.write_text(text)
    out = tmp_path / "search"
    from stackcomp.search.output import write_outputs

    run_search(load_space(space_file), out, trials=3)
    space = load_space(space_file)
    run = run_search(space, out, trials=4)  # resume: one more trial, nothing queued again
    write_outputs(space, run.study, run.paths)
    trials = {t["number"]: t for t in _search_json(out)["trials"]}
    assert sum(t["outcome"] in ("complete", "pruned", "failed") for t in trials.values()) == 4
    assert trials[0]["chain"] == ["shrink=_test_shrink", "post=_test_quant"] and trials[0]["enqueued"] == 0
    assert trials[0]["stages"][0]["params"] == {"keep": 0.8}
    assert trials[0]["objectives"]["metric"] == pytest.approx((1 - 0.5 * 0.2 ** 2) * 0.8)
    assert trials[1]["chain"] == ["shrink=_test_shrink"] and trials[1]["enqueued"] == 1
    assert trials[1]["stages"][0]["params"]["keep"] in (0.2, 0.4, 0.6, 0.8, 1.0)  # left open: sampled
    # the third entry repeats the first: its result, nothing run, not counted
    assert trials[2]["outcome"] == "repeated" and trials[2]["enqueued"] == 2 and trials[2]["state"] == "COMPLETE"
    assert trials[2]["objectives"] == trials[0]["objectives"] and trials[2]["values"] == trials[0]["values"]
    assert trials[2]["reason"].startswith("the same stack as trial 0") and not (out / "runs" / "2").exists()
    assert [t["enqueued"] for n, t in trials.items() if n >= 3] == [None] * (len(trials) - 3)
    # did the search beat the enqueued stacks? each listed trial dominates on (metric, bytes)
    data = _search_json(out)
    assert set(data["beaten_by"]) == {"0", "1"} and 2 not in data["pareto"]
    for e, by in data["beaten_by"].items():
        mine = trials[int(e)]["objectives"]
        for n in by:
            o = trials[n]["objectives"]
            assert trials[n]["enqueued"] is None and o["metric"] >= mine["metric"] and o["bytes"] <= mine["bytes"]
            assert (o["metric"], o["bytes"]) != (mine["metric"], mine["bytes"])


def test_an_enqueued_value_of_a_list_of_mappings_is_its_index(tmp_path, tiny_model_dirs):
    from stackcomp.search import space_from_dict
    from stackcomp.search.space import SearchSpaceError, enqueued_params

    space = space_from_dict({
        "name": "lists", "model": str(tiny_model_dirs["bert"]), "stages": {"base": {"pass": "_test_base"}},
        "search": {"after": "base", "slots": [{"name": "kd", "optional": True, "choices": {"distill": {"params": {
            "teacher": "base", "student": [{"cut": {"num_layers": 1}}, {"cut": {"num_layers": 2}}],
            "temperature": {"low": 1.0, "high": 4.0}}}}}]}})
    entry = {"kd": {"distill": {"student": {"cut": {"num_layers": 2}}, "temperature": 2}}}
    assert enqueued_params(space, entry, "e") == {"kd": "distill", "kd.distill.student": 1,
                                                  "kd.distill.temperature": 2}
    assert enqueued_params(space, {}, "e") == {"kd": "skip"}
    with pytest.raises(SearchSpaceError, match=r"kd.distill.student = \{'cut': \{'num_layers': 3\}\}: not one of"):
        enqueued_params(space, {"kd": {"distill": {"student": {"cut": {"num_layers": 3}}}}}, "e")
    with pytest.raises(SearchSpaceError, match="kd.distill.teacher is fixed at 'base'"):
        enqueued_params(space, {"kd": {"distill": {"teacher": "other"}}}, "e")


def test_with_no_trial_meeting_the_goal_pareto_holds_the_front_of_all(tmp_path, tiny_model_dirs):
    from stackcomp.search import load_space, run_search
    from stackcomp.search.output import write_outputs

    space_file = tmp_path / "space.yaml"
    space_file.write_text(planted_space(tiny_model_dirs["bert"], 1.0, startup=3))  # 1 byte: nothing meets it
    space = load_space(space_file)
    out = tmp_path / "search"
    run = run_search(space, out, trials=4)
    data = write_outputs(space, run.study, run.paths, leaderboard=False).to_json()
    done = [t for t in data["trials"] if t["outcome"] == "complete"]
    assert done and data["best"] is None and data["pareto_meets_goal"] is False
    assert data["verdict"].startswith("no trial meets the goal") and "pareto/ holds" in data["verdict"]
    for t in done:  # on the front exactly when no other completed trial dominates it
        o = t["objectives"]
        dominated = any(u["objectives"]["metric"] >= o["metric"] and u["objectives"]["bytes"] <= o["bytes"]
                        and (u["objectives"]["metric"], u["objectives"]["bytes"]) != (o["metric"], o["bytes"])
                        for u in done)
        first_of_equals = not any(u["values"] == t["values"] and u["number"] < t["number"] for u in done)
        assert (t["number"] in data["pareto"]) == (not dominated and first_of_equals)
    assert sorted(p.name for p in (out / "pareto").iterdir()) == sorted(f"trial-{n}.yaml" for n in data["pareto"])


def test_dominance_against_enqueued_stacks():
    import optuna

    from stackcomp.search.output import beaten_by, dominates

    up, down = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
    assert dominates([0.9, 5.0], [0.9, 6.0], [up, down]) and not dominates([0.9, 6.0], [0.9, 6.0], [up, down])
    assert not dominates([0.95, 7.0], [0.9, 6.0], [up, down])  # better metric, more bytes: a trade, not a win

    def trial(values, enqueued=None):
        return optuna.trial.create_trial(values=values, user_attrs={"enqueued": enqueued})

    study = optuna.create_study(directions=["maximize", "minimize"])
    for t in (trial([0.88, 8.0], 0), trial([0.90, 6.0], 1), trial([0.89, 7.0]), trial([0.91, 9.0]),
              trial([0.88, 8.0])):
        study.add_trial(t)
    assert beaten_by(study.trials, study.directions) == {0: [2], 1: []}


def test_dominance_on_each_pair_of_three_objectives():
    """A searched stack more accurate and smaller than a hand-written one but slower beats it on
    metric+bytes only; with two objectives there are no pairs to report."""
    import optuna

    from stackcomp.search.output import SearchOutcome, beaten_by, beaten_on_pairs

    def trial(values, enqueued=None):
        return optuna.trial.create_trial(values=values, user_attrs={"enqueued": enqueued})

    names = ["metric", "bytes", "latency"]
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for t in (trial([0.88, 12.0, 46.0], 0), trial([0.87, 11.0, 130.0], 1),
              trial([0.89, 9.0, 92.0]), trial([0.86, 20.0, 40.0])):
        study.add_trial(t)
    assert beaten_by(study.trials, study.directions) == {0: [], 1: [2]}
    on = beaten_on_pairs(study.trials, study.directions, names)
    assert on == {"metric+bytes": {0: [2], 1: [2]}, "metric+latency": {0: [], 1: [2]},
                  "bytes+latency": {0: [], 1: [2]}}
    assert beaten_on_pairs(study.trials, study.directions[:2], names[:2]) == {}
    records = [{"number": t.number, "chain": ["q=int8"]} for t in study.trials]
    lines = SearchOutcome(records, [], None, beaten_by={0: [], 1: [2]}, beaten_on=on).versus_enqueued()
    assert lines[0] == "enqueued trial 0 (int8): no searched trial dominates it; on two objectives: metric+bytes: 2"
    assert lines[1] == "enqueued trial 1 (int8): dominated by searched trial(s) 2"


def test_an_interrupted_enqueued_trial_is_retried_as_the_same_entry():
    import optuna

    from stackcomp.search.study import recover_interrupted

    study = optuna.create_study(directions=["maximize"])
    study.enqueue_trial({"shrink": "_test_shrink"}, user_attrs={"enqueued": 1})
    t = study.ask()
    t.suggest_categorical("shrink", ["_test_shrink", "skip"])  # left RUNNING, as by a kill
    assert recover_interrupted(study) == [t.number]
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [w.user_attrs for w in waiting] == [{"retry_of": t.number, "enqueued": 1}]
    assert study.ask().params == {} and study.trials[-1].system_attrs["fixed_params"] == {"shrink": "_test_shrink"}


def test_timeouts_are_durations():
    from stackcomp.search import SearchError, parse_duration

    assert [parse_duration(t) for t in ("2h", "90m", "1h30m", "45s", "120", None)] == [7200, 5400, 5400, 45, 120, None]
    with pytest.raises(SearchError, match="write e.g. 2h"):
        parse_duration("2 hours")


def test_an_unknown_executor_is_one_line(tmp_path, tiny_model_dirs):
    space = tmp_path / "space.yaml"
    space.write_text(planted_space(tiny_model_dirs["bert"], 1e6))
    r = runner.invoke(app, ["search", str(space), "--executor", "slurm", "-o", str(tmp_path / "s")])
    assert r.exit_code == 2 and "expected local or ray" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["search", str(space), "--address", "auto", "-o", str(tmp_path / "s")])
    assert r.exit_code == 2 and "--executor ray" in r.output


def test_the_example_space_samples_valid_chains_without_running(tmp_path, monkeypatch):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "glue" / "SST-2").exists():
        pytest.skip("shared GLUE data not found")
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(SHARED_DATA))
    monkeypatch.chdir(tmp_path)
    example = REPO / "recipes" / "search_minilm_sst2.yaml"
    r = runner.invoke(app, ["search", str(example), "--trials", "0"])
    assert r.exit_code == 0, r.output
    assert "4 slots, objectives metric, bytes, latency" in " ".join(r.output.split())
    r = runner.invoke(app, ["search", str(example), "--dry-run", "--trials", "6"])
    assert r.exit_code == 0, r.output
    assert "6 of 6 sampled chains valid" in " ".join(r.output.split())
    assert not (tmp_path / "runs").exists()  # nothing written, nothing run


def test_validate_of_a_space_file_says_to_search_it():
    space = Path(__file__).resolve().parents[1] / "recipes" / "search_minilm_sst2.yaml"
    r = runner.invoke(app, ["validate", str(space)])
    assert r.exit_code == 2 and "a search space" in r.output and "stackcomp search" in r.output


@pytest.fixture
def in_process_ray(monkeypatch, data_env):
    """A Ray started in this process for one test (its workers inherit this environment: the
    tests folder on PYTHONPATH so they import these planted passes, the tiny GLUE data)."""
    ray = pytest.importorskip("ray", reason="the Ray executor needs ray: pip install 'stackcomp[cluster]'")
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield ray
    ray.shutdown()


def test_trials_run_side_by_side_on_ray(tmp_path, tiny_model_dirs, in_process_ray, monkeypatch):
    """--executor ray: the prefix first, alone; then two trials at a time, each trial's stages in
    Ray workers; the outcomes are the constructed ones and the best is the best of what ran."""
    from stackcomp.search import load_space, run_search
    from stackcomp.search.output import write_outputs

    model = tiny_model_dirs["bert"]
    space_file = tmp_path / "space.yaml"
    space_file.write_text(planted_space(model, _budget(model)))
    space = load_space(space_file)
    out = tmp_path / "search"
    monkeypatch.setenv(SLEEP_ENV, "2")  # before Ray starts: its workers copy the environment
    ray = in_process_ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # two warm workers first: on a loaded machine a second cold worker can take longer to start
    # than a planted stage takes, and Ray would give every stage to the one warm worker
    warm = ray.remote(num_cpus=1)(lambda: __import__("stackcomp.executor") and __import__("time").sleep(1))
    ray.get([warm.remote(), warm.remote()])
    run = run_search(space, out, trials=6, executor={"kind": "ray"}, parallel=2)
    data = write_outputs(space, run.study, run.paths).to_json()
    complete = [t for t in data["trials"] if t["outcome"] == "complete"]
    assert len([t for t in data["trials"] if t["outcome"] in ("complete", "pruned", "failed")]) == 6
    for t in complete:  # the scores the planted passes construct, computed in the workers
        want = 1.0
        for stage in t["stages"]:
            want *= 0.8 if stage["pass"] == "_test_quant" else 1 - 0.5 * (1 - stage["params"]["keep"]) ** 2
        assert t["objectives"]["metric"] == pytest.approx(want)
    meeting = [t for t in complete if t["meets_goal"]]
    if meeting:
        assert data["best"] == max(meeting, key=lambda t: t["objectives"]["metric"])["number"]
    summaries = {t["number"]: json.loads((out / "runs" / str(t["number"]) / "summary.json").read_text())
                 for t in complete}
    ran = [s for summary in summaries.values() for s in summary["stages"] if s["status"] == "ran"]
    assert ran and all(s["node"] for s in ran)  # in Ray workers
    assert sum("base" in s["ran"] for s in summaries.values()) == 1  # the prefix trained once
    spans = sorted((min(s["started_at"] for s in st), max(s["ended_at"] for s in st))
                   for st in ([s for s in summary["stages"] if s["status"] == "ran" and s["stage"] != "base"]
                              for summary in summaries.values()) if st)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # two trials ran at the same time


def test_a_trial_pruned_in_a_ray_worker_is_pruned(tmp_path, tiny_model_dirs, in_process_ray):
    """The pruner travels with the plan to the worker that trains; its verdict comes back."""
    from stackcomp.search import load_space, run_search
    from stackcomp.search.output import write_outputs

    space_file = tmp_path / "space.yaml"
    space_file.write_text(hopeless_space(tiny_model_dirs["bert"], "prune-ray"))
    space = load_space(space_file)
    run = run_search(space, tmp_path / "search", trials=1, executor={"kind": "ray"})
    [trial] = write_outputs(space, run.study, run.paths).to_json()["trials"]
    assert trial["outcome"] == "pruned" and trial["state"] == "PRUNED"
    assert "below the floor 0.9900 (min_metric 0.99)" in trial["reason"]
    summary = json.loads((tmp_path / "search" / "runs" / "0" / "summary.json").read_text())
    assert summary["failed"][0]["node"]  # it was stopped in a Ray worker
