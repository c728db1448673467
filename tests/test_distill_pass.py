"""The distill pass through the engine on tiny models and tiny real SST-2."""

import pytest
import torch

from stackcomp.artifacts import load_model, read_json
from stackcomp.engine import Engine
from stackcomp.errors import PlanError
from stackcomp.executor import LocalExecutor
from stackcomp.passes.finetune import FinetunePass
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

FT = {"pass": "finetune", "params": {"max_steps": 3, "batch_size": 16, "lr": 1.0e-3}}
TRAIN = {"max_steps": 3, "batch_size": 16, "lr": 1.0e-3, "warmup_ratio": 0.0}


def _plan(model_dir, stages, **kw):
    return build_plan(recipe_from_dict({"name": "t", "model": str(model_dir), "task": "glue/sst2",
                                        "data": {"max_length": 32}, "stages": stages, **kw}))


def _artifact(engine, stage):
    return engine.store.path(engine.plan.stages[stage].key)


def _summary_metrics(summary, stage):
    return next(s for s in summary["stages"] if s["stage"] == stage)["metrics"]


def test_cut_student_with_kd_and_a_no_kd_branch(tmp_path, tiny_model_dirs, data_env):
    stages = {
        "ft": FT,
        "kd": {"pass": "distill", "after": "ft", "params": {"teacher": "ft", "cache_teacher_logits": True,
                                                             "weights": {"soft": 0.5, "hard": 0.5}, **TRAIN,
                                                             "max_steps": 8}},  # 6 batches an epoch
        "nokd": {"pass": "distill", "after": "ft", "params": {"teacher": "ft", "weights": {"soft": 0, "hard": 1},
                                                               **TRAIN}},
    }
    engine = Engine(_plan(tiny_model_dirs["bert"], stages), tmp_path / "run")
    summary = engine.run()
    assert engine.stage_runs.count("ft") == 1
    for stage in ("kd", "nokd"):
        report = read_json(_artifact(engine, stage) / "report.json")
        assert report["student"]["kind"] == "cut" and report["student"]["kept"] == [0]
        student = load_model(_artifact(engine, stage))
        assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
        assert _summary_metrics(summary, stage)["train_steps"] == (8 if stage == "kd" else 3)
        assert "accuracy" in _summary_metrics(summary, f"{stage}.eval")
    kd = read_json(_artifact(engine, "kd") / "report.json")["kd"]
    # the second epoch reshuffles the 96 examples into new batches: all found in the logit cache
    assert kd["teacher_calls"] == 6 and kd["cache_hits"] == 2 and kd["kd_soft"] > 0
    nokd = read_json(_artifact(engine, "nokd") / "report.json")["kd"]
    assert nokd["teacher_calls"] == 0 and "kd_soft" not in nokd


def test_teacher_from_an_upstream_stage_is_loaded_from_its_artifact(tmp_path, tiny_model_dirs, data_env,
                                                                    monkeypatch):
    finetunes, loads = [], []
    real_finetune = FinetunePass.finetune
    real_load = LocalExecutor.load_stage_model
    monkeypatch.setattr(FinetunePass, "finetune",
                        lambda self, m, ctx: finetunes.append(1) or real_finetune(self, m, ctx))
    monkeypatch.setattr(LocalExecutor, "load_stage_model",
                        lambda self, name: loads.append(name) or real_load(self, name))
    stages = {"ft": FT, "kd": {"pass": "distill", "after": "ft", "params": {"teacher": "ft", **TRAIN}}}
    first = Engine(_plan(tiny_model_dirs["bert"], stages, evaluate_leaves=False), tmp_path / "run")
    first.run()
    assert finetunes == [1]
    ft_model = load_model(_artifact(first, "ft"))

    seen = []
    from stackcomp.distill import kd as kd_module

    real_teacher_outputs = kd_module.KDLoss.teacher_outputs

    def spy(self, batch):
        seen.append(self.teacher)
        return real_teacher_outputs(self, batch)

    monkeypatch.setattr(kd_module.KDLoss, "teacher_outputs", spy)
    stages["kd"]["params"] = {**stages["kd"]["params"], "temperature": 4.0}  # a new distill stage, same ft
    finetunes.clear()
    loads.clear()
    second = Engine(_plan(tiny_model_dirs["bert"], stages, evaluate_leaves=False), tmp_path / "run")
    second.run()
    assert finetunes == [] and second.stage_runs == ["kd"]
    assert "ft" in loads  # from its artifact (the student's input; the teacher is copied from it)
    teacher = seen[0]
    ft_state = ft_model.state_dict()
    assert all(torch.equal(v, ft_state[k]) for k, v in teacher.state_dict().items())


