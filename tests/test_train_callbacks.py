"""Training events: order, the loss hook, early stop, cleanup after errors, STF and KD as callbacks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from stackcomp.errors import StackcompError
from stackcomp.nn.ds_linear import DSLinear, STFCallback
from stackcomp.train import EVENTS, TrainCallback, TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from _accelerate_script import accuracy, make_data, tiny_bert  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def loader(n=64, batch_size=16, seed=1):
    return DataLoader(make_data(n, seed), batch_size=batch_size)


def cfg(**kw):
    return TrainConfig(**{"lr": 1e-3, "warmup_ratio": 0.0, "log_every": 1000, "seed": 0, **kw})


class Recorder(TrainCallback):
    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.optimizer_seen = []

    def __getattribute__(self, name):
        if name in EVENTS:
            def record(state):
                self.events.append((name, state.step))
                if name == "on_optimizer_step":
                    self.optimizer_seen.append(state.optimizer is not None)
            return record
        return object.__getattribute__(self, name)


def test_events_fire_in_order_with_the_step():
    rec = Recorder()
    train(tiny_bert(), loader(64, 16), cfg(max_steps=4, eval_every=2), eval_loader=loader(32, 16, seed=2),
          compute_metrics=accuracy, callbacks=[rec])
    names = [e for e, _ in rec.events]
    assert names[:2] == ["on_init", "on_train_begin"] and names[-1] == "on_train_end"
    per_step = [(e, s) for e, s in rec.events if e in ("on_step_begin", "on_optimizer_step", "on_step_end",
                                                        "on_evaluate")]
    want = []
    for step in range(1, 5):
        want += [("on_step_begin", step), ("on_optimizer_step", step), ("on_step_end", step)]
        if step % 2 == 0:
            want.append(("on_evaluate", step))
    assert per_step == want
    assert all(rec.optimizer_seen)


def test_step_begin_fires_once_per_step_with_accumulation():
    rec = Recorder()
    train(tiny_bert(), loader(64, 8), cfg(max_steps=3, grad_accum=2), callbacks=[rec])
    assert [s for e, s in rec.events if e == "on_step_begin"] == [1, 2, 3]
    assert [s for e, s in rec.events if e == "on_optimizer_step"] == [1, 2, 3]


def test_a_callback_computes_the_loss():
    class HalfLoss:
        calls = 0

        def compute_loss(self, state, model, batch):
            HalfLoss.calls += 1
            return 0.5 * model(**batch).loss

    train(tiny_bert(), loader(64, 8), cfg(max_steps=3, grad_accum=2), callbacks=[HalfLoss()])
    assert HalfLoss.calls == 6  # one per micro-batch


def test_two_losses_are_refused():
    class L:
        def compute_loss(self, state, model, batch):
            return model(**batch).loss

    with pytest.raises(StackcompError, match="more than one defines compute_loss"):
        train(tiny_bert(), loader(), cfg(max_steps=1), callbacks=[L(), L()])
    with pytest.raises(StackcompError, match="both loss_fn and the callback"):
        train(tiny_bert(), loader(), cfg(max_steps=1), callbacks=[L()], loss_fn=lambda m, b: m(**b).loss)
    with pytest.raises(StackcompError, match="defines none of"):
        train(tiny_bert(), loader(), cfg(max_steps=1), callbacks=[object()])


def test_should_stop_ends_training_after_the_step_and_still_evaluates():
    class StopAt2(TrainCallback):
        def on_step_end(self, state):
            if state.step == 2:
                state.should_stop = True

    result = train(tiny_bert(), loader(64, 8), cfg(max_steps=10, eval_every=5), eval_loader=loader(32, 16, seed=2),
                   compute_metrics=accuracy, callbacks=[StopAt2()])
    assert result.steps == 2
    assert [h["step"] for h in result.history if "accuracy" in h] == [2]


def test_train_end_fires_after_an_error_and_init_modules_are_trained():
    class AddHead(TrainCallback):
        """Adds a trainable module in on_init (as KD's projection does) and removes it at the end."""

        def __init__(self):
            self.trained = False
            self.failed = None

        def on_init(self, state):
            state.model.add_module("extra", nn.Linear(2, 2))

        def compute_loss(self, state, model, batch):
            return model(**batch).loss + state.model.extra.weight.sum()

        def on_optimizer_step(self, state):
            self.trained = any(state.model.extra.weight is p for g in state.optimizer.param_groups
                               for p in g["params"])
            if state.step == 2:
                raise RuntimeError("boom")

        def on_train_end(self, state):
            self.failed = state.failed
            del state.model._modules["extra"]

    cb = AddHead()
    model = tiny_bert()
    with pytest.raises(RuntimeError, match="boom"):
        train(model, loader(64, 8), cfg(max_steps=5), callbacks=[cb])
    assert cb.trained and cb.failed is True and not hasattr(model, "extra")


def test_no_training_config_returns_the_model_untouched():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = Recorder()
    result = train(model, loader(), cfg(epochs=0), callbacks=[rec])
    assert result.steps == 0 and rec.events == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class DSHead(nn.Module):
    """A one-layer model whose only layer is a DSLinear, with a loss, for the loop."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        lin = nn.Linear(32, 8)
        self.ds = DSLinear.from_linear(lin, block=8, atoms=12, nnz=3, iters=2)

    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.ds(x), labels), "logits": self.ds(x)}


def _ds_data(n=48):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=g)
    return [{"x": x[i], "labels": torch.tensor(i % 8)} for i in range(n)]


def test_stf_callback_drives_code_refresh_under_the_fused_loop():
    """The loop's AdamW is fused (no version-counter bumps): only the callback tells the layer
    that a step happened; without it the codes are solved once, at the first forward."""
    counts = {}
    for with_callback in (True, False):
        model = DSHead()
        model.ds.start_stf(refresh_every=2)
        train(model, DataLoader(_ds_data(), batch_size=8), cfg(max_steps=6, keep_best=False),
              callbacks=[STFCallback(model)] if with_callback else None)
        counts[with_callback] = model.ds._stf_updates
    assert counts[True] == 6  # one per optimizer step: refreshes at steps 1, 3, 5
    assert counts[False] < 6
