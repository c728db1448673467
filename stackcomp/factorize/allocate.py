"""Equal-budget allocation: one integer size knob per layer so the layers together hit a byte budget.

Every factorizer has one integer knob per layer whose bytes grow with it (rank, block rank,
nonzeros). Asking each layer separately for ``ratio`` leaves up to one knob step unused per
layer, which on small layers is far from the asked ratio (a 32x32 rank-r layer moves in steps
of 6% of its dense size). :func:`allocate` instead spends one budget over all layers:

1. each layer gets the largest knob whose bytes fit its own share (``dense / ratio``);
2. the bytes left over buy single knob steps, one at a time, for the layer that is furthest
   below its share (relative to it), as long as a step still fits.

The total never exceeds the budget, and it falls short by less than the smallest step that no
layer could still take, so the ratio reached is within one knob step of the one asked.
Layers stay near the asked ratio each (no layer is starved to feed another), which keeps the
comparison between methods at equal bytes per layer, not only in total.

Pure numerics on integers and callables; no model in sight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stackcomp.errors import FactorizeError

__all__ = ["Knob", "allocate", "largest_fitting"]


@dataclass(frozen=True)
class Knob:
    """One layer's size knob: ``cost(k)`` bytes for ``k`` in ``[lo, hi]``, non-decreasing in ``k``;
    ``share`` is the layer's own part of the budget (its dense bytes / ratio)."""

    name: str
    cost: Callable[[int], float]
    lo: int
    hi: int
    share: float


def largest_fitting(cost: Callable[[int], float], lo: int, hi: int, limit: float) -> int | None:
    """The largest ``k`` in ``[lo, hi]`` with ``cost(k) <= limit`` (binary search), None if none."""
    if hi < lo or cost(lo) > limit:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def allocate(knobs: Sequence[Knob], budget: float) -> dict[str, int]:
    """Knob values whose summed cost is at most ``budget`` and as close to it as single steps allow.

    Raises :class:`FactorizeError` when even the smallest knobs exceed the budget (the message
    names the layers that cannot reach their share).
    """
    if not knobs:
        return {}
    if not (math.isfinite(budget) and budget > 0):
        raise FactorizeError(f"allocate: the budget must be a positive number of bytes, got {budget!r}")
    k: dict[str, int] = {}
    over = []
    for kn in knobs:
        if kn.hi < kn.lo:
            raise FactorizeError(f"{kn.name}: no valid size (knob range [{kn.lo}, {kn.hi}] is empty)")
        fit = largest_fitting(kn.cost, kn.lo, kn.hi, kn.share)
        if fit is None:
            over.append(kn.name)
            fit = kn.lo
        k[kn.name] = fit
    spent = sum(kn.cost(k[kn.name]) for kn in knobs)
    if spent > budget:
        smallest = sum(kn.cost(kn.lo) for kn in knobs)
        raise FactorizeError(
            f"the smallest factorization of every targeted layer already takes {smallest:.0f} bytes, over the budget "
            f"of {budget:.0f}; layers that cannot reach their share: {', '.join(over[:5])}"
            f"{' ...' if len(over) > 5 else ''}; ask a smaller ratio"
        )
    left = budget - spent
    by_name = {kn.name: kn for kn in knobs}
    while True:
        best, best_slack = None, -math.inf
        for name, kn in by_name.items():
            if k[name] >= kn.hi:
                continue
            now = kn.cost(k[name])
            step = kn.cost(k[name] + 1) - now
            if step > left:
                continue
            slack = (kn.share - now) / kn.share if kn.share > 0 else -now
            if slack > best_slack:
                best, best_slack = name, slack
        if best is None:
            return k
        kn = by_name[best]
        left -= kn.cost(k[best] + 1) - kn.cost(k[best])
        k[best] += 1