def test_bert_teacher_to_fresh_albert_student_two_phase(tmp_path, tiny_model_dirs, data_env):
    albert = {"model_type": "albert", "num_hidden_layers": 2, "hidden_size": 24, "embedding_size": 8,
              "intermediate_size": 48, "num_attention_heads": 2}
    stages = {
        "ft": FT,
        "tiny": {"pass": "distill", "after": "ft", "params": {
            "teacher": "ft", "student": {"config": albert}, "schedule": "two_phase",
            "intermediate": {"max_steps": 2}, "weights": {"attention": 1, "hidden": 1, "pred": 1, "soft": 0,
                                                          "hard": 0}, **TRAIN}},
    }
    engine = Engine(_plan(tiny_model_dirs["bert"], stages, evaluate_leaves=False), tmp_path / "run")
    summary = engine.run()
    report = read_json(_artifact(engine, "tiny") / "report.json")
    assert report["intermediate"]["steps"] == 2 and report["intermediate"]["layer_map"] == [1, 2]
    assert report["intermediate"]["kd_attention"] > 0 and report["intermediate"]["kd_hidden"] > 0
    assert set(report["kd"]["weights"]) == {"pred"} and "kd_hidden" not in report["kd"]
    student = load_model(_artifact(engine, "tiny"))
    assert type(student).__name__ == "AlbertForSequenceClassification" and student.config.hidden_size == 24
    assert not any("_kd_projection" in k for k in student.state_dict())
    assert _summary_metrics(summary, "tiny")["intermediate_steps"] == 2
    assert "accuracy" in _summary_metrics(summary, "tiny")


def test_distilbert_student_from_a_folder_and_a_model_id_teacher(tmp_path, tiny_model_dirs, data_env):
    stages = {"kd": {"pass": "distill", "params": {
        "teacher": str(tiny_model_dirs["bert"]), "student": {"model": str(tiny_model_dirs["distilbert"])},
        "weights": {"soft": 1, "hard": 0.5, "cosine": 1}, **TRAIN}}}
    engine = Engine(_plan(tiny_model_dirs["bert"], stages, evaluate_leaves=False), tmp_path / "run")
    summary = engine.run()
    student = load_model(_artifact(engine, "kd"))
    assert type(student).__name__ == "DistilBertForSequenceClassification"
    report = read_json(_artifact(engine, "kd") / "report.json")
    assert report["kd"]["kd_cosine"] > 0 and report["kd"]["teacher_calls"] == 3
    assert "accuracy" in _summary_metrics(summary, "kd")


def test_distill_params_are_checked_at_plan_time(tiny_model_dirs):
    with pytest.raises(PlanError, match="needs a teacher"):
        _plan(tiny_model_dirs["bert"], {"ft": FT, "kd": {"pass": "distill", "after": "ft"}})
    with pytest.raises(PlanError, match="one of cut, config, model"):
        _plan(tiny_model_dirs["bert"], {"ft": FT, "kd": {"pass": "distill", "after": "ft", "params": {
            "teacher": "ft", "student": {"cut": {}, "model": "x"}}}})
    with pytest.raises(PlanError, match="two_phase needs an intermediate"):
        _plan(tiny_model_dirs["bert"], {"ft": FT, "kd": {"pass": "distill", "after": "ft", "params": {
            "teacher": "ft", "schedule": "two_phase"}}})
    with pytest.raises(PlanError, match="all zero"):
        _plan(tiny_model_dirs["bert"], {"ft": FT, "kd": {"pass": "distill", "after": "ft", "params": {
            "teacher": "ft", "weights": {"soft": 0, "hard": 0}}}})
    plan = _plan(tiny_model_dirs["bert"], {"ft": FT, "kd": {"pass": "distill", "after": "ft",
                                                            "params": {"teacher": "ft"}}})
    assert plan.stages["kd"].teacher_stage == "ft"


