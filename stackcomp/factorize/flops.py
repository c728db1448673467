"""Linear FLOPs of a transformer encoder from its shapes, and which heads and FFN neurons to keep
for a FLOPs budget.

Pure numerics (no model code), used by ``prune_structured``. A linear ``in -> out`` costs
``2 * in * out`` FLOPs per token (one multiply and one add per weight; biases left out). One
encoder block with ``h`` heads of width ``d``, hidden size ``D`` and ``I`` FFN neurons holds four
attention linears (query, key, value: ``D -> h*d``; output: ``h*d -> D``) and two FFN linears
(``D -> I``, ``I -> D``), so a head costs ``8*D*d`` and a neuron ``4*D`` FLOPs per token. The
attention score products (which grow with the sequence length) are not linears and are not
counted: ``target_flops`` is a fraction of the encoder's linear FLOPs.

:func:`choose_kept` is the mask search of Kwon et al. (2022, "A Fast Post-Training Pruning
Framework for Transformers") under a FLOPs constraint: heads all cost the same and neurons (or
groups of ``neuron_multiple`` neurons) all cost the same, so for each count of kept heads the best
set is the most important heads and then as many of the most important neurons as the rest of
the budget pays for; the count with the largest kept importance wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["KeptUnits", "block_flops", "choose_kept", "encoder_flops", "head_flops", "neuron_flops"]


def head_flops(hidden: int, head_size: int) -> int:
    """FLOPs per token of one attention head: its rows of query, key, value and its columns of the output."""
    return 8 * hidden * head_size


def neuron_flops(hidden: int) -> int:
    """FLOPs per token of one FFN neuron: its row of the input linear and its column of the output linear."""
    return 4 * hidden


def block_flops(hidden: int, head_size: int, heads: int, neurons: int) -> int:
    return heads * head_flops(hidden, head_size) + neurons * neuron_flops(hidden)


def encoder_flops(hidden: int, head_size: int, heads: Sequence[int], neurons: Sequence[int]) -> int:
    """Linear FLOPs per token of all blocks, given each block's head and neuron counts."""
    return sum(block_flops(hidden, head_size, h, n) for h, n in zip(heads, neurons, strict=True))


@dataclass(frozen=True)
class KeptUnits:
    """What :func:`choose_kept` keeps: per block, the sorted indices of the kept heads and neurons."""

    heads: list[list[int]]
    neurons: list[list[int]]
    flops: int
    budget: int
    importance: float


def _units(scores: Sequence[torch.Tensor], size: int,
           minimum: int) -> tuple[list[list[int]], list[tuple[float, int, list[int]]]]:
    """Per block, the ``minimum`` most important units (always kept), and the rest as items
    ``(importance, block, units)`` of ``size`` units each, a block's items in decreasing importance."""
    mandatory, items = [], []
    for b, s in enumerate(scores):
        order = torch.argsort(s.double(), descending=True, stable=True).tolist()
        mandatory.append(order[:minimum])  # all of a block's units if it has fewer
        rest = order[minimum:]
        for i in range(0, len(rest), size):
            chunk = rest[i:i + size]
            items.append((float(s.double()[chunk].sum()), b, chunk))
    return mandatory, items


def choose_kept(head_scores: Sequence[torch.Tensor], neuron_scores: Sequence[torch.Tensor], *, hidden: int,
                head_size: int, target: float, heads_min: int = 1, neuron_multiple: int = 1) -> KeptUnits:
    """The heads and neurons of largest total importance whose linear FLOPs fit in ``target`` times
    the unpruned encoder's. Each block keeps at least ``heads_min`` heads and ``neuron_multiple``
    neurons, and a multiple of ``neuron_multiple`` neurons (its FFN width must be one). Raises
    ``ValueError`` when the minimum alone is over budget."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    hc, nc = head_flops(hidden, head_size), neuron_flops(hidden) * neuron_multiple
    for i, s in enumerate(neuron_scores):
        if len(s) % neuron_multiple:
            raise ValueError(f"block {i}: FFN width {len(s)} is not a multiple of neuron_multiple={neuron_multiple}")
    total = encoder_flops(hidden, head_size, [len(s) for s in head_scores], [len(s) for s in neuron_scores])
    budget = int(target * total)
    heads, head_items = _units(head_scores, 1, heads_min)
    neurons, neuron_items = _units(neuron_scores, neuron_multiple, neuron_multiple)
    floor = sum(map(len, heads)) * hc + sum(map(len, neurons)) * nc // neuron_multiple
    if floor > budget:
        raise ValueError(f"target {target} is below the least this pruning can keep ({floor / total:.4f} of the "
                         f"linear FLOPs: {heads_min} head(s) and {neuron_multiple} neuron(s) per block)")
    # a block's items stay in its own order (non-increasing), so a stable global sort keeps them valid
    head_items.sort(key=lambda t: -t[0])
    neuron_items.sort(key=lambda t: -t[0])
    head_sums = [0.0, *torch.tensor([t[0] for t in head_items], dtype=torch.float64).cumsum(0).tolist()]
    neuron_sums = [0.0, *torch.tensor([t[0] for t in neuron_items], dtype=torch.float64).cumsum(0).tolist()]
    best = None
    for h in range(len(head_items) + 1):
        left = budget - floor - h * hc
        if left < 0:
            break
        n = min(len(neuron_items), left // nc)
        key = (head_sums[h] + neuron_sums[n], h * hc + n * nc)  # ties: the one that keeps more FLOPs
        if best is None or key > best[0]:
            best = (key, h, n)
    (importance, extra), h, n = best
    for _, b, units in head_items[:h]:
        heads[b] += units
    for _, b, units in neuron_items[:n]:
        neurons[b] += units
    return KeptUnits(heads=[sorted(k) for k in heads], neurons=[sorted(k) for k in neurons],
                     flops=floor + extra, budget=budget, importance=importance)

