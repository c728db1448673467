"""The shared training loop: learning, schedule, accumulation, best checkpoint, guards, multi-process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import stackcomp.train.loop as train_mod
from stackcomp.errors import DataError, ModelError, NumericalError, StackcompError
from stackcomp.train import (
    TrainCallback,
    TrainConfig,
    default_param_groups,
    evaluate,
    train,
)

sys.path.insert(0, str(Path(__file__).parent))
from _accelerate_script import accuracy, make_data, tiny_bert  # noqa: E402

SCRIPT = Path(__file__).parent / "_accelerate_script.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def loader(n=64, batch_size=16, seed=1, shuffle=False):
    gen = torch.Generator().manual_seed(0) if shuffle else None
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=shuffle, generator=gen)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def cfg(**kw):
    base = dict(lr=1e-3, warmup_ratio=0.0, log_every=1000, seed=0)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- learning


def test_loss_decreases_and_learns_above_chance():
    model = tiny_bert()
    eval_loader = loader(200, 50, seed=2)
    before = evaluate(model, eval_loader, accuracy)
    result = train(model, loader(256, 16, shuffle=True), cfg(epochs=2, lr=3e-3, log_every=8),
                   eval_loader=eval_loader, compute_metrics=accuracy)  # best by eval_loss
    after = evaluate(result.model, eval_loader, accuracy)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert result.steps == 32
    assert losses[-1] < 0.5 * losses[0]
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert before["accuracy"] < 0.7 and after["accuracy"] >= 0.95  # chance is 0.5
    assert result.best_metrics == pytest.approx(after)


def test_evaluate_matches_direct_computation():
    """Uneven last batch: eval_loss is the full-set mean cross-entropy, metrics see every example once."""
    model = tiny_bert()
    data = make_data(70, 3)
    got = evaluate(model, DataLoader(data, batch_size=32), accuracy)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert got["n"] == 70
    assert got["eval_loss"] == pytest.approx(F.cross_entropy(logits, batch["labels"]).item(), rel=1e-5)
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == batch["labels"]).float().mean().item())
    assert model.training  # mode restored (models are built in train mode)


# ----------------------------------------------------------------------------- schedule and steps


def test_warmup_then_linear_decay_values():
    total, warmup, lr = 20, 2, 1e-3  # ceil(0.1 * 20) = 2
    result = train(tiny_bert(), loader(64, 8), cfg(max_steps=total, lr=lr, warmup_ratio=0.1, log_every=1))
    lrs = [h["lr"] for h in result.history if "lr" in h]
    # the lr in effect for update k (0-based): k/warmup during warmup, then linear to 0 at `total`
    expected = [lr * k / warmup if k < warmup else lr * (total - k) / (total - warmup) for k in range(total)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_max_steps_respected_across_epochs_with_accumulation():
    calls = []

    def loss_fn(model, batch):
        calls.append(batch["input_ids"].shape[0])
        return model(**batch).loss

    # 5 batches per epoch, accumulation 2: updates of 2, 2 and 1 (the epoch end forces a step)
    result = train(tiny_bert(), loader(80, 16), cfg(max_steps=7, grad_accum=2), loss_fn=loss_fn)
    assert result.steps == 7
    assert len(calls) == 2 + 2 + 1 + 2 + 2 + 1 + 2


def test_fractional_epochs():
    result = train(tiny_bert(), loader(64, 16), cfg(epochs=1.5))  # 4 batches per epoch
    assert result.steps == math.ceil(1.5 * 4)


def test_grad_accumulation_equals_large_batch():
    """2 x batch 8 with accumulation gives the update of 1 x batch 16 (dropout off, same order)."""
    config = dict(max_steps=2, lr=1e-3, max_grad_norm=0.5)
    big = train(tiny_bert(), loader(32, 16), cfg(**config)).model
    acc = train(tiny_bert(), loader(32, 8), cfg(grad_accum=2, **config)).model
    small = train(tiny_bert(), loader(32, 8), cfg(max_steps=4, lr=1e-3, max_grad_norm=0.5)).model
    start = params_of(tiny_bert())
    pb, pa, ps = params_of(big), params_of(acc), params_of(small)
    for name in pb:
        assert not torch.equal(pb[name], start[name]), name
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-6, msg=name)
    # what accumulation would give if it stepped on every micro-batch: clearly different
    assert max((ps[n] - pb[n]).abs().max().item() for n in pb) > 1e-4


def test_seed_determinism():
    def run(seed):
        model = tiny_bert()
        model.config.hidden_dropout_prob = 0.1
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
        return params_of(train(model, loader(64, 16, shuffle=True), cfg(max_steps=6, seed=seed)).model)

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


# ----------------------------------------------------------------------------- best checkpoint


class Snapshots(TrainCallback):
    """Keeps the parameters after every optimizer step, by step."""

    def __init__(self, into: dict):
        self.into = into

    def on_step_end(self, state):
        self.into[state.step] = params_of(state.model)


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_restores_best_eval(keep_best):
    scores = iter([0.5, 0.9, 0.6])
    snapshots = {}

    def metrics(logits, labels):
        return {"score": next(scores)}

    result = train(tiny_bert(), loader(64, 8), cfg(max_steps=6, eval_every=2, keep_best=keep_best),
                   eval_loader=loader(32, 16, seed=2), compute_metrics=metrics, main_metric="score",
                   callbacks=[Snapshots(snapshots)])
    assert [h["step"] for h in result.history if "score" in h] == [2, 4, 6]
    want = snapshots[4] if keep_best else snapshots[6]
    final = params_of(result.model)
    assert all(torch.equal(final[n], want[n]) for n in final)
    assert result.best_metrics["score"] == (0.9 if keep_best else 0.6)


def test_lower_is_better_for_loss_by_default():
    losses = iter([3.0, 1.0, 2.0])
    snapshots = {}
    result = train(tiny_bert(), loader(64, 8), cfg(max_steps=6, eval_every=2),
                   eval_loader=loader(32, 16, seed=2), compute_metrics=lambda lg, lb: {"my_loss": next(losses)},
                   main_metric="my_loss", callbacks=[Snapshots(snapshots)])
    final = params_of(result.model)
    assert all(torch.equal(final[n], snapshots[4][n]) for n in final)


def test_unknown_main_metric_is_an_error():
    with pytest.raises(StackcompError, match="'f1'.*accuracy"):
        train(tiny_bert(), loader(32, 16), cfg(max_steps=1), eval_loader=loader(32, 16, seed=2),
              compute_metrics=accuracy, main_metric="f1")


# ----------------------------------------------------------------------------- numerical guard


def test_nan_loss_stops_with_the_step_and_keeps_weights():
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(**batch).loss
        return loss * float("nan") if len(calls) == 3 else loss

    model = tiny_bert()
    with pytest.raises(NumericalError, match="step 3: the loss"):
        train(model, loader(64, 8), cfg(max_steps=6), loss_fn=loss_fn)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradient_names_the_parameter():
    target = "bert.encoder.layer.1.output.dense.weight"

    def loss_fn(model, batch):
        w = dict(model.named_parameters())[target]
        return model(**batch).loss + (w[0, 0] * 0).sqrt()  # d sqrt(x)/dx at 0 is inf; inf * 0 = NaN

    with pytest.raises(NumericalError, match=f"step 1: NaN/Inf gradient in parameter '{target}'"):
        train(tiny_bert(), loader(32, 16), cfg(max_steps=2), loss_fn=loss_fn)


def test_deferred_guard_reports_the_first_bad_step(monkeypatch):
    """On asynchronous devices checks wait for logging points; the step named is still the first bad one."""
    monkeypatch.setattr(train_mod._Guard, "eager_devices", ())
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(**batch).loss
        return loss * float("nan") if len(calls) >= 3 else loss

    with pytest.raises(NumericalError, match="step 3: the loss"):
        train(tiny_bert(), loader(64, 8), cfg(max_steps=8, log_every=5), loss_fn=loss_fn)
    assert len(calls) == 5  # found at the step-5 log point


# ----------------------------------------------------------------------------- loss and param groups


def test_custom_loss_and_default_weight_decay_groups():
    """Zero loss: AdamW's update is pure decay, p <- p (1 - lr wd), except biases and LayerNorm weights."""
    lr, wd = 0.1, 0.5
    model = tiny_bert()
    before = params_of(model)
    result = train(model, loader(32, 16), cfg(max_steps=1, lr=lr, weight_decay=wd, max_grad_norm=None),
                   loss_fn=lambda m, b: (m(**b).logits * 0).sum())
    after = params_of(result.model)
    for name, p in before.items():
        no_decay = name.endswith("bias") or "LayerNorm" in name
        torch.testing.assert_close(after[name], p if no_decay else p * (1 - lr * wd), msg=name)


