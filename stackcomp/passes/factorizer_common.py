"""What the factorizer passes share: params, layer selection, calibration statistics, the
equal-budget plan, per-layer reports, staged factorization and the final fine-tune.

A factorizer pass (``lowrank``, ``blocklr``, ``losparse``, ``dsf``) subclasses
:class:`FactorizerPass` and says only what is its own: the size knob of one layer and its
exact byte cost (:meth:`FactorizerPass.knob`), the knob from its native params
(:meth:`FactorizerPass.native_knob`) and how to build the compressed layer
(:meth:`FactorizerPass.build_layer`). The base class does the rest:

* ``ratio``: one budget, ``sum(dense bytes of the targeted layers) / ratio``, spent over all
  layers by :func:`stackcomp.factorize.allocate.allocate`, so the reached ratio is the asked
  one to within a knob step (bytes counted exactly as ``layer.storage()`` counts them);
* calibration: the Gram ``X^T X`` of each targeted layer's inputs over
  ``calibration_samples`` training sentences (padding tokens left out), collected by forward
  hooks; layers that read the same tensor (q, k, v) share one Gram. ``sequential`` methods
  (DSF) collect each layer's inputs from the model whose earlier layers are already
  compressed, so compressed outputs feed the next layer;
* Fisher: the squared task gradient of each targeted weight, averaged over ``fisher_batches``
  training batches (no optimizer step), summed per output row (FWSVD);
* reports: per layer the knob, exact bytes and ratio, the relative weight error
  ``||W - What|| / ||W||`` and, with calibration data, the relative output error
  ``||(W - What) X^T|| / ||W X^T||``;
* ``staged: true`` (Gupta et al.): layers are factorized group by group (``stage_by``: one
  linear, or one transformer block, at a time), each group from the weights as the previous
  short fine-tunes (``stage_train``) left them; the pass's ``train`` fine-tune follows the
  last group. Otherwise all layers are factorized at once from the input model.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from stackcomp.errors import PlanError
from stackcomp.factorize.allocate import Knob, allocate
from stackcomp.passes.base import Analysis, Pass, PassContext, PassParams
from stackcomp.targets import select_modules, set_module, why_none_selected
from stackcomp.train import TrainConfig, train, train_on_task

__all__ = [
    "FactorizerTrainConfig",
    "StageTrainConfig",
    "FactorizerParams",
    "FactorizerPass",
    "select_targets",
    "group_layers",
    "collect_grams",
    "collect_fisher",
    "relative_errors",
    "dense_bytes_of",
]


# ----------------------------------------------------------------------------- params


#: the fine-tune after factorization (0 epochs and no max_steps: none): the one TrainConfig
FactorizerTrainConfig = TrainConfig


class StageTrainConfig(TrainConfig):
    """The short fine-tune after each group in staged mode (no evaluation)."""

    epochs: float = Field(default=0.05, gt=0, description="epochs after each group (max_steps overrides)")
    keep_best: bool = Field(default=False, description="no evaluation between groups, so nothing to pick")


class FactorizerParams(PassParams):
    """Params every factorizer takes; subclasses add their native knobs."""

    ratio: float | None = Field(default=None, gt=1, description="target compression of the targeted layers "
                                "together: sum of dense fp32 bytes / sum of compressed bytes (values and indices "
                                "at their stored widths); replaces the native size knobs")
    targets: list[str] | None = Field(default=None, description="module globs / re: patterns "
                                      "(default: encoder linears)")
    ignore: list[str] | None = Field(default=None, description="patterns left dense (default: heads, embeddings)")
    calibration_samples: int = Field(default=128, ge=0, description="training sentences whose activations give "
                                     "each layer's input Gram (data-aware methods, output-error reports; 0: none)")
    calibration_batch_size: int = Field(default=32, ge=1)
    staged: bool = Field(default=False, description="factorize group by group with a short fine-tune after each "
                         "(Gupta et al.); false: all layers at once")
    stage_by: Literal["layer", "block"] = Field(default="block", description="staged groups: one linear, or all "
                                                "targeted linears of one transformer block")
    stage_train: StageTrainConfig = Field(default_factory=StageTrainConfig, description="fine-tune after each group")
    train: FactorizerTrainConfig = Field(default_factory=FactorizerTrainConfig, description="fine-tune at the end")


def _need_exactly_one(params: PassParams, native: dict[str, Any], what: str) -> None:
    """``ratio`` or the native knobs, not both, not neither (raises ValueError for pydantic)."""
    given = [k for k, v in native.items() if v is not None]
    if params.ratio is None and not given:
        raise ValueError(f"give either ratio, or {what}")
    if params.ratio is not None and given:
        raise ValueError(f"give either ratio or {', '.join(given)}, not both")


# ----------------------------------------------------------------------------- one stage's work


@dataclass
class FactorizerWork:
    """One stage's factorization from ``analyze`` to ``finetune``: handed over in
    ``ctx.analysis.state["work"]``, never kept on the pass."""

    names: list[str]
    knobs: dict[str, int] = field(default_factory=dict)
    built: dict[str, Built] = field(default_factory=dict)
    #: calibration batches, drawn once per stage
    calibration: list[dict[str, torch.Tensor]] | None = None
    #: what a subclass adds to the plan (LoSparse: row widths and the keep fraction)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- layers


def select_targets(model: nn.Module, targets: Iterable[str] | None, ignore: Iterable[str] | None,
                   pass_name: str) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers a pass compresses; PlanError naming the patterns when none match."""
    layers = list(select_modules(model, targets, ignore))
    if not layers:
        raise PlanError(f"{pass_name}: no linear layer matches {why_none_selected(model, targets, ignore)}")
    return layers


