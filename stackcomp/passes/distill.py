"""``distill``: train a smaller student against a teacher (DistilBERT- and TinyBERT-style).

``transform`` makes the student: cut from the stage's input model (put the stage after the
teacher stage to cut from the teacher), a fresh model from a config, or a model id/folder.
``finetune`` trains it on the task with the weighted losses of :mod:`stackcomp.distill.kd`,
jointly, or in two phases as TinyBERT does: the intermediate losses (attention maps, hidden
states) first, with no evaluation, then the prediction-layer losses with the usual evaluation
and best checkpoint. The teacher (an upstream stage or a model id, ``params.teacher``) is
supplied by the engine: an upstream stage's model comes from its artifact or memory, never
re-trained. With only the hard-label loss the teacher is never loaded: that is the no-KD
baseline on the same loop and steps. ``augment`` adds perturbed copies of the training examples
that only the teacher's losses learn from (:mod:`stackcomp.data.augment`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from stackcomp.data.augment import AugmentOptions
from stackcomp.distill.kd import INTERMEDIATE, PREDICTION, KDLoss, KDWeights
from stackcomp.distill.students import cut_student, student_from_config, student_from_pretrained
from stackcomp.passes.base import KEY_INLINE, KEY_OMIT_DEFAULT, Pass, PassContext, PassParams
from stackcomp.train import TrainConfig, train, train_on_task, training_batches


class CutSpec(PassParams):
    layers: list[int] | None = Field(default=None, description="0-based layers to keep (default every other one)")
    num_layers: int | None = Field(default=None, ge=1, description="keep this many evenly spaced layers")
    hidden_size: int | None = Field(default=None, ge=1, description="must equal the teacher's width if given: "
                                    "cutting cannot narrow a model (use config for that)")


class StudentSpec(PassParams):
    """Exactly one of cut / config / model; none given means a cut keeping every other layer."""

    cut: CutSpec | None = Field(default=None, description="DistilBERT-style: layers copied from the input model")
    config: dict[str, Any] | None = Field(default=None, description="TinyBERT-style fresh model: model_type + "
                                          "config fields, e.g. {model_type: bert, num_hidden_layers: 4, "
                                          "hidden_size: 312, intermediate_size: 1200, num_attention_heads: 12}")
    model: str | None = Field(default=None, description="a model id or folder (same tokenizer as the recipe's)")

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in ("cut", "config", "model") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of cut, config, model; got {', '.join(given)}")
        return self


class IntermediatePhase(PassParams):
    epochs: float = Field(default=1.0, gt=0, description="epochs of intermediate-layer distillation")
    max_steps: int | None = Field(default=None, ge=1, description="steps; overrides epochs when set")
    lr: float | None = Field(default=None, gt=0, description="peak learning rate (default: lr)")


class DistillParams(PassParams):
    """What to distil into, how, and the training loop's settings under ``train:`` (flat keys such
    as ``lr: 1e-4`` are accepted too)."""

    teacher: str | None = Field(default=None, description="an upstream stage name or a model id")
    student: StudentSpec = Field(default_factory=StudentSpec, description="one of cut: {layers | num_layers}, "
                                 "config: {model_type, ...}, model: id-or-folder; default: cut every other layer")
    weights: KDWeights = Field(default_factory=KDWeights, description="loss weights: soft, hard, pred, cosine, "
                               "attention, hidden (0 turns one off)")
    temperature: float = Field(default=2.0, gt=0, description="softmax temperature of soft/pred losses")
    layer_map: list[int] | None = Field(default=None, description="teacher layer (1-based) for each student layer; "
                                        "default uniform (TinyBERT's g(m) = m*N/M)")
    schedule: Literal["joint", "two_phase"] = Field(default="joint", description="two_phase: intermediate losses "
                                                    "first, then the prediction-layer losses (TinyBERT)")
    intermediate: IntermediatePhase = Field(default_factory=IntermediatePhase, description="two_phase: phase 1")
    cache_teacher_logits: bool = Field(default=False, description="keep teacher logits across epochs (only when no "
                                       "intermediate loss needs the teacher's hidden states)")
    augment: AugmentOptions | None = Field(default=None, description="add teacher-labelled perturbed copies of "
                                           "each training example (masking, n-grams; stackcomp.data.augment): "
                                           "{copies, mask_prob, ngram_prob, ngram_max, seed}",
                                           json_schema_extra=KEY_OMIT_DEFAULT)
    train: TrainConfig = Field(default_factory=TrainConfig, json_schema_extra=KEY_INLINE,
                               description="training loop settings (stackcomp.train.TrainConfig)")

    @model_validator(mode="after")
    def _schedule(self):
        w = self.weights
        if not w.active():
            raise ValueError("weights: all zero; set at least one loss weight")
        if self.schedule == "two_phase":
            if not any(getattr(w, k) > 0 for k in INTERMEDIATE):
                raise ValueError(f"schedule two_phase needs an intermediate loss weight ({', '.join(INTERMEDIATE)})")
            if not any(getattr(w, k) > 0 for k in PREDICTION):
                raise ValueError(f"schedule two_phase needs a prediction loss weight ({', '.join(PREDICTION)})")
        if self.augment is not None and not any(getattr(w, k) > 0 for k in ("soft", "pred", *INTERMEDIATE)):
            raise ValueError("augment: the perturbed copies have no gold label and learn only from the teacher; "
                             "set a teacher loss weight (soft, pred, cosine, attention or hidden)")
        return self


class DistillPass(Pass):
    """Distil the teacher into a student (cut, from config, or a model) with KD and TinyBERT losses."""

    name = "distill"
    version = "1"
    Params = DistillParams
    needs = frozenset({"task", "teacher"})
    teacher_param = "teacher"

    def analyze(self, model: nn.Module, ctx: PassContext) -> dict:
        return {"input_parameters": sum(q.numel() for q in model.parameters()),
                "input_layers": getattr(model.config, "num_hidden_layers", None)}

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        spec = self.params.student
        if spec.model is not None:
            student, note = student_from_pretrained(spec.model, ctx.task, ctx.tokenizer)
            student = student.to(next(model.parameters()).device)
        elif spec.config is not None:
            student, note = student_from_config(spec.config, model, seed=self.params.train.seed, task=ctx.task)
        else:
            cut = spec.cut or CutSpec()
            student, note = cut_student(model, cut.layers, count=cut.num_layers, hidden_size=cut.hidden_size)
        note["parameters"] = sum(q.numel() for q in student.parameters())
        ctx.report["student"] = note
        ctx.log.info("student (%s): %s layers, width %s, %d parameters", note["kind"], note["layers"],
                     note["hidden_size"], note["parameters"])
        return student

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        p = self.params
        config = p.train
        weights = p.weights
        common = dict(temperature=p.temperature, layer_map=p.layer_map, log=ctx.log, task=ctx.task)
        if p.schedule == "two_phase":
            phase1 = config.model_copy(update={
                "epochs": p.intermediate.epochs, "max_steps": p.intermediate.max_steps,
                "lr": p.intermediate.lr or config.lr, "eval_every": None, "keep_best": False})
            kd1 = KDLoss(ctx.teacher, model, weights.only(INTERMEDIATE), **common)
            ctx.log.info("phase 1: intermediate-layer distillation (%s)", ", ".join(weights.only(INTERMEDIATE).active()))
            loader = training_batches(ctx, config, augment=p.augment, has_loss=True)
            r1 = train(model, loader, phase1, callbacks=[kd1], progress=ctx.progress, log=ctx.log)
            model = r1.model
            ctx.report["intermediate"] = {"steps": r1.steps, "seconds": r1.seconds, "history": r1.history,
                                          "layer_map": kd1.layer_map, **kd1.summary()}
            ctx.metrics.update(intermediate_steps=r1.steps, intermediate_seconds=r1.seconds)
            weights = weights.only(PREDICTION)
        kd = KDLoss(ctx.teacher, model, weights, cache_teacher_logits=p.cache_teacher_logits, **common)
        result = train_on_task(model, ctx, config, augment=p.augment, callbacks=[kd])
        ctx.report["kd"] = {"weights": weights.active(), "temperature": p.temperature, "layer_map": kd.layer_map,
                            **kd.summary()}
        return result.model