def test_default_groups_partition_trainable_params():
    model = tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    decay, no_decay = default_param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm.weight" in n}
    assert "bert.embeddings.word_embeddings.weight" not in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.parameters())


def test_custom_param_groups_are_used():
    model = tiny_bert()
    frozen = [p for n, p in model.named_parameters() if n.startswith("bert.embeddings")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("bert.embeddings")]
    before = params_of(model)
    groups = [{"params": frozen, "lr": 0.0}, {"params": rest, "lr": 0.1, "weight_decay": 0.5}]
    train(model, loader(32, 16), cfg(max_steps=1, lr=1e-3, max_grad_norm=None), optimizer_params=groups,
          loss_fn=lambda m, b: (m(**b).logits * 0).sum())
    after = params_of(model)
    for name, p in before.items():
        want = p if name.startswith("bert.embeddings") else p * (1 - 0.1 * 0.5)
        torch.testing.assert_close(after[name], want, msg=name)


def test_no_trainable_parameters_is_a_model_error():
    model = tiny_bert().requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters"):
        train(model, loader(32, 16), cfg(max_steps=1))


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="epoch"):
        TrainConfig(epoch=3)


# ----------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_matches_single(tmp_path):
    """Same script, 1 process vs 2 (DDP on gloo): same steps, every eval example counted once, same results.

    Each process gets half the global batch, so both runs see the same examples in the same
    updates and differ only in floating-point reduction order: eval losses agree to ~1e-4
    relative here; 2% relative and 2 of 200 examples are the tolerances. Real bugs are far
    larger: a scheduler stepped per process ends the schedule at half time, each process
    training alone reports 1 process, padded duplicates in gather change ``n``.
    """
    # `accelerate launch --cpu` uses its single-process launcher (several CPU processes only via
    # mpirun); `--multi_gpu` spawns them, and ACCELERATE_USE_CPU=1 makes them multi-CPU (gloo).
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(SCRIPT), str(one)], env=env, check=True, timeout=120,
                   capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), str(SCRIPT), str(two)]
    proc = subprocess.run(launch, env=env, timeout=180, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r1["steps"] == r2["steps"] == 48
    assert len(r1["evals"]) == len(r2["evals"]) == 3
    for e1, e2 in zip(r1["evals"], r2["evals"]):
        assert e1["n"] == e2["n"] == 200
        assert e2["eval_loss"] == pytest.approx(e1["eval_loss"], rel=0.02)
        assert abs(e2["accuracy"] - e1["accuracy"]) <= 2 / 200
    for r in (r1, r2):
        assert r["evals"][-1]["accuracy"] >= 0.9  # chance is 0.5
        assert r["evals"][-1]["eval_loss"] < 0.3  # ln 2 = 0.69 at chance


def test_empty_loader_is_a_data_error():
    with pytest.raises(DataError, match="empty"):
        train(tiny_bert(), DataLoader([], batch_size=4), cfg(max_steps=1))
