"""``blocklr``: block-wise low rank, and Monarch as its named special case (:class:`BlockLowRankLinear`).

The weight is cut into a ``grid`` of p x q blocks, each block its own rank-r SVD (the best
fit per block, :func:`stackcomp.factorize.blocklr.blocklr_factors`); the layer runs two
batched GEMMs. ``monarch: true`` is Dao et al.'s Monarch matrix: ``nblocks`` x ``nblocks``
blocks of the row-interleaved weight (rank 1 per block unless ``rank`` or ``ratio`` says
otherwise), i.e. the projection onto ``P L P^T R`` with block-diagonal L and R.

Size: ``rank`` (block rank) for every layer, or ``ratio`` for the targeted layers together.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from stackcomp.errors import PlanError
from stackcomp.factorize.allocate import Knob
from stackcomp.factorize.budget import blocklr_bytes
from stackcomp.factorize.blocklr import blocklr_factors
from stackcomp.nn.lowrank import BlockLowRankLinear
from stackcomp.passes.factorizer_common import Built, FactorizerParams, FactorizerPass, LayerStats


class BlockLRParams(FactorizerParams):
    grid: tuple[int, int] | None = Field(default=None, description="(p, q): blocks along the output and the input "
                                         "(default [4, 4]; not with monarch)")
    monarch: bool = Field(default=False, description="Monarch: nblocks x nblocks blocks of the row-interleaved "
                          "weight, rank 1 unless rank/ratio is given")
    nblocks: int | None = Field(default=None, ge=1, description="monarch: blocks per factor (default 4)")
    rank: int | None = Field(default=None, ge=1, description="rank of every block (instead of ratio)")

    @model_validator(mode="after")
    def _size(self):
        if self.grid is not None and (min(self.grid) < 1):
            raise ValueError(f"grid must hold two positive block counts, got {list(self.grid)}")
        if self.monarch and self.grid is not None:
            raise ValueError("monarch uses nblocks x nblocks blocks; give nblocks, not grid")
        if not self.monarch and self.nblocks is not None:
            raise ValueError("nblocks is for monarch: true; use grid for block-wise low rank")
        if self.ratio is not None and self.rank is not None:
            raise ValueError("give either ratio or rank, not both")
        if self.ratio is None and self.rank is None and not self.monarch:
            raise ValueError("give either ratio, or rank")
        return self

    def block_grid(self) -> tuple[int, int]:
        if self.monarch:
            n = self.nblocks or 4
            return n, n
        return tuple(self.grid) if self.grid is not None else (4, 4)


#: bytes of a fp32 BlockLowRankLinear (the formula lives in factorize.budget)
blocklr_cost = blocklr_bytes


class BlockLRPass(FactorizerPass):
    """Block-wise low rank on a p x q grid (two batched GEMMs); Monarch with monarch: true."""

    name = "blocklr"
    version = "1"
    Params = BlockLRParams

    def _grid(self, name: str, lin: nn.Linear) -> tuple[int, int]:
        p, q = self.params.block_grid()
        if lin.out_features % p or lin.in_features % q:
            raise PlanError(f"blocklr: grid {p}x{q} does not divide {name} ({lin.out_features}x{lin.in_features}); "
                            "need out % p == 0 and in % q == 0")
        return p, q

    def knob(self, name: str, lin: nn.Linear, share: float) -> Knob:
        g = self._grid(name, lin)
        o, i, b = lin.out_features, lin.in_features, lin.bias is not None
        return Knob(name, lambda r: blocklr_cost(o, i, g, r, b), 1, min(o // g[0], i // g[1]), share)

    def native_knob(self, name: str, lin: nn.Linear) -> int:
        p, q = self._grid(name, lin)
        r = self.params.rank or 1
        top = min(lin.out_features // p, lin.in_features // q)
        if r > top:
            raise PlanError(f"blocklr: block rank {r} exceeds the block shape of {name} "
                            f"({lin.out_features // p}x{lin.in_features // q})")
        return r

    def build_layer(self, name: str, lin: nn.Linear, k: int, stats: LayerStats) -> Built:
        grid = self._grid(name, lin)
        inter = self.params.monarch
        U, V = blocklr_factors(lin.weight.detach().float().cpu(), grid, k, interleave_out=inter, name=name)
        bias = None if lin.bias is None else lin.bias.detach().float().cpu()
        layer = BlockLowRankLinear.from_factors(U, V, bias, interleave_out=inter)
        return Built(layer, {"grid": list(grid), "rank": k, "monarch": inter})
