"""ds_factorize's STF trained against a teacher (KD through stackcomp.distill.kd)."""

import torch

from stackcomp.artifacts import load_model, read_json
from stackcomp.distill import kd as kd_module
from stackcomp.engine import Engine
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict

FT = {"pass": "finetune", "params": {"max_steps": 3, "batch_size": 16, "lr": 1.0e-3}}
DS = {"block": 16, "atoms": 16, "nnz": 4, "iters": 1, "refresh_every": 1,
      "train": {"max_steps": 2, "batch_size": 16, "lr": 1.0e-3, "warmup_ratio": 0.0}}


def test_stf_distils_from_the_unfactorized_parent(tmp_path, tiny_model_dirs, data_env, monkeypatch):
    seen = []
    real = kd_module.KDLoss.teacher_outputs

    def spy(self, batch):
        seen.append(self.teacher)
        return real(self, batch)

    monkeypatch.setattr(kd_module.KDLoss, "teacher_outputs", spy)
    stages = {"ft": FT, "ds": {"pass": "ds_factorize", "after": "ft",
                               "params": {**DS, "teacher": "ft", "kd": {"soft": 1.0, "hard": 0.5, "cosine": 0.5}}}}
    plan = build_plan(recipe_from_dict({"name": "t", "model": str(tiny_model_dirs["bert"]), "task": "glue/sst2",
                                        "data": {"max_length": 32}, "stages": stages, "evaluate_leaves": False}))
    assert plan.stages["ds"].teacher_stage == "ft"
    engine = Engine(plan, tmp_path / "run")
    engine.run()
    assert len(seen) == 2 and seen[0] is seen[1]
    teacher = seen[0]
    # the teacher is the fine-tuned dense model, not the model being factorized in place
    assert not any(isinstance(m, DSLinear) for m in teacher.modules())
    ft = load_model(engine.store.path(plan.stages["ft"].key)).state_dict()
    assert all(torch.equal(v, ft[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    report = read_json(engine.store.path(plan.stages["ds"].key) / "report.json")
    assert report["kd"]["teacher_calls"] == 2 and report["kd"]["kd_soft"] > 0 and report["kd"]["kd_cosine"] > 0
    ds = load_model(engine.store.path(plan.stages["ds"].key))
    assert sum(isinstance(m, DSLinear) for m in ds.modules()) == 12


def test_without_teacher_nothing_changes(tmp_path):
    from stackcomp.passes.ds_factorize import DSFactorizePass

    p = DSFactorizePass({**DS})
    assert p.params.teacher is None and DSFactorizePass.teacher_param == "teacher"
