"""The task interface: names resolve to kinds, and a kind registered from outside runs through
the engine like a built-in one (its head, data, predictions, metric and data files are used)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import stackcomp
from stackcomp.data.glue import get_task as glue_spec
from stackcomp.data.loaders import TaskData
from stackcomp.errors import DataError
from stackcomp.tasks import (
    Task,
    default_predict,
    get_task,
    register_task_kind,
    task_kinds,
)
from stackcomp.tasks import base as tasks_base
from stackcomp.train.loop import _cat_padded


@pytest.mark.parametrize("name,canonical", [("sst2", "glue/sst2"), ("SST-2", "glue/sst2"), ("glue/sts-b", "glue/stsb"),
                                            ("glue:cola", "glue/cola"), ("nyu-mll/glue/rte", "glue/rte")])
def test_glue_names_resolve_to_the_glue_kind(name, canonical):
    task = get_task(name)
    assert task.kind == "glue" and task.name == canonical
    assert task.main_metric in task.metrics


def test_unknown_kind_and_dataset_are_clear_errors():
    with pytest.raises(DataError, match=r"unknown task kind 'nre'.*known kinds: .*glue"):
        get_task("nre/conll2003")
    with pytest.raises(DataError, match=r"glue/mrcp.*did you mean 'glue/mrpc'"):
        get_task("glue/mrcp")


def test_a_broken_plugin_kind_names_itself(monkeypatch):
    broken = SimpleNamespace(value="nowhere.module:factory", load=lambda: (_ for _ in ()).throw(ImportError("gone")))
    monkeypatch.setattr(tasks_base, "_entry_point_kinds", lambda: {"broken": broken})
    with pytest.raises(DataError, match=r"task kind 'broken' from plugin 'nowhere.module:factory' failed to load: "
                                        r"ImportError: gone"):
        get_task("broken/x")


def test_per_token_predictions_are_padded_across_batches():
    a, b = torch.ones(2, 3, 4), torch.ones(1, 5, 4)
    out = _cat_padded([a, b], 0)
    assert out.shape == (3, 5, 4) and out[:2, 3:].abs().sum() == 0
    labels = _cat_padded([torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], -100)
    assert (labels[:2, 3:] == -100).all() and (labels[2] == 0).all()


class _SignTask(Task):
    """A plugin's kind: SST-2 sentences, scored by how often the positive logit wins (its own
    metric name), with predictions made by its own ``predict``."""

    kind = "sign"
    auto_class = "AutoModelForSequenceClassification"
    name = "sign/sst2"
    metrics = ("sign_agreement",)
    main_metric = "sign_agreement"
    predict_calls = 0

    def model_kwargs(self):
        return {"num_labels": 2}

    def build_data(self, tokenizer, options):
        task = self

        class Data(TaskData):
            @staticmethod
            def predict(model, batch):
                _SignTask.predict_calls += 1
                out = default_predict(model, batch)
                out["predictions"] = (out["predictions"][:, 1] > out["predictions"][:, 0]).long()
                return out

            def compute_metrics(self, predictions, labels):
                return {"sign_agreement": float((predictions.long() == labels).float().mean())}

        assert task is self
        return Data(glue_spec("glue/sst2"), tokenizer, options)

    def data_files(self, splits, data_dir):
        from stackcomp.tasks.glue import glue_task

        return glue_task("sst2").data_files(splits, data_dir)


def test_a_registered_kind_runs_through_the_engine(tmp_path, tiny_model_dirs, tiny_glue, monkeypatch):
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(tiny_glue))
    register_task_kind("sign", lambda dataset: _SignTask())
    try:
        assert "sign" in task_kinds()
        recipe = {"name": "sign", "model": str(tiny_model_dirs["bert"]), "task": "sign/sst2",
                  "data": {"max_train_samples": 16, "max_eval_samples": 16, "max_length": 32},
                  "stages": {"ft": {"pass": "finetune", "params": {"train": {"max_steps": 2, "batch_size": 8}}},
                             "ev": {"pass": "evaluate", "after": "ft", "params": {"latency": False}}}}
        result = stackcomp.run(recipe, out=tmp_path / "run")
        assert result.ok, [f.error for f in result.failed]
        metrics = json.loads((result.artifact("ev") / "metrics.json").read_text())
        assert metrics["main_metric"] == "sign_agreement" and 0.0 <= metrics["sign_agreement"] <= 1.0
        assert _SignTask.predict_calls > 0
        lock = json.loads((Path(result.run_dir) / "lock.json").read_text())
        assert lock["data"]["task"] == "sign/sst2" and lock["data"]["files"]["train"]["sha256"]
    finally:
        tasks_base._KINDS.pop("sign", None)