_INDEX = re.compile(r"^\d+$")


def group_layers(names: list[str], by: str) -> list[list[str]]:
    """Staged groups in model order: each name alone (``layer``), or names sharing the path up to
    their first numeric component, e.g. ``bert.encoder.layer.3`` (``block``)."""
    if by == "layer":
        return [[n] for n in names]
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        cut = next((i for i, p in enumerate(parts) if _INDEX.match(p)), None)
        key = ".".join(parts[: cut + 1]) if cut is not None else n
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def dense_bytes_of(lin: nn.Linear) -> float:
    """The fp32 bytes of a dense linear (weight + bias): the reference of every ratio."""
    return float((lin.out_features * lin.in_features + (lin.out_features if lin.bias is not None else 0)) * 4)


# ----------------------------------------------------------------------------- calibration


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted inputs are captured."""


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def collect_grams(model: nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]],
                  stop_early: bool = False) -> dict[str, torch.Tensor]:
    """``X^T X`` (in x in, float64, CPU) of each named layer's inputs over the batches.

    Padding tokens (``attention_mask == 0``) are left out. Layers reading the same input tensor
    (q, k, v) share one Gram (the same tensor object). A layer called several times per forward
    (ALBERT's shared layer) accumulates every call. With ``stop_early`` the forward stops right
    after the first named layer has run, which is enough when all named layers share that input.
    """
    device = _model_device(model)
    grams: dict[str, torch.Tensor] = {}
    slot_of: dict[str, str] = {}  # layer -> the layer whose Gram it uses
    state: dict[str, Any] = {"mask": None, "seen": []}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            # inputs seen in this batch are kept alive, so identity cannot be confused by a reused address
            first = next((n for t, n in state["seen"] if t is x), None)
            if first is None:
                state["seen"].append((x, name))
                first = name
            slot_of.setdefault(name, first)
            if first != name:
                return  # the same tensor as an earlier layer's input: that layer's Gram counts it
            mask = state["mask"]
            x2 = x.reshape(-1, x.shape[-1])
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x2 = x2[mask.reshape(-1).bool()]
            xf = x2.float()
            g = (xf.T @ xf).to("cpu", torch.float64)
            if name in grams:
                grams[name] += g
            else:
                grams[name] = g
            if stop_early:
                raise _Stop

        return fn

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            b = _to(batch, device)
            b.pop("labels", None)
            state["mask"] = b.get("attention_mask")
            state["seen"] = []
            try:
                model(**b)
            except _Stop:
                pass
    finally:
        state["seen"] = []
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: grams[slot_of[n]] for n in names if n in slot_of and slot_of[n] in grams}


def forward_order(model: nn.Module, names: list[str], batch: dict[str, torch.Tensor]) -> tuple[list[list[str]], bool]:
    """Named layers in the order a forward calls them, grouped by shared input tensor, and
    whether any is called more than once (shared layers) -- from one forward on ``batch``.
    Layers the forward never calls come last, one per group."""
    calls: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            calls.append((name, inputs[0]))

        return fn

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            b = _to(batch, _model_device(model))
            b.pop("labels", None)
            model(**b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    repeated = len({n for n, _ in calls}) < len(calls)
    groups: list[tuple[torch.Tensor, list[str]]] = []
    placed: set[str] = set()
    for n, x in calls:
        if n in placed:
            continue
        placed.add(n)
        for t, members in groups:
            if t is x:
                members.append(n)
                break
        else:
            groups.append((x, [n]))
    calls.clear()
    return [m for _, m in groups] + [[n] for n in names if n not in placed], repeated


def collect_fisher(model: nn.Module, names: list[str], batches: Iterable[dict[str, torch.Tensor]],
                   n_batches: int, task: Any = None) -> dict[str, torch.Tensor]:
    """Per output row, the Fisher information ``sum_j E[(dL/dW_ij)^2]`` of each named layer's weight,
    estimated as the mean squared batch gradient over ``n_batches`` (as in the FWSVD authors'
    script), model in eval mode (no dropout), no optimizer step. Returns (out,) float64 tensors.
    ``task`` (a stackcomp.tasks.Task) gives the loss of a kind whose model returns none itself
    (a bi-encoder's CoSENT); default: the model's own ``loss``."""
    device = _model_device(model)
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    sums = {n: torch.zeros(w.shape[0], dtype=torch.float64) for n, w in weights.items()}
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            if seen >= n_batches:
                break
            for w in weights.values():
                w.grad = None
            if task is not None:
                loss = task.kd_outputs(model, _to(batch, device))["loss"]
            else:
                out = model(**_to(batch, device))
                loss = out["loss"] if isinstance(out, dict) else out.loss
            if loss is None:
                raise PlanError("Fisher estimation needs labelled batches (the model returned no loss)")
            loss.backward()
            for n, w in weights.items():
                if w.grad is not None:
                    sums[n] += (w.grad.detach().double() ** 2).sum(dim=1).cpu()
            seen += 1
    finally:
        for w in weights.values():
            w.grad = None
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    if seen == 0:
        raise PlanError("Fisher estimation got no training batches")
    return {n: s / seen for n, s in sums.items()}


def relative_errors(W: torch.Tensor, What: torch.Tensor, gram: torch.Tensor | None) -> dict[str, float | None]:
    """``weight_error = ||W - What||_F / ||W||_F`` and, given ``gram = X^T X``,
    ``output_error = ||(W - What) X^T||_F / ||W X^T||_F`` (None without a Gram)."""
    W = W.detach().double().cpu()
    E = What.detach().double().cpu() - W
    wn = float(W.norm())
    out: dict[str, float | None] = {"weight_error": float(E.norm()) / wn if wn > 0 else 0.0, "output_error": None}
    if gram is not None:
        H = gram.double()
        num = float(((E @ H) * E).sum())
        den = float(((W @ H) * W).sum())
        out["output_error"] = math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
    return out


# ----------------------------------------------------------------------------- the pass base


@dataclass
class LayerStats:
    """Calibration statistics one layer's factorization may use."""

    gram: torch.Tensor | None = None
    fisher: torch.Tensor | None = None


@dataclass
class Built:
    """A compressed layer ready to install, and what the report says about it."""

    layer: nn.Module
    row: dict[str, Any] = field(default_factory=dict)
    #: the statistics it was built from (kept until analyze has reported)
    stats: LayerStats | None = None


class FactorizerPass(Pass):
    """Base of the factorizer passes: targeting, budget, calibration, staged mode, reports, fine-tune."""

    Params: ClassVar[type[FactorizerParams]] = FactorizerParams
    forbid_after = {"int8": "factorize the fp32 weights first, then quantize the factors"}

    # ------------------------------------------------------------------ what a subclass says

    def knob(self, name: str, lin: nn.Linear, share: float) -> Knob:
        """The layer's size knob for the ratio solver (``cost`` equal to the built layer's bytes)."""
        raise NotImplementedError

    def native_knob(self, name: str, lin: nn.Linear) -> int:
        """The knob from the native params (used when ``ratio`` is not given)."""
        raise NotImplementedError

    def build_layer(self, name: str, lin: nn.Linear, k: int, stats: LayerStats) -> Built:
        """Factorize ``lin`` at knob ``k``; ``row`` holds method-specific report fields."""
        raise NotImplementedError

    def uses_gram(self) -> Literal["no", "optional", "required"]:
        """Whether factorization needs calibration Grams (reports use them whenever available)."""
        return "no"

    def uses_fisher(self) -> bool:
        return False

    def sequential(self) -> bool:
        """True: each layer's Gram comes from the model whose earlier layers are already compressed."""
        return False

    # ------------------------------------------------------------------ shared machinery

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        return select_targets(model, self.params.targets, self.params.ignore, self.name)

    def _plan(self, layers: list[tuple[str, nn.Linear]], work: FactorizerWork) -> dict[str, int]:
        """Each layer's size knob; a subclass may keep more of its plan in ``work.extra``."""
        p = self.params
        if p.ratio is None:
            return {n: self.native_knob(n, lin) for n, lin in layers}
        budget = sum(dense_bytes_of(lin) for _, lin in layers) / p.ratio
        return allocate([self.knob(n, lin, dense_bytes_of(lin) / p.ratio) for n, lin in layers], budget)

    def _calibration(self, ctx: PassContext, work: FactorizerWork) -> list[dict[str, torch.Tensor]] | None:
        p = self.params
        if ctx.data is None or p.calibration_samples == 0:
            if self.uses_gram() == "required":
                raise PlanError(f"stage {ctx.stage!r}: {self._method_label()} needs calibration activations: set "
                                "`task:` in the recipe and calibration_samples > 0")
            return None
        if work.calibration is None:
            work.calibration = ctx.data.calibration_batches(p.calibration_samples, p.calibration_batch_size,
                                                            seed=ctx.seed)
        return work.calibration

    def _fisher(self, model: nn.Module, names: list[str], ctx: PassContext) -> dict[str, torch.Tensor]:
        p = self.params
        if ctx.data is None:
            raise PlanError(f"stage {ctx.stage!r}: {self._method_label()} needs the task's training data for the "
                            "Fisher information; set `task:` in the recipe")
        loader = ctx.data.train_loader(p.fisher_batch_size, seed=ctx.seed)
        return collect_fisher(model, names, loader, p.fisher_batches, task=ctx.task)

    def _method_label(self) -> str:
        method = getattr(self.params, "method", None)
        return f"{self.name} (method {method})" if method else self.name

    def _build(self, model: nn.Module, names: list[str], ctx: PassContext, work: FactorizerWork, install: bool,
               bar_label: str = "factorize") -> dict[str, Built]:
        """Factorize the named layers of ``model``. With ``install`` they replace the dense ones in
        ``model``; sequential methods install as they go (on a copy when ``install`` is False)."""
        calib = self._calibration(ctx, work)
        built: dict[str, Built] = {}
        if self.sequential() and calib is not None:
            target = model if install else copy.deepcopy(model)
            order, repeated = forward_order(target, names, calib[0])
            with ctx.progress.bar(bar_label, total=len(names)) as bar:
                for group in order:
                    grams = collect_grams(target, group, calib, stop_early=not repeated)
                    for n in group:  # a group shares one input tensor, so one Gram (stop_early sees only the first)
                        lin = target.get_submodule(n)
                        built[n] = self._build_one(n, lin, LayerStats(gram=grams.get(n, grams.get(group[0]))), work)
                        set_module(target, n, built[n].layer)
                        bar.advance()
            return built
        grams = collect_grams(model, names, calib) if calib is not None else {}
        fisher = self._fisher(model, names, ctx) if self.uses_fisher() else {}
        with ctx.progress.bar(bar_label, total=len(names)) as bar:
            for n in names:
                lin = model.get_submodule(n)
                built[n] = self._build_one(n, lin, LayerStats(gram=grams.get(n), fisher=fisher.get(n)), work)
                bar.advance()
        if install:
            for n, b in built.items():
                set_module(model, n, b.layer)
        return built

    def _build_one(self, name: str, lin: nn.Linear, stats: LayerStats, work: FactorizerWork) -> Built:
        b = self.build_layer(name, lin, work.knobs[name], stats)
        b.layer = b.layer.to(lin.weight.device)
        st = b.layer.storage()
        row = {"shape": [lin.out_features, lin.in_features], **b.row, "bytes": st.bytes,
               "dense_bytes": dense_bytes_of(lin), "ratio": dense_bytes_of(lin) / st.bytes}
        errs = self.layer_errors(lin, b.layer, stats.gram)
        row.update({k: v for k, v in errs.items() if v is not None})
        b.row = row
        b.stats = stats
        return b

    def refine_report(self, built: dict[str, Built], ctx: PassContext, work: FactorizerWork) -> None:
        """Hook for analyze: adjust the report rows of the one-shot layers (e.g. LoSparse at budget)."""

    def layer_errors(self, lin: nn.Linear, layer: nn.Module, gram: torch.Tensor | None) -> dict[str, float | None]:
        """Report errors of the built layer against the dense one (subclasses may add more)."""
        return relative_errors(lin.weight, layer.to_dense(), gram)

    @staticmethod
    def _totals(rows: dict[str, dict]) -> dict[str, Any]:
        total = sum(r["bytes"] for r in rows.values())
        dense = sum(r["dense_bytes"] for r in rows.values())
        out: dict[str, Any] = {"targeted_bytes": total, "targeted_dense_bytes": dense,
                               "targeted_ratio": dense / total if total else None}
        for key in ("weight_error", "output_error"):
            vals = sorted(r[key] for r in rows.values() if r.get(key) is not None)
            if vals:
                out[f"median_{key}"] = vals[len(vals) // 2]
        return out

    # ------------------------------------------------------------------ the contract

    def analyze(self, model: nn.Module, ctx: PassContext) -> Analysis:
        """Plan the sizes and factorize every targeted layer at once (on a copy for sequential
        methods); the result is handed to ``transform`` (``state["work"]``) and reported per layer."""
        layers = self._targets(model)
        work = FactorizerWork(names=[n for n, _ in layers])
        work.knobs = self._plan(layers, work)
        work.built = self._build(model, work.names, ctx, work, install=False)
        self.refine_report(work.built, ctx, work)
        for b in work.built.values():
            b.stats = None
        rows = {n: b.row for n, b in work.built.items()}
        report = {"layers": rows, **self._totals(rows), "asked_ratio": self.params.ratio,
                  "calibrated": work.calibration is not None}
        if self.params.staged:
            report["staged_note"] = "one-shot errors; staged transform refactorizes each group after fine-tuning"
        return Analysis(report=report, state={"work": work})

    def _work(self, model: nn.Module, ctx: PassContext) -> FactorizerWork:
        """What ``analyze`` handed over (analyzed now if the methods are called without it)."""
        work = ctx.analysis.state.get("work")
        if work is None:
            ctx.analysis = self.analyze(model, ctx)
            work = ctx.analysis.state["work"]
        return work

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        work = self._work(model, ctx)
        if not self.params.staged:
            for n, b in work.built.items():
                set_module(model, n, b.layer)
            ctx.report["factorized_layers"] = len(work.built)
            return model
        return self._staged(model, ctx, work)

    def _staged(self, model: nn.Module, ctx: PassContext, work: FactorizerWork) -> nn.Module:
        p = self.params
        groups = group_layers(work.names, p.stage_by)
        history = []
        if ctx.data is None and len(groups) > 1:
            raise PlanError(f"stage {ctx.stage!r}: staged factorization fine-tunes after each group and needs a task")
        for gi, group in enumerate(groups):
            if gi == 0:  # the first group sees the weights (and, if sequential, the inputs) analyze saw
                built = {n: work.built[n] for n in group}
                for n, b in built.items():
                    set_module(model, n, b.layer)
            else:
                built = self._build(model, group, ctx, work, install=True,
                                    bar_label=f"stage {gi + 1}/{len(groups)}")
            for b in built.values():
                b.stats = None
            entry: dict[str, Any] = {"group": group, "layers": {n: {k: b.row.get(k) for k in
                                                                    ("weight_error", "output_error")}
                                                                for n, b in built.items()}}
            if gi < len(groups) - 1:
                cfg = p.stage_train.model_copy(update={"seed": (p.stage_train.seed + gi) % 2**32})
                # the task's loss where its model returns none (a bi-encoder); no evaluation between groups
                result = train(model, ctx.data.train_loader(cfg.batch_size, seed=cfg.seed), cfg,
                               callbacks=ctx.task.training_callbacks(model) if ctx.task is not None else None,
                               progress=ctx.progress, log=ctx.log)
                model = result.model
                losses = [h["loss"] for h in result.history if "loss" in h]
                entry.update({"train_steps": result.steps, "last_loss": losses[-1] if losses else None})
            history.append(entry)
            ctx.log.info("staged: group %d/%d (%d layers) factorized", gi + 1, len(groups), len(group))
        ctx.report["staged"] = history
        ctx.report["factorized_layers"] = len(work.names)
        return model

    def trains(self) -> bool:
        return self.params.train.trains

    def finetune(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        """The fine-tune after factorization, on the shared loop (all parameters trainable)."""
        if not self.trains():
            return model
        if ctx.data is None:
            raise PlanError(f"stage {ctx.stage!r}: {self.name} training needs a task; set `task:` or train.epochs: 0")
        return train_on_task(model, ctx, self.params.train).model
