"""``prune_structured``: remove attention heads and FFN neurons to a FLOPs target, then recover with KD.

Importance (``analyze``): a mask variable, all ones, multiplies each head's output and each FFN
neuron's activation (:func:`stackcomp.nn.pruning.masked`); the importance of a head or neuron
is the squared gradient of the task loss with respect to its mask, summed over
``importance_batches`` training batches: the Fisher information of the mask, which estimates
the loss increase of setting it to zero (Michel et al. 2019, "Are Sixteen Heads Really Better
than One?"; Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers").

Choice: ``target_flops`` is the fraction of the encoder's linear FLOPs kept, computed from
shapes (:mod:`stackcomp.factorize.flops`); the heads and neurons kept are those of most total
importance that fit (Kwon et al.'s mask search under a FLOPs constraint), with at least
``heads_per_layer_min`` heads per block. The reached fraction is at most the target and within
one head (or ``neuron_multiple`` neurons) of it.

``transform`` removes the rest: the linears are sliced and stay plain ``nn.Linear``, so
``ds_factorize``, ``int8`` and ``pack`` stack on top; the kept counts are recorded in the config
so the saved model loads again. ``finetune`` (``train:``; none with ``epochs: 0``) recovers
accuracy on the task, by distillation from ``teacher`` when one is given.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from stackcomp.distill.kd import KDLoss, KDWeights
from stackcomp.errors import PassError, PlanError
from stackcomp.factorize.flops import choose_kept, encoder_flops
from stackcomp.nn.pruning import Block, blocks, masked, remove_units
from stackcomp.passes.base import Analysis, Pass, PassContext, PassParams
from stackcomp.train import TrainConfig, train_on_task


class PruneStructuredParams(PassParams):
    target_flops: float = Field(gt=0, le=1, description="fraction of the encoder's linear FLOPs kept (0 < f <= 1)")
    heads: bool = Field(default=True, description="prune attention heads")
    neurons: bool = Field(default=True, description="prune FFN neurons")
    heads_per_layer_min: int = Field(default=1, ge=1, description="heads every block keeps")
    neuron_multiple: int = Field(default=1, ge=1, description="every FFN width kept is a multiple of this "
                                 "(e.g. a block size of ds_factorize); neurons are pruned in groups of it")
    importance_batches: int = Field(default=32, ge=1, description="training batches the mask gradients are summed over")
    importance_batch_size: int = Field(default=32, ge=1, description="sentences per importance batch")
    train: TrainConfig = Field(default_factory=TrainConfig, description="recovery training after pruning "
                               "(epochs: 0 for none)")
    teacher: str | None = Field(default=None, description="recover by distillation from this teacher "
                                "(stage name or model id)")
    kd: KDWeights = Field(default_factory=KDWeights, description="distillation loss weights, with teacher")
    kd_temperature: float = Field(default=2.0, gt=0, description="softmax temperature of the soft losses")


class PruneStructuredPass(Pass):
    """Prune attention heads and FFN neurons by mask-gradient importance to a FLOPs target; recover with KD."""

    name = "prune_structured"
    version = "1"
    Params = PruneStructuredParams
    needs = frozenset({"task"})
    teacher_param = "teacher"
    forbid_after: ClassVar[dict[str, str]] = {p: "prune the fp32 nn.Linear layers first, then compress what is left"
                    for p in ("ds_factorize", "int8", "pack", "lowrank", "blocklr", "losparse", "dsf")}

    def analyze(self, model: nn.Module, ctx: PassContext) -> Analysis:
        """Mask importance of every head and neuron, and the choice for the FLOPs target."""
        p = self.params
        found = blocks(model, self.name)
        if ctx.data is None:
            raise PlanError(f"stage {ctx.stage!r}: prune_structured needs the task's training data for importance; "
                            "set `task:` in the recipe")
        loader = ctx.data.train_loader(p.importance_batch_size, seed=ctx.seed)
        head_scores, neuron_scores = mask_importance(model, found, loader, p.importance_batches, task=ctx.task)
        kept = self.choose(found, head_scores, neuron_scores)
        total = encoder_flops(found[0].linears["query"].in_features, found[0].head_size,
                              [b.heads for b in found], [b.neurons for b in found])
        report = {
            "target_flops": p.target_flops,
            "flops_per_token": {"before": total, "after": kept.flops, "budget": kept.budget},
            "kept_flops": kept.flops / total,
            "blocks": {b.name: {"heads": [b.heads, len(h)], "neurons": [b.neurons, len(n)],
                                "pruned_heads": sorted(set(range(b.heads)) - set(h))}
                       for b, h, n in zip(found, kept.heads, kept.neurons, strict=True)},
        }
        ctx.log.info("prune_structured: keeps %.3f of the encoder's linear FLOPs (target %.3f)",
                     report["kept_flops"], p.target_flops)
        return Analysis(report=report, state={"kept": kept})

    def choose(self, found: list[Block], head_scores: list[torch.Tensor], neuron_scores: list[torch.Tensor]) -> Any:
        p = self.params
        heads_min = p.heads_per_layer_min if p.heads else max(b.heads for b in found)
        if p.heads and any(b.heads < p.heads_per_layer_min for b in found):
            few = next(b for b in found if b.heads < p.heads_per_layer_min)
            raise PassError(f"prune_structured: heads_per_layer_min={p.heads_per_layer_min} but {few.name} has "
                            f"{few.heads} heads")
        multiple = p.neuron_multiple if p.neurons else max(b.neurons for b in found)
        if p.neurons and any(b.neurons % p.neuron_multiple for b in found):
            odd = next(b for b in found if b.neurons % p.neuron_multiple)
            raise PassError(f"prune_structured: neuron_multiple={p.neuron_multiple} does not divide the FFN width "
                            f"{odd.neurons} of {odd.name}")
        if not p.neurons and len({b.neurons for b in found}) > 1:
            raise PassError("prune_structured: neurons: false needs equal FFN widths in every block")
        try:
            return choose_kept(head_scores, neuron_scores, hidden=found[0].linears["query"].in_features,
                               head_size=found[0].head_size, target=p.target_flops, heads_min=heads_min,
                               neuron_multiple=multiple)
        except ValueError as e:
            raise PassError(f"prune_structured: {e}") from None

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        kept = ctx.analysis.state.get("kept")
        if kept is None:  # called without analyze (a direct call)
            kept = self.analyze(model, ctx).state["kept"]
        remove_units(model, kept.heads, kept.neurons, self.name)
        ctx.report["parameters_after"] = sum(q.numel() for q in model.parameters())
        return model

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        p = self.params
        if p.train.epochs == 0 and p.train.max_steps is None:
            return model
        callbacks = []
        kd = None
        if p.teacher:
            kd = KDLoss(ctx.teacher, model, p.kd, temperature=p.kd_temperature, log=ctx.log, task=ctx.task)
            callbacks.append(kd)
        model = train_on_task(model, ctx, p.train, callbacks=callbacks).model
        if kd is not None:
            ctx.report["kd"] = {"weights": p.kd.active(), "temperature": p.kd_temperature, **kd.summary()}
        return model


def mask_importance(model: nn.Module, found: list[Block], batches: Any, n_batches: int,
                    task: Any = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block, the summed squared gradient of the task loss w.r.t. each head mask and each
    neuron mask (all ones), over ``n_batches`` batches; model in eval mode, weights untouched."""
    device = next(model.parameters()).device
    head_masks = [torch.ones(b.heads, device=device, requires_grad=True) for b in found]
    neuron_masks = [torch.ones(b.neurons, device=device, requires_grad=True) for b in found]
    head_scores = [torch.zeros(b.heads, dtype=torch.float64) for b in found]
    neuron_scores = [torch.zeros(b.neurons, dtype=torch.float64) for b in found]
    flags = {id(q): q.requires_grad for q in model.parameters()}
    was_training = model.training
    model.eval()
    seen = 0
    try:
        model.requires_grad_(False)
        with masked(found, head_masks, neuron_masks):
            for batch in batches:
                if seen >= n_batches:
                    break
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if task is not None:
                    loss = task.kd_outputs(model, batch)["loss"]
                else:
                    out = model(**batch)
                    loss = out["loss"] if isinstance(out, dict) else out.loss
                if loss is None:
                    raise PlanError("prune_structured: importance needs labelled batches (the model returned no loss)")
                grads = torch.autograd.grad(loss, [*head_masks, *neuron_masks], allow_unused=True)
                for score, g in zip([*head_scores, *neuron_scores], grads, strict=True):
                    if g is not None:
                        score += g.detach().double().cpu() ** 2
                seen += 1
    finally:
        for q in model.parameters():
            q.requires_grad_(flags[id(q)])
        model.train(was_training)
    if seen == 0:
        raise PlanError("prune_structured: importance got no training batches")
    return head_scores, neuron_scores
