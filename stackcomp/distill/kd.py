"""Knowledge distillation as a loss: any pass that trains can learn from a teacher.

:class:`KDLoss` is a training callback for :func:`stackcomp.train.train` (``callbacks=[kd]``: it
adds its projection to the student before the optimizer is built, computes the loss, and removes
the projection at the end; it also works as a plain ``loss_fn(model, batch)``). Per batch it
runs the teacher once, in eval mode and without gradients, asking only for what the weighted
losses need (logits, hidden states, attention maps), runs the student, and returns the weighted
sum of the losses in :mod:`stackcomp.distill.losses`. Each model receives only the batch keys
its ``forward`` names (DistilBERT takes no ``token_type_ids``).

Teacher logits may be cached across epochs, keyed by a hash of each example's real tokens, so
they are found again whatever the shuffling and padding of later batches. The cache serves
only when nothing but logits is needed from the teacher; intermediate losses need its hidden
states every batch.

The hidden-state projection (student width -> teacher width) is a trainable module owned by
the loss. :meth:`KDLoss.attach` registers it on the student for the time of training, so the
loop's optimizer, checkpointing and DDP see it like any other parameter; :meth:`KDLoss.detach`
removes it before the student is saved.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from stackcomp.distill import losses as L
from stackcomp.errors import ModelError, RecipeError
from stackcomp.tasks.base import forward_inputs

__all__ = ["KDWeights", "KDLoss", "make_kd_loss_fn", "forward_inputs"]

_LOG = logging.getLogger("stackcomp.distill")
_PROJECTION = "_kd_projection"

INTERMEDIATE = ("cosine", "attention", "hidden")
PREDICTION = ("soft", "hard", "pred", "embedding")


class KDWeights(BaseModel):
    """Weights of the distillation losses (0 turns a loss off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    soft: float = Field(default=0.5, ge=0, description="soft-target KL with temperature, times T^2 (Hinton)")
    hard: float = Field(default=0.5, ge=0, description="task loss on gold labels (CE; MSE for regression)")
    pred: float = Field(default=0.0, ge=0, description="TinyBERT prediction-layer soft cross-entropy")
    cosine: float = Field(default=0.0, ge=0, description="DistilBERT cosine loss on the last hidden states")
    attention: float = Field(default=0.0, ge=0, description="TinyBERT attention-map MSE over mapped layers")
    hidden: float = Field(default=0.0, ge=0, description="TinyBERT hidden-state MSE (embeddings + mapped layers) "
                          "through a learned projection")
    # added later: left out of stage keys at its default (passes.base.KEY_OMIT_DEFAULT)
    embedding: float = Field(default=0.0, ge=0, json_schema_extra={"key_omit_default": True},
                             description="MSE between the student's and the teacher's pooled sentence embeddings "
                             "(a task kind with embeddings, e.g. embeddings/stsb)")

    def active(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v > 0}

    def only(self, names: Sequence[str]) -> KDWeights:
        """These weights with every loss outside ``names`` set to 0."""
        return KDWeights(**{k: (v if k in names else 0.0) for k, v in self.model_dump().items()})


def _gold_rows(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """Rows whose gold label holds: all (None) unless the batch marks augmented copies
    (:mod:`stackcomp.data.augment`), whose labels belong to the example they were perturbed from."""
    marks = batch.get("augmented")
    return None if marks is None else marks.view(-1) == 0


def _attr(out: Any, name: str) -> Any:
    if hasattr(out, name):  # HF ModelOutput: absent fields are None attributes, not keys
        return getattr(out, name)
    return out.get(name) if isinstance(out, Mapping) else None


class KDLoss(nn.Module):
    """``loss_fn(model, batch)``: weighted distillation losses against a frozen teacher.

    ``teacher`` is a model or a zero-argument callable returning one (e.g. ``ctx.teacher``);
    it is resolved only when some active loss needs it, so a hard-label-only loss (a no-KD
    baseline on the same loop) never loads a teacher. ``student`` fixes the widths and depth
    for the layer map and the projection; it must be the model then trained.
    """

    def __init__(self, teacher: nn.Module | Callable[[], nn.Module] | None, student: nn.Module,
                 weights: KDWeights | Mapping[str, float] | None = None, *, temperature: float = 2.0,
                 layer_map: Sequence[int] | None = None, cache_teacher_logits: bool = False,
                 log: logging.Logger | None = None, task: Any = None):
        super().__init__()
        # a task kind other than GLUE says what its outputs are (tasks.base.Task.kd_outputs)
        self.__dict__["task"] = task if getattr(task, "kind", "glue") != "glue" else None
        self.weights = weights if isinstance(weights, KDWeights) else KDWeights(**(weights or {}))
        if not self.weights.active():
            raise RecipeError("distillation weights are all 0: set at least one of "
                              f"{', '.join(KDWeights.model_fields)}")
        if temperature <= 0:
            raise RecipeError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.log = log or _LOG
        w = self.weights
        self.need_logits = w.soft > 0 or w.pred > 0
        self.need_hidden = w.hidden > 0 or w.cosine > 0
        self.need_attention = w.attention > 0
        self.need_embeddings = w.embedding > 0
        if self.need_embeddings and self.task is None:
            raise RecipeError("the embedding loss (kd.embedding) needs a task whose model gives sentence embeddings, "
                              "e.g. embeddings/stsb")
        self.needs_teacher = self.need_logits or self.need_hidden or self.need_attention or self.need_embeddings
        self.__dict__["teacher"] = None  # not a submodule: its parameters are not ours to train or save
        if self.needs_teacher:
            if teacher is None:
                raise RecipeError(f"distillation losses {sorted(w.active())} need a teacher")
            t = teacher if isinstance(teacher, nn.Module) else teacher()
            t.eval().requires_grad_(False)
            self.__dict__["teacher"] = t
            if self.need_logits and self.task is None:
                ns, nt = getattr(student.config, "num_labels", None), getattr(t.config, "num_labels", None)
                if ns != nt:
                    raise ModelError(f"the teacher predicts {nt} label(s) and the student {ns}: the soft-target "
                                     "losses compare their logits, so both need the task's label set")
        self.cache_teacher_logits = bool(cache_teacher_logits)
        if self.cache_teacher_logits and self.task is not None:
            self.log.warning("cache_teacher_logits applies to sentence classification only; task %s: not cached",
                             self.task.name)
            self.cache_teacher_logits = False
        if self.cache_teacher_logits and (self.need_hidden or self.need_attention):
            self.log.warning("cache_teacher_logits has no effect: the intermediate losses need the teacher's hidden "
                             "states in every batch")
            self.cache_teacher_logits = False
        self._cache: dict[bytes, torch.Tensor] = {}
        self.teacher_calls = 0
        self.cache_hits = 0

        self.layer_map: list[int] | None = None
        projection = None
        if self.need_hidden or self.need_attention:
            from stackcomp.distill.students import hidden_width, num_layers

            ms, nt = num_layers(student), num_layers(self.teacher)
            try:
                self.layer_map = L.resolve_layer_map(layer_map, ms, nt)
            except ValueError as e:
                raise RecipeError(f"layer_map: {e}") from None
            if self.need_hidden:
                projection = L.HiddenProjection(hidden_width(student), hidden_width(self.teacher))
                projection.to(next(student.parameters()).device)
            if self.need_attention:
                heads = (student.config.num_attention_heads, self.teacher.config.num_attention_heads)
                if heads[0] != heads[1]:
                    self.log.warning("student has %d heads, teacher %d: the attention loss compares head-averaged "
                                     "maps", *heads)
        self.projection = projection
        self._attn_restore: list[tuple[nn.Module, str]] = []
        if self.need_attention:  # fused attention kernels do not return the maps
            for m in (student, self.teacher):
                impl = getattr(m.config, "_attn_implementation", None)
                if impl != "eager":
                    try:
                        m.set_attn_implementation("eager")
                    except (AttributeError, ValueError) as e:
                        raise ModelError(f"{type(m).__name__}: the attention loss needs attention maps, but eager "
                                         f"attention cannot be selected: {e}") from None
                    self._attn_restore.append((m, impl))
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    # ------------------------------------------------------------------ training events

    def on_init(self, state: Any) -> None:
        """Before the optimizer is built: the projection joins the student (and so the optimizer)."""
        self.attach(state.model)

    def compute_loss(self, state: Any, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return self(model, batch)

    def on_train_end(self, state: Any) -> None:
        self.detach(state.model)

    # ------------------------------------------------------------------ lifecycle

    def attach(self, student: nn.Module) -> KDLoss:
        """Register the projection on the student while it trains (optimizer, DDP, checkpoints see it)."""
        if self.projection is not None and self.projection.proj is not None:
            student.add_module(_PROJECTION, self.projection)
        return self

    def detach(self, student: nn.Module) -> None:
        """Undo :meth:`attach` and the switch to eager attention; the student is as it was built."""
        if _PROJECTION in student._modules:
            del student._modules[_PROJECTION]
        for m, impl in self._attn_restore:
            if impl is not None:
                m.set_attn_implementation(impl)
        self._attn_restore = []

    def summary(self) -> dict[str, float]:
        """Mean of each loss over the batches seen, and teacher/cache counts."""
        out = {f"kd_{k}": float(v) / max(self._count, 1) for k, v in self._sums.items()}
        out.update(teacher_calls=self.teacher_calls, cache_hits=self.cache_hits)
        return out

    # ------------------------------------------------------------------ teacher

    def _row_keys(self, inputs: Mapping[str, Any]) -> list[bytes]:
        ids = inputs["input_ids"].detach().cpu()
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
        extra = [inputs[k].detach().cpu() for k in sorted(inputs) if k not in ("input_ids", "attention_mask")
                 and isinstance(inputs[k], torch.Tensor) and inputs[k].shape == ids.shape]
        keys = []
        for i in range(ids.shape[0]):
            h = hashlib.blake2b(digest_size=16)
            h.update(ids[i][mask[i]].to(torch.int64).numpy().tobytes())
            for t in extra:
                h.update(b"|")
                h.update(t[i][mask[i]].to(torch.int64).numpy().tobytes())
            keys.append(h.digest())
        return keys

    @torch.no_grad()
    def teacher_outputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Logits, hidden states and attention maps of the teacher, as the active losses need."""
        t = self.teacher
        inputs = forward_inputs(t, batch)
        device = inputs["input_ids"].device
        if next(t.parameters()).device != device:
            t.to(device)
        if t.training:
            t.eval()
        if self.task is not None:
            self.teacher_calls += 1
            return self.task.kd_outputs(t, batch, output_hidden_states=self.need_hidden,
                                        output_attentions=self.need_attention)
        keys = None
        if self.cache_teacher_logits:
            keys = self._row_keys(inputs)
            if all(k in self._cache for k in keys):
                self.cache_hits += 1
                return {"logits": torch.stack([self._cache[k] for k in keys]).to(device)}
        out = t(**inputs, output_hidden_states=self.need_hidden, output_attentions=self.need_attention)
        self.teacher_calls += 1
        result = {"logits": _attr(out, "logits"), "hidden_states": _attr(out, "hidden_states"),
                  "attentions": _attr(out, "attentions")}
        if keys is not None:
            for k, row in zip(keys, result["logits"].detach().float().cpu()):
                self._cache[k] = row
        return result

    # ------------------------------------------------------------------ the loss

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        w = self.weights
        if self.task is not None:
            return self._task_forward(model, batch)
        inputs = forward_inputs(model, batch)
        out = model(**inputs, output_hidden_states=self.need_hidden, output_attentions=self.need_attention)
        logits = _attr(out, "logits")
        parts: dict[str, torch.Tensor] = {}
        if w.hard > 0:
            labels = batch.get("labels")
            if labels is None:
                raise RecipeError("the hard-label loss needs 'labels' in the training batches")
            gold = _gold_rows(batch)
            if gold is None:
                parts["hard"] = L.hard_loss(logits, labels)
            elif gold.any():
                parts["hard"] = L.hard_loss(logits[gold], labels[gold])
        if self.needs_teacher:
            t = self.teacher_outputs(batch)
            mask = batch.get("attention_mask")
            if w.soft > 0:
                parts["soft"] = L.soft_kl(logits, t["logits"], self.temperature)
            if w.pred > 0:
                parts["pred"] = L.soft_cross_entropy(logits, t["logits"], self.temperature)
            self._intermediate_losses(parts, out, t, mask)
        return self._total(parts)

    def _task_forward(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """The losses for a task kind's outputs (``Task.kd_outputs``): logits rows per token or
        per start/end position, pooled embeddings, and the kind's own loss as the hard loss."""
        w, task = self.weights, self.task
        out = task.kd_outputs(model, batch, output_hidden_states=self.need_hidden,
                              output_attentions=self.need_attention)
        parts: dict[str, torch.Tensor] = {}
        if w.hard > 0:
            if out.get("loss") is None:
                raise RecipeError(f"the hard-label loss (kd.hard) needs gold labels, but task {task.name} gave no "
                                  "loss for this batch; set kd.hard: 0 to distill on unlabeled data")
            parts["hard"] = out["loss"]
        if self.needs_teacher:
            t = self.teacher_outputs(batch)
            if self.need_logits:
                if out.get("logits") is None or t.get("logits") is None:
                    raise RecipeError(f"task {task.name} has no logits to distill: set kd.soft and kd.pred to 0"
                                      + (" and use kd.embedding" if out.get("embeddings") is not None else ""))
                _same_rows("logits", out["logits"], t["logits"])
                if w.soft > 0:
                    parts["soft"] = L.soft_kl(out["logits"], t["logits"], self.temperature)
                if w.pred > 0:
                    parts["pred"] = L.soft_cross_entropy(out["logits"], t["logits"], self.temperature)
            if self.need_embeddings:
                se, te = out.get("embeddings"), t.get("embeddings")
                if se is None or te is None:
                    raise RecipeError(f"task {task.name} gives no sentence embeddings: set kd.embedding: 0")
                _same_rows("embeddings", se, te)
                parts["embedding"] = torch.nn.functional.mse_loss(se.float(), te.float())
            self._intermediate_losses(parts, out, t, batch.get("attention_mask"))
        return self._total(parts)

    def _intermediate_losses(self, parts: dict[str, torch.Tensor], out: Any, t: Mapping[str, Any],
                             mask: torch.Tensor | None) -> None:
        """The hidden-state and attention-map losses over the mapped layers, added to ``parts``."""
        w = self.weights
        if self.need_hidden:
            sh, th = _attr(out, "hidden_states"), t["hidden_states"]
            if w.cosine > 0:
                parts["cosine"] = L.hidden_cosine(self.projection(sh[-1]), th[-1], mask)
            if w.hidden > 0:
                pairs = [(0, 0), *((m, g) for m, g in enumerate(self.layer_map, start=1))]
                parts["hidden"] = sum(L.hidden_mse(self.projection(sh[m]), th[g], mask) for m, g in pairs)
        if self.need_attention:
            sa, ta = _attr(out, "attentions"), t["attentions"]
            if not sa or not ta:
                raise ModelError("the attention loss needs attention maps, but a model returned none")
            parts["attention"] = sum(L.attention_mse(sa[m - 1], ta[g - 1], mask)
                                     for m, g in enumerate(self.layer_map, start=1))

    def _total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.weights
        loss = sum(getattr(w, k) * v for k, v in parts.items())
        for k, v in parts.items():
            self._sums[k] = self._sums.get(k, 0.0) + v.detach()
        self._count += 1
        return loss


def _same_rows(what: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ModelError(f"distillation {what}: the student gave shape {tuple(student.shape)} and the teacher "
                         f"{tuple(teacher.shape)}; they must match row for row")


def make_kd_loss_fn(teacher: nn.Module | Callable[[], nn.Module] | None, student: nn.Module,
                    weights: KDWeights | Mapping[str, float] | None = None, **kwargs: Any) -> KDLoss:
    """A :class:`KDLoss` to pass as ``train(callbacks=[kd])`` (or as ``loss_fn``, then call
    ``attach(student)`` before training when a hidden-state loss is on)."""
    return KDLoss(teacher, student, weights, **kwargs)
