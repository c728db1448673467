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

Dropping layers: a block pruned to almost nothing still costs its fixed per-layer work (two
LayerNorms, residual adds, the attention softmax, a few kernel calls), which the linear FLOPs do
not count and which weighs most on single sentences (MiniLM-L6 / SST-2 at a quarter of the
FLOPs, docs/results.md: dropping its three late blocks made the stack 1.33x faster on one
sentence, 1.14x on batches of 32). With ``drop_layers_below: f``, a block whose kept linear FLOPs
are under ``f`` of an unpruned block's is removed whole, and the choice is made again over the
remaining blocks with the same FLOPs budget (so what the dropped block held goes to the others);
repeated until no block is under ``f``. Its recovery is left to ``finetune``: removing a block
is not exact (it also drops the block's LayerNorms and biases).

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
from stackcomp.distill.students import cut_student
from stackcomp.errors import PassError, PlanError
from stackcomp.factorize.flops import KeptUnits, block_flops, choose_kept, encoder_flops
from stackcomp.nn.pruning import CONFIG_KEY, Block, blocks, masked, remove_units
from stackcomp.passes.base import KEY_OMIT_DEFAULT, Analysis, Pass, PassContext, PassParams
from stackcomp.train import TrainConfig, train_on_task


class PruneStructuredParams(PassParams):
    target_flops: float = Field(gt=0, le=1, description="fraction of the encoder's linear FLOPs kept (0 < f <= 1)")
    heads: bool = Field(default=True, description="prune attention heads")
    neurons: bool = Field(default=True, description="prune FFN neurons")
    heads_per_layer_min: int = Field(default=1, ge=1, description="heads every block keeps")
    neuron_multiple: int = Field(default=1, ge=1, description="every FFN width kept is a multiple of this "
                                 "(e.g. a block size of ds_factorize); neurons are pruned in groups of it")
    drop_layers_below: float = Field(default=0.0, ge=0, lt=1, description="remove a block whole when its kept linear "
                                     "FLOPs are under this fraction of an unpruned block's (0: never); the budget "
                                     "goes to the other blocks", json_schema_extra=KEY_OMIT_DEFAULT)
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
        hidden, head_size = found[0].linears["query"].in_features, found[0].head_size
        total = encoder_flops(hidden, head_size, [b.heads for b in found], [b.neurons for b in found])
        kept, dropped = self.choose_with_drops(found, head_scores, neuron_scores, total)
        per_block = dict(zip([i for i in range(len(found)) if i not in dropped], zip(kept.heads, kept.neurons)))
        report = {
            "target_flops": p.target_flops,
            "flops_per_token": {"before": total, "after": kept.flops, "budget": int(p.target_flops * total)},
            "kept_flops": kept.flops / total,
            "blocks": {b.name: {"heads": [b.heads, len(heads)], "neurons": [b.neurons, len(neurons)],
                                "pruned_heads": sorted(set(range(b.heads)) - set(heads)),
                                **({"dropped": True} if i in dropped else {})}
                       for i, b in enumerate(found) for heads, neurons in [per_block.get(i, ([], []))]},
        }
        if p.drop_layers_below:
            report["dropped_layers"] = dropped
        ctx.log.info("prune_structured: keeps %.3f of the encoder's linear FLOPs (target %.3f)",
                     report["kept_flops"], p.target_flops)
        if dropped:
            ctx.log.info("prune_structured: drops blocks %s (under %.3f of a block's FLOPs)", dropped,
                         p.drop_layers_below)
        return Analysis(report=report, state={"kept": kept, "dropped": dropped})

    def choose_with_drops(self, found: list[Block], head_scores: list[torch.Tensor],
                          neuron_scores: list[torch.Tensor], total: int) -> tuple[KeptUnits, list[int]]:
        """The choice over the blocks left after dropping those under ``drop_layers_below``, with the
        whole model's budget; returns it (for the blocks left, in order) and the dropped indices."""
        p = self.params
        hidden, head_size = found[0].linears["query"].in_features, found[0].head_size
        dropped: list[int] = []
        while True:
            left = [i for i in range(len(found)) if i not in dropped]
            if not left:
                raise PassError(f"prune_structured: drop_layers_below={p.drop_layers_below} drops every block")
            left_total = encoder_flops(hidden, head_size, [found[i].heads for i in left],
                                       [found[i].neurons for i in left])
            target = min(1.0, p.target_flops * total / left_total)
            kept = self.choose([found[i] for i in left], [head_scores[i] for i in left],
                               [neuron_scores[i] for i in left], target=target)
            small = [i for i, h, n in zip(left, kept.heads, kept.neurons, strict=True)
                     if block_flops(hidden, head_size, len(h), len(n))
                     < p.drop_layers_below * block_flops(hidden, head_size, found[i].heads, found[i].neurons)]
            if not small:
                return kept, dropped
            dropped = sorted([*dropped, *small])

    def choose(self, found: list[Block], head_scores: list[torch.Tensor], neuron_scores: list[torch.Tensor],
               target: float | None = None) -> Any:
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
                               head_size=found[0].head_size, target=p.target_flops if target is None else target,
                               heads_min=heads_min, neuron_multiple=multiple)
        except ValueError as e:
            raise PassError(f"prune_structured: {e}") from None

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        state = ctx.analysis.state if ctx.analysis.state.get("kept") is not None else self.analyze(model, ctx).state
        kept, dropped = state["kept"], state.get("dropped", [])
        if dropped:  # the blocks left, renumbered, with the config's depth (a copy: as a cut student is made)
            model, _ = cut_student(model, [i for i in range(len(blocks(model, self.name))) if i not in dropped])
        remove_units(model, kept.heads, kept.neurons, self.name)
        if dropped:
            getattr(model.config, CONFIG_KEY)["dropped_layers"] = dropped  # provenance: original indices
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
