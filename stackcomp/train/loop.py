"""The one training loop that fine-tuning, distillation and STF share, built on accelerate.

Every pass that trains calls :func:`train` (or :func:`stackcomp.train.train_on_task`) with plain
``DataLoader``s and, where it needs them, its own parameter groups (``optimizer_params``) and
training callbacks (:mod:`stackcomp.train.callbacks`: a KD loss, re-masking, STF's step marks,
a pruner). The loop owns what they should not have to repeat: AdamW with linear
warmup/decay, gradient accumulation and clipping, evaluation every N steps with the best
checkpoint kept in memory, seeding, progress, and a guard that stops on NaN/Inf naming the step
and the parameter. It runs unchanged in one process or under ``accelerate launch`` (DDP).

A *step* is one optimizer update: ``grad_accum`` micro-batches in every process.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from stackcomp.errors import DataError, ModelError, NumericalError, StackcompError
from stackcomp.passes.base import KEY_OMIT_DEFAULT
from stackcomp.progress import NULL_PROGRESS, Progress
from stackcomp.train.callbacks import CallbackList, TrainState

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "make_accelerator",
    "default_param_groups",
]

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
#: ``compute_metrics(logits, labels) -> {name: float}``; both CPU tensors holding the whole eval set.
MetricsFn = Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]]
#: ``predict(model, batch) -> {"predictions", "labels"?, "loss"?}`` (see :func:`evaluate`)
PredictFn = Callable[[nn.Module, Mapping[str, Any]], Mapping[str, torch.Tensor]]

_LOG = logging.getLogger("stackcomp.train")


class TrainConfig(BaseModel):
    """Settings of the shared loop. Batch sizes are for whoever builds the loaders."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    epochs: float = Field(default=1.0, ge=0, description="passes over the training data (fractions allowed; "
                          "0 and no max_steps: no training)")
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; overrides epochs when set")
    lr: float = Field(default=5e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW decay; never applied to biases and norms")
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1, description="fraction of steps of linear warmup")
    batch_size: int = Field(default=32, ge=1, description="training sequences per batch (per process)")
    eval_batch_size: int = Field(default=128, ge=1, description="evaluation sequences per batch")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="clip the global grad norm; None: no clip")
    eval_every: int | None = Field(default=None, ge=1, description="evaluate every N steps; None: every epoch")
    keep_best: bool = Field(default=True, description="restore the best evaluated weights at the end")
    seed: int = Field(default=42, ge=0, lt=2**32, description="seeds python, numpy and torch (dropout, init); 0 to 2**32-1, what numpy accepts")
    log_every: int = Field(default=50, ge=1, description="log loss, lr and grad norm every N steps")
    batches: Literal["train", "unlabeled"] = Field(
        default="train", description="what the loop trains on: the task's train split (labelled), or unlabeled "
        "text (the train split's text plus data.unlabeled files) for distillation without labels",
        json_schema_extra=KEY_OMIT_DEFAULT)

    @property
    def trains(self) -> bool:
        """False for ``epochs: 0`` without ``max_steps``: the pass skips its training."""
        return not (self.epochs == 0 and self.max_steps is None)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``best_metrics`` are the eval metrics of the returned model: the best evaluation when
    ``keep_best`` is on, else the last one; None without an eval loader.
    """

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_metrics: dict | None = None
    steps: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- accelerator

_ACCELERATOR: Any = None


def make_accelerator(seed: int = 42, grad_accum: int = 1):
    """The process's accelerator, created once and re-armed for this run (seed, accumulation).

    accelerate keeps its state in process-wide singletons (including the gradient-accumulation
    settings), so one cached ``Accelerator`` is reused; each call re-applies ``grad_accum``
    because another ``Accelerator`` (e.g. a HF ``Trainer``) may have changed them meanwhile.
    Under a multi-process launch on a machine without an accelerator it selects multi-CPU (gloo).
    The scheduler steps once per optimizer step whatever the number of processes
    (``step_scheduler_with_optimizer=False``; the loop calls it only on real updates).
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    global _ACCELERATOR
    plugin = GradientAccumulationPlugin(num_steps=grad_accum, adjust_scheduler=False, sync_with_dataloader=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if _ACCELERATOR is None:
        # launched as several processes on a machine with no accelerator: accelerate only picks
        # multi-CPU (gloo) when told "cpu", else every process silently trains alone
        cpu = world > 1 and not torch.accelerator.is_available()
        _ACCELERATOR = Accelerator(gradient_accumulation_plugin=plugin, step_scheduler_with_optimizer=False, cpu=cpu)
    acc = _ACCELERATOR
    if world > 1 and acc.num_processes != world:
        raise StackcompError(
            f"launched as {world} processes (WORLD_SIZE) but accelerate runs {acc.num_processes}: accelerate's "
            "state was set up before stackcomp.train (e.g. PartialState() without cpu=True on a CPU-only "
            "machine); set ACCELERATE_USE_CPU=1 or create no accelerate state before training")
    acc.gradient_state.plugin_kwargs = plugin.to_kwargs()
    acc.step = 0
    set_seed(seed)
    return acc


# ----------------------------------------------------------------------------- optimizer

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed, and biases/normalization weights (no decay).

    A parameter counts as a norm weight when its module is a torch norm layer or its class name
    contains "Norm" (covers HF's own LayerNorm/RMSNorm classes).
    """
    decay, no_decay, seen = [], [], set()
    for mod in model.modules():
        is_norm = isinstance(mod, _NORM_TYPES) or "Norm" in type(mod).__name__
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if is_norm or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _param_groups(model: nn.Module, config: TrainConfig, optimizer_params: Any) -> list[dict]:
    if optimizer_params is None:
        groups = default_param_groups(model, config.weight_decay)
    else:
        items = list(optimizer_params)
        if items and all(isinstance(g, Mapping) for g in items):
            groups = [dict(g) for g in items]
            for i, g in enumerate(groups):
                if "params" not in g:
                    raise StackcompError(f"optimizer_params[{i}]: a param group needs a 'params' key")
                g["params"] = [p for p in g["params"] if p.requires_grad]
        elif all(isinstance(p, torch.Tensor) for p in items):
            groups = [{"params": [p for p in items if p.requires_grad]}]
        else:
            raise StackcompError("optimizer_params: expected parameter groups (dicts with 'params') or parameters")
        groups = [g for g in groups if g["params"]]
    if not groups:
        raise ModelError(f"{type(model).__name__}: no trainable parameters (all have requires_grad=False)")
    return groups


def _make_adamw(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused when the device supports it (on 2 CPU cores: ~18 ms vs ~100 ms a step for MiniLM)."""
    try:
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


# ----------------------------------------------------------------------------- numerical guard


def _first_nonfinite(model: nn.Module, what: str) -> str | None:
    for name, p in model.named_parameters():
        t = p.grad if what == "grad" else p.detach()
        if t is not None and not bool(torch.isfinite(t).all()):
            return name
    return None


class _Guard:
    """Stops training at the first step with a non-finite loss or gradient.

    On CPU a host read costs nothing, so every update is checked before the optimizer applies it
    (the model keeps its last finite weights and the faulty parameter is named from its grad).
    On asynchronous devices checks are deferred to logging points to avoid a sync per step: the
    first bad step is still exact, and the message names parameters whose weights went bad.
    Under several processes the flags are reduced so every process stops at the same step.
    """

    #: device types where every update is checked at once
    eager_devices: tuple[str, ...] = ("cpu",)

    def __init__(self, accelerator: Any, model: nn.Module, device: torch.device):
        self.acc = accelerator
        self.model = model  # unwrapped, for names
        self.eager = device.type in self.eager_devices
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_bad = torch.zeros(2, dtype=torch.long, device=device)  # [loss step, grad step]; 0 = none

    def micro_step(self, loss: torch.Tensor) -> None:
        self.loss_bad |= ~torch.isfinite(loss.detach())

    def update(self, grad_norm: torch.Tensor, step: int) -> None:
        flags = torch.stack([self.loss_bad, ~torch.isfinite(grad_norm.detach())])
        self.loss_bad = torch.zeros_like(self.loss_bad)
        if self.acc.num_processes > 1:
            flags = self.acc.reduce(flags.to(torch.long), reduction="sum") > 0
        if self.eager:
            loss_bad, grad_bad = flags.tolist()
            if loss_bad:
                bad = _first_nonfinite(self.model, "weight")
                where = f"; parameter {bad!r} holds NaN/Inf" if bad else ""
                raise NumericalError(
                    f"training step {step}: the loss is NaN/Inf (before the update; weights kept){where}")
            if grad_bad:
                name = _first_nonfinite(self.model, "grad") or "(another process's gradients)"
                raise NumericalError(f"training step {step}: NaN/Inf gradient in parameter {name!r}")
        else:
            new = flags & (self.first_bad == 0)
            self.first_bad = torch.where(new, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self) -> None:
        """Deferred mode: raise if a bad step was recorded (a host sync)."""
        if self.eager:
            return
        loss_step, grad_step = self.first_bad.tolist()
        if loss_step or grad_step:
            bad = _first_nonfinite(self.model, "weight")
            where = f"; first NaN/Inf weight now in {bad!r}" if bad else ""
            if loss_step and (not grad_step or loss_step <= grad_step):
                raise NumericalError(f"training step {loss_step}: the loss is NaN/Inf{where}")
            raise NumericalError(f"training step {grad_step}: NaN/Inf gradient{where}")


# ----------------------------------------------------------------------------- evaluation


def _default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise DataError("the model returned no loss: training batches need 'labels', or pass loss_fn")
    return loss


def _is_prepared(loader: Any) -> bool:
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    return isinstance(loader, (DataLoaderShard, DataLoaderDispatcher))


@torch.inference_mode()
def evaluate(model: nn.Module, eval_loader: Iterable, compute_metrics: MetricsFn | None = None,
             accelerator: Any = None, predict: PredictFn | None = None) -> dict[str, float]:
    """``{"eval_loss": ..., **compute_metrics(predictions, labels)}`` over the whole eval set.

    ``predict(model, batch)`` turns a batch into ``{"predictions", "labels"?, "loss"?}`` (default:
    the model's logits, the batch's labels, its loss): how a task kind whose output is not one
    logits tensor (QA's start/end, a bi-encoder's similarity) is scored. Tensors of different
    lengths along dim 1 (per-token outputs of batches padded to their own length) are padded to
    the longest, predictions with 0 and labels with -100, before concatenating.

    With an ``accelerator`` each process runs its shard and predictions are gathered
    (``gather_for_metrics`` drops the padding of the last batch), so every process gets the same
    metrics. ``eval_loss`` is the batch loss weighted by batch size (absent if there is none).
    The model's train/eval mode is restored afterwards.
    """
    from stackcomp.tasks.base import default_predict

    predict = predict or default_predict
    if accelerator is not None and not _is_prepared(eval_loader):
        eval_loader = accelerator.prepare_data_loader(eval_loader)
    device = accelerator.device if accelerator is not None else _model_device(model)
    was_training = model.training
    model.eval()
    pred_parts, label_parts, loss_parts = [], [], []
    try:
        for batch in eval_loader:
            if accelerator is None:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            result = predict(model, batch)
            preds = result["predictions"]
            parts = {"predictions": preds}
            if result.get("labels") is not None:
                parts["labels"] = result["labels"]
            if result.get("loss") is not None:
                parts["loss"] = result["loss"].detach().float().reshape(1).expand(preds.shape[0])
            if accelerator is not None:
                parts = {k: accelerator.pad_across_processes(v, dim=1, pad_index=-100 if k == "labels" else 0)
                         if v.dim() > 1 else v for k, v in parts.items()}
                parts = accelerator.gather_for_metrics(parts)
            pred_parts.append(parts["predictions"].float().cpu())
            if "labels" in parts:
                label_parts.append(parts["labels"].cpu())
            if "loss" in parts:
                loss_parts.append(parts["loss"].cpu())
    finally:
        model.train(was_training)
    if not pred_parts:
        raise DataError("the evaluation loader yielded no batches")
    metrics: dict[str, float] = {}
    if loss_parts:
        metrics["eval_loss"] = float(torch.cat(loss_parts).mean())
    if compute_metrics is not None:
        if not label_parts:
            raise DataError("compute_metrics needs labels: the evaluation batches have no 'labels'")
        result = compute_metrics(_cat_padded(pred_parts, 0), _cat_padded(label_parts, -100))
        metrics.update({k: float(v) for k, v in result.items()})
    return metrics


def _cat_padded(parts: list[torch.Tensor], pad: float) -> torch.Tensor:
    """Concatenate along dim 0, padding dim 1 to the longest part first (per-token outputs)."""
    if parts[0].dim() < 2 or len({p.shape[1] for p in parts}) == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        extra = list(p.shape)
        extra[1] = width - p.shape[1]
        padded.append(torch.cat([p, p.new_full(extra, pad)], dim=1) if extra[1] else p)
    return torch.cat(padded)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- training


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict; tied tensors are copied once."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in model.state_dict().items():
        if id(v) not in copies:
            copies[id(v)] = v.detach().clone()
        out[k] = copies[id(v)]
    return out


def _is_better(value: float, best: float | None, greater: bool) -> bool:
    if value != value:  # NaN never wins
        return False
    return best is None or (value > best if greater else value < best)


def train(
    model: nn.Module,
    train_loader: Iterable,
    config: TrainConfig | Mapping[str, Any] | None = None,
    *,
    eval_loader: Iterable | None = None,
    compute_metrics: MetricsFn | None = None,
    predict: PredictFn | None = None,
    main_metric: str | None = None,
    greater_is_better: bool | None = None,
    loss_fn: LossFn | None = None,
    optimizer_params: Iterable[Any] | Callable[[nn.Module], Iterable[Any]] | None = None,
    callbacks: Iterable[Any] | None = None,
    progress: Progress = NULL_PROGRESS,
    log: logging.Logger | None = None,
) -> TrainResult:
    """Train ``model`` in place and return it with its history.

    - ``loss_fn(model, batch) -> scalar``: default ``model(**batch).loss``. ``model`` is the
      prepared (possibly DDP-wrapped) module: call it once per batch, do not bypass it.
    - ``optimizer_params``: a callable ``model -> groups`` (called after the callbacks' ``on_init``)
      or AdamW parameter groups (dicts with ``params`` and optionally ``lr``,
      ``weight_decay``) or plain parameters; default: :func:`default_param_groups`. Every group
      follows the same warmup/decay shape relative to its own lr.
    - ``callbacks``: objects with some of the events of :mod:`stackcomp.train.callbacks`
      (``on_train_begin``, ``on_step_begin``, ``compute_loss``, ``on_optimizer_step``,
      ``on_step_end``, ``on_evaluate``, ``on_train_end``), called in the given order. A callback
      with ``compute_loss`` replaces ``loss_fn``.
    - ``predict``: how an evaluation batch becomes predictions (see :func:`evaluate`).
    - A config that does not train (``epochs: 0`` without ``max_steps``) returns the model as it is.
    - ``main_metric`` picks the best evaluation (default ``eval_loss``); ``greater_is_better``
      defaults to False for names containing "loss", else True.
    """
    from transformers import get_linear_schedule_with_warmup

    if config is None:
        config = TrainConfig()
    elif not isinstance(config, TrainConfig):
        config = TrainConfig.model_validate(dict(config))
    log = log or _LOG
    main_metric = main_metric or "eval_loss"
    if greater_is_better is None:
        greater_is_better = "loss" not in main_metric
    events = CallbackList(callbacks)
    if events.loss_callback is not None and loss_fn is not None:
        raise StackcompError(f"train: both loss_fn and the callback {type(events.loss_callback).__name__} compute "
                             "the loss; give one")
    loss_fn = loss_fn or _default_loss
    t0 = time.perf_counter()
    if not config.trains:
        return TrainResult(model=model)

    acc = make_accelerator(config.seed, config.grad_accum)
    state = TrainState(model=model, accelerator=acc, is_main_process=acc.is_main_process)
    events.fire("on_init", state)  # modules added here (a KD projection) are trained with the model
    if callable(optimizer_params):
        optimizer_params = optimizer_params(model)
    groups = _param_groups(model, config, optimizer_params)
    optimizer = _make_adamw(groups, config)
    try:
        if len(train_loader) == 0:
            raise DataError("the training loader is empty")
    except TypeError:  # no length (iterable dataset): only max_steps can say when to stop
        if config.max_steps is None:
            raise DataError("the training loader has no length: set max_steps") from None
    was_training = model.training
    if eval_loader is not None:
        model, optimizer, train_dl, eval_dl = acc.prepare(model, optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_dl = acc.prepare(model, optimizer, train_loader)
        eval_dl = None
    raw_model = acc.unwrap_model(model)

    try:
        batches_per_epoch = len(train_dl)  # per process once prepared
    except TypeError:
        batches_per_epoch = None
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum) if batches_per_epoch else None
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = math.ceil(config.warmup_ratio * total)
    scheduler = acc.prepare(get_linear_schedule_with_warmup(optimizer.optimizer, warmup, total))

    main = acc.is_main_process
    if not main:
        progress = NULL_PROGRESS
    guard = _Guard(acc, raw_model, acc.device)
    history: list[dict] = []
    best_value: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_metrics: dict | None = None
    last_metrics: dict | None = None
    last_eval_step = -1
    trainable = [p for g in groups for p in g["params"]]
    if main:
        log.info("training %d steps (%s batches/epoch, grad_accum %d, %d processes, warmup %d)",
                 total, batches_per_epoch, config.grad_accum, acc.num_processes, warmup)

    def epoch_of(step: int) -> float:
        return round(step / steps_per_epoch, 4) if steps_per_epoch else 0.0

    state.model, state.optimizer, state.total_steps, state.history = raw_model, optimizer, total, history

    def run_eval(step: int) -> None:
        nonlocal best_value, best_state, best_metrics, last_metrics, last_eval_step
        guard.check()
        metrics = evaluate(raw_model, eval_dl, compute_metrics, acc, predict=predict)
        last_eval_step = step
        if main_metric not in metrics:
            raise StackcompError(f"main_metric {main_metric!r} is not among the eval metrics {sorted(metrics)}")
        history.append({"step": step, "epoch": epoch_of(step), **metrics})
        if main:
            log.info("step %d eval: %s", step, "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        last_metrics = metrics
        if _is_better(metrics[main_metric], best_value, greater_is_better):
            best_value, best_metrics = metrics[main_metric], metrics
            if config.keep_best:
                best_state = _snapshot(raw_model)
        state.metrics = dict(metrics)
        events.fire("on_evaluate", state)

    if events.loss_callback is not None:
        def loss_fn(m: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
            return events.compute_loss(state, m, batch)

    step = 0
    epoch = 0
    loss_sum = torch.zeros((), device=acc.device)
    loss_count = 0
    model.train()
    step_open = False  # a step's first micro-batch has been seen (on_step_begin fired)
    try:
        events.fire("on_train_begin", state)
        with progress.bar("train", total=total) as bar:
            while step < total and not state.should_stop:
                if hasattr(train_dl, "set_epoch"):
                    train_dl.set_epoch(epoch)
                state.epoch = epoch
                seen = 0
                for batch in train_dl:
                    seen += 1
                    if not step_open:
                        state.step = step + 1
                        events.fire("on_step_begin", state)
                        step_open = True
                    with acc.accumulate(model):
                        loss = loss_fn(model, batch)
                        guard.micro_step(loss)
                        acc.backward(loss)
                    loss_sum += loss.detach().float()
                    loss_count += 1
                    if not acc.sync_gradients:
                        continue
                    # the norm is checked before clipping: clipping by a NaN norm would spread NaN to every grad
                    acc.unscale_gradients()  # no-op unless fp16 mixed precision
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
                    step += 1
                    step_open = False
                    state.step = step
                    guard.update(grad_norm, step)
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grads_with_norm_(trainable, config.max_grad_norm, grad_norm)
                    lr = optimizer.param_groups[0]["lr"]
                    state.lr = lr
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    events.fire("on_optimizer_step", state)
                    if step % config.log_every == 0 or step == total:
                        guard.check()
                        mean_loss = acc.reduce(loss_sum / max(loss_count, 1), reduction="mean")
                        entry = {"step": step, "epoch": epoch_of(step), "loss": float(mean_loss),
                                 "lr": lr, "grad_norm": float(grad_norm)}
                        history.append(entry)
                        loss_sum.zero_()
                        loss_count = 0
                        bar.advance(loss=entry["loss"], lr=lr)
                        if main:
                            log.info("step %d/%d loss=%.4g lr=%.3g grad_norm=%.3g", step, total,
                                     entry["loss"], lr, entry["grad_norm"])
                    else:
                        bar.advance()
                    events.fire("on_step_end", state)
                    if eval_dl is not None and config.eval_every and step % config.eval_every == 0:
                        run_eval(step)
                        model.train()
                    if step >= total or state.should_stop:
                        break
                else:  # the epoch ran to its end
                    if seen == 0:
                        raise DataError(f"the training loader yielded no batches in epoch {epoch}")
                    if eval_dl is not None and config.eval_every is None and last_eval_step != step:
                        run_eval(step)
                        model.train()
                if hasattr(train_dl, "end"):
                    train_dl.end()  # leaving the loop early leaves accelerate's loader state active
                epoch += 1
            guard.check()
            if eval_dl is not None and last_eval_step != step:
                run_eval(step)
        if config.keep_best and best_state is not None:
            raw_model.load_state_dict(best_state)
            if main:
                log.info("restored the best checkpoint (%s=%.4g)", main_metric, best_value)
        acc.wait_for_everyone()
    except BaseException:
        state.failed = True
        raise
    finally:
        try:
            events.fire("on_train_end", state)
        finally:
            acc.free_memory()
            raw_model.train(was_training)
    return TrainResult(
        model=raw_model,
        history=history,
        best_metrics=(best_metrics if config.keep_best else last_metrics),
        steps=step,
        seconds=time.perf_counter() - t0,
    )