def test_narrow_cut_is_refused_at_run_time(tmp_path, tiny_model_dirs, data_env):
    stages = {"kd": {"pass": "distill", "params": {"teacher": str(tiny_model_dirs["bert"]),
                                                    "student": {"cut": {"hidden_size": 16}}, **TRAIN}}}
    summary = Engine(_plan(tiny_model_dirs["bert"], stages, evaluate_leaves=False), tmp_path / "run").run()
    failed = summary["failed"]  # the stage fails (recorded), the run does not raise
    assert [f["stage"] for f in failed] == ["kd"] and failed[0]["error"].startswith("ModelError: "), failed
    assert "keeps its teacher's width" in failed[0]["error"]


def test_minilm_distill_recipe_plans_with_matched_branches():
    from pathlib import Path

    from stackcomp.recipe import load_recipe

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    plan = build_plan(load_recipe(recipes / "minilm_sst2_distill.yaml"))
    ft_alone = build_plan(load_recipe(recipes / "minilm_sst2_finetune.yaml"))
    assert plan.stages["ft"].key == ft_alone.stages["ft"].key  # the teacher is the fine-tune recipe's, reusable
    kd, nokd, tiny = (plan.stages[n] for n in ("kd3", "nokd3", "tiny4"))
    assert kd.teacher_stage == nokd.teacher_stage == tiny.teacher_stage == "ft"
    assert kd.params.student == nokd.params.student and kd.params.student.cut.layers == [0, 2, 4]
    assert kd.params.train == nokd.params.train  # same steps, lr, batches, seed
    assert nokd.params.weights.active() == {"hard": 1.0} and kd.params.weights.soft > 0
    assert tiny.params.schedule == "two_phase" and tiny.params.student.config["hidden_size"] == 312
    assert {f"{n}.eval" for n in ("kd3", "nokd3", "tiny4")} <= set(plan.stages)


def test_a_teacher_that_is_not_the_parent_is_released_after_its_last_pupil(tmp_path, tiny_model_dirs, data_env):
    stages = {"ft": FT, "ft2": {**FT, "after": "ft"},
              "kd": {"pass": "distill", "after": "ft2", "params": {"teacher": "ft", **TRAIN, "max_steps": 1}}}
    engine = Engine(_plan(tiny_model_dirs["bert"], stages, evaluate_leaves=False), tmp_path / "run")
    engine.run()
    assert engine.stage_runs == ["ft", "ft2", "kd"]
    assert engine.executor.models == {}  # no model kept in memory once nothing downstream needs it


def test_augmented_distillation_trains_on_the_copies_too(tmp_path, tiny_model_dirs, data_env):
    params = {"teacher": "ft", "weights": {"soft": 0.5, "hard": 0.5}, "batch_size": 16, "lr": 1.0e-3,
              "warmup_ratio": 0.0, "epochs": 1, "cache_teacher_logits": True}
    stages = {"ft": FT,
              "kd": {"pass": "distill", "after": "ft", "params": params},
              "kd_aug": {"pass": "distill", "after": "ft", "params": {**params, "augment": {"copies": 2, "seed": 1}}}}
    engine = Engine(_plan(tiny_model_dirs["bert"], stages, evaluate_leaves=False), tmp_path / "run")
    summary = engine.run()
    plain, aug = (_summary_metrics(summary, s)["train_steps"] for s in ("kd", "kd_aug"))
    assert plain == 6 and 6 < aug <= 18  # 96 examples, 16 a batch; + up to two changed copies of each
    report = read_json(_artifact(engine, "kd_aug") / "report.json")["kd"]
    assert report["teacher_calls"] == aug and report["kd_hard"] > 0
