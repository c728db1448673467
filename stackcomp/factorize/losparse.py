"""The numerics of LoSparse (Li et al., ICML 2023): ``W ~= U V + S`` with ``S`` pruned by rows.

A LoSparse pass calls these per training step; they hold no model and no optimizer:

* :func:`losparse_rank`, :func:`losparse_init` -- the low-rank part from a truncated SVD
  (singular values split evenly) and the dense residual ``S = W - U V``;
* :class:`KeepSchedule` -- the cubic schedule of the kept fraction of ``S`` and when to mask;
* :class:`Importance` -- PLATON-style importance of the entries of one ``S``: the sensitivity
  ``|s * g|`` averaged over a window of ``delta_t`` steps, smoothed by an EMA, optionally
  multiplied by its uncertainty;
* :func:`row_scores`, :func:`select_rows` -- row (output neuron) scores and which rows survive.

Everything follows the authors' code (``yxli2123/LoSparse`` @ 7513452, ``utils.py``), with two
deliberate differences, both documented where they apply: the kept count is decided by a
deterministic sort instead of ``kthvalue`` (so ties cannot keep more rows than scheduled),
and the per-layer scope is offered next to the paper's global threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from stackcomp.factorize.lowrank import FactorizeError, check_matrix, check_rank, svd_factors

__all__ = [
    "losparse_rank",
    "losparse_init",
    "KeepSchedule",
    "Importance",
    "row_scores",
    "select_rows",
]


def losparse_rank(out_features: int, in_features: int, low_rank_ratio: float, *, name: str = "weight") -> int:
    """LoSparse's rank: ``ceil(ratio * out*in / (out+in))`` -- the low-rank part holds about
    ``low_rank_ratio`` of the dense layer's parameters (clipped to ``[1, min(out, in)]``)."""
    if not (isinstance(low_rank_ratio, (int, float)) and 0 < low_rank_ratio <= 1):
        raise FactorizeError(f"{name}: low_rank_ratio must be in (0, 1], got {low_rank_ratio!r}")
    r = math.ceil(low_rank_ratio * out_features * in_features / (out_features + in_features) - 1e-9)
    return max(1, min(r, out_features, in_features))


def losparse_init(
    W: torch.Tensor, rank: int, *, split: str = "sqrt", name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, V, S)`` with ``U V`` the best rank-``rank`` approximation and ``S = W - U V`` dense.

    ``S`` is computed in ``W``'s dtype from the returned factors, so ``U @ V + S`` reproduces
    ``W`` up to one rounding. LoSparse splits the singular values evenly (``split="sqrt"``).
    """
    check_matrix(W, name)
    check_rank(rank, *W.shape, name)
    U, V = svd_factors(W, rank, split=split, name=name)
    return U, V, W - U @ V


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class KeepSchedule:
    """Cubic schedule of the fraction of ``S`` kept (LoSparse's ``schedule_threshold_comb``).

    With ``t_i = initial_warmup_steps``, ``t_f = final_warmup_steps`` and ``T = total_steps``:

    * ``step <= t_i``: keep ``initial_keep`` (1.0: nothing pruned yet), never mask;
    * ``step > T - t_f``: keep ``final_keep``, mask at every step;
    * otherwise keep ``final + (initial - final) * (1 - (step - t_i) / (T - t_i - t_f))**3``,
      masking when ``step % delta_t == 0``.

    In the authors' scripts ``t_i = initial_warmup * warmup_steps`` and
    ``t_f = final_warmup * warmup_steps`` (e.g. 1 * 675 and 5 * 675 steps).
    """

    total_steps: int
    initial_warmup_steps: int
    final_warmup_steps: int
    final_keep: float
    initial_keep: float = 1.0
    delta_t: int = 10

    def __post_init__(self) -> None:
        T, ti, tf = self.total_steps, self.initial_warmup_steps, self.final_warmup_steps
        if min(ti, tf) < 0 or ti + tf >= T:
            raise FactorizeError(
                f"KeepSchedule: need 0 <= initial_warmup_steps + final_warmup_steps < total_steps, got {ti} + {tf} "
                f"vs {T}"
            )
        if not 0 < self.final_keep <= self.initial_keep <= 1:
            raise FactorizeError(
                f"KeepSchedule: need 0 < final_keep <= initial_keep <= 1, got {self.final_keep} and {self.initial_keep}"
            )
        if self.delta_t < 1:
            raise FactorizeError(f"KeepSchedule: delta_t must be >= 1, got {self.delta_t}")

    def keep_fraction(self, step: int) -> float:
        T, ti, tf = self.total_steps, self.initial_warmup_steps, self.final_warmup_steps
        if step <= ti:
            return self.initial_keep
        if step > T - tf:
            return self.final_keep
        mul = 1 - (step - ti) / (T - ti - tf)
        return self.final_keep + (self.initial_keep - self.final_keep) * mul**3

    def mask_now(self, step: int) -> bool:
        if step <= self.initial_warmup_steps:
            return False
        if step > self.total_steps - self.final_warmup_steps:
            return True
        return step % self.delta_t == 0

    def __call__(self, step: int) -> tuple[float, bool]:
        return self.keep_fraction(step), self.mask_now(step)


# ----------------------------------------------------------------------------- importance


@dataclass
class Importance:
    """PLATON importance of one matrix (LoSparse's ``update_ipt_with_local_window``).

    Call :meth:`update` once per optimizer step with the parameter and its gradient:

    * within a window of ``delta_t`` steps, ``window`` is the running mean of ``|w * g|``;
    * at the first step of each window (``step % delta_t == 0``) the finished window enters
      the EMA ``ema <- beta1 * ema + (1 - beta1) * window``; with ``0 < beta2 < 1`` also the
      uncertainty ``unc <- beta2 * unc + (1 - beta2) * |window - ema|``; then a new window starts.

    :meth:`score` is ``ema`` (``beta2 == 1``, the authors' default) or ``ema * unc``.
    """

    beta1: float = 0.85
    beta2: float = 1.0
    delta_t: int = 10
    window: torch.Tensor | None = field(default=None, repr=False)
    ema: torch.Tensor | None = field(default=None, repr=False)
    unc: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.beta1 < 1:
            raise FactorizeError(f"Importance: beta1 must be in [0, 1), got {self.beta1}")
        if not 0 < self.beta2 <= 1:
            raise FactorizeError(f"Importance: beta2 must be in (0, 1] (1 = no uncertainty term), got {self.beta2}")
        if self.delta_t < 1:
            raise FactorizeError(f"Importance: delta_t must be >= 1, got {self.delta_t}")

    @torch.no_grad()
    def update(self, step: int, weight: torch.Tensor, grad: torch.Tensor | None) -> None:
        if grad is None:
            raise FactorizeError("Importance.update: the parameter has no gradient (call after backward)")
        if grad.shape != weight.shape:
            raise FactorizeError(
                f"Importance.update: grad {tuple(grad.shape)} does not match weight {tuple(weight.shape)}"
            )
        sens = (weight.detach() * grad.detach()).abs().float()
        if self.ema is None:
            self.window = torch.zeros_like(sens)
            self.ema = torch.zeros_like(sens)
            if self.beta2 < 1:
                self.unc = torch.zeros_like(sens)
        local = step % self.delta_t
        if local == 0:
            self.ema.mul_(self.beta1).add_(self.window, alpha=1 - self.beta1)
            if self.unc is not None:
                self.unc.mul_(self.beta2).add_((self.window - self.ema).abs(), alpha=1 - self.beta2)
            self.window = sens
        else:
            self.window = (self.window * local + sens) / (local + 1)

    def score(self) -> torch.Tensor:
        if self.ema is None:
            raise FactorizeError("Importance.score: no update yet")
        return self.ema * self.unc if self.unc is not None else self.ema.clone()


def row_scores(score: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """One score per row (output neuron) of ``S``: mean (the authors' default), sum, max or min."""
    if score.dim() != 2:
        raise FactorizeError(f"row_scores: expected a 2-D score matrix, got shape {tuple(score.shape)}")
    if method == "mean":
        return score.mean(dim=1)
    if method == "sum":
        return score.sum(dim=1)
    if method == "max":
        return score.amax(dim=1)
    if method == "min":
        return score.amin(dim=1)
    raise FactorizeError(f"row_scores: method must be mean, sum, max or min, got {method!r}")


def select_rows(
    scores: Mapping[str, torch.Tensor],
    keep: float,
    *,
    widths: Mapping[str, int] | None = None,
    scope: str = "global",
) -> dict[str, torch.Tensor]:
    """Which rows of each ``S`` survive, as boolean masks (one per name, shape (rows,)).

    Rows are removed lowest score first. ``scope="global"`` (the paper's): one ranking over all
    matrices, removing rows while the removed entries stay within ``floor(N * (1 - keep))`` of the
    ``N = sum rows * width`` entries, and stopping at the first row that would exceed it -- so every
    removed row scores no higher than every kept one, and at least ``keep * N`` entries remain.
    ``widths`` gives each matrix's row length (its ``in_features``); all 1 if omitted.
    ``scope="layer"``: each matrix keeps exactly ``n - floor(n * (1 - keep))`` of its ``n`` rows.
    With equal widths both keep ``ceil(keep * n)`` rows (to 1e-9). Ties are broken by order:
    earlier names and lower row indices go first.
    """
    if not 0 <= keep <= 1:
        raise FactorizeError(f"select_rows: keep must be in [0, 1], got {keep}")
    if scope not in ("global", "layer"):
        raise FactorizeError(f"select_rows: scope must be 'global' or 'layer', got {scope!r}")
    names = list(scores)
    for n in names:
        if scores[n].dim() != 1:
            raise FactorizeError(f"select_rows: scores for {n} must be one per row (1-D), got {tuple(scores[n].shape)}")
        if not torch.isfinite(scores[n]).all():
            raise FactorizeError(f"select_rows: scores for {n} hold NaN or Inf")
    masks = {n: torch.ones(scores[n].numel(), dtype=torch.bool, device=scores[n].device) for n in names}
    if scope == "layer":
        for n in names:
            rows = scores[n].numel()
            n_drop = math.floor(rows * (1 - keep) + 1e-9)
            order = torch.sort(scores[n], stable=True).indices
            masks[n][order[:n_drop]] = False
        return masks
    if not names:
        return masks
    w = {n: int(widths[n]) if widths is not None else 1 for n in names}
    flat = torch.cat([scores[n].detach().double().cpu() for n in names])
    width = torch.cat([torch.full((scores[n].numel(),), w[n], dtype=torch.int64) for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), i, dtype=torch.int64) for i, n in enumerate(names)])
    row = torch.cat([torch.arange(scores[n].numel()) for n in names])
    total = int(width.sum())
    budget = math.floor(total * (1 - keep) + 1e-9)
    order = torch.sort(flat, stable=True).indices
    removed = torch.cumsum(width[order], 0)
    n_drop = int(torch.searchsorted(removed, torch.tensor(budget), right=True))
    drop = order[:n_drop]
    for i, n in enumerate(names):
        masks[n][row[drop][owner[drop] == i].to(masks[n].device)] = False
    return masks
