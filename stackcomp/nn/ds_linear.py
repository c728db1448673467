"""DSLinear: a linear layer stored as DSFormer dense-sparse factors, with STF training.

Layout (the kernels rely on it; keep it exactly):

* ``dictionary`` (nb, K, B) float Parameter: block b's atoms are its rows;
* ``values``     (nb, out, s) float Parameter: the s coefficients of every output row and block;
* ``indices``    (nb, out, s) buffer, uint8 for K <= 256, int16 for K <= 32768, else int32;
* ``bias``       (out,) Parameter or None.

Block b covers input columns ``b*B:(b+1)*B``; ``W[o, b*B:(b+1)*B] = sum_t values[b,o,t] *
dictionary[b, indices[b,o,t]]``. Forward: ``z_b = x_b D_b^T`` (tokens x K), then
``y[:, o] = sum_b sum_t z_b[:, idx[b,o,t]] * val[b,o,t] + bias``.

Straight-through factorizer (STF, DSFormer's training mode), see :meth:`DSLinear.start_stf`:
a latent dense ``weight`` (out x in) is kept as a Parameter; in training mode the codes C are
re-solved by OMP from ``weight`` and the current dictionary every ``refresh_every`` optimizer
steps (no grad, warm-started), and the layer computes with ``W_hat + (weight - weight.detach())`` where
``W_hat = C D`` with C a constant: D gets its gradient through the product and ``weight`` gets
``dL/dW_hat`` unchanged (straight through). :meth:`DSLinear.freeze` ends STF.

A step is signalled by :meth:`DSLinear.mark_step`, which the training loop's :class:`STFCallback`
calls after each optimizer step (an in-place update that bumps the version counter of ``weight`` or
``dictionary`` counts too): the first training forward after it renormalises the dictionary
rows to unit norm in place (no grad; the codes are rescaled so ``C D`` is unchanged) and, every
``refresh_every`` steps, re-solves the codes. Further forwards within the same step (gradient
accumulation, a layer shared across depth as in ALBERT) reuse them, so the autograd graph never
sees the dictionary change under it. Outside STF the rows may drift from unit norm when the
dictionary is fine-tuned; nothing depends on it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from stackcomp.errors import ArtifactError, StackcompError
from stackcomp.factorize.budget import FP32_BYTES, index_dtype, linear_params, tensor_bytes
from stackcomp.factorize.dictionary import DSFactors, ds_blocks, factorize_ds
from stackcomp.factorize.omp import codes_to_dense, sparse_code
from stackcomp.nn.base import CompressedLayer, LayerStorage, register_layer

__all__ = ["DSLinear", "DSLayerError", "STFCallback"]


class DSLayerError(StackcompError):
    """Arguments or factors given to a DSLinear do not fit together."""


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# Work on at most this many gathered numbers at once in :meth:`DSLinear.forward_reference`.
_GATHER_ELEMENTS = 1 << 22
#: cost of one gathered-and-weighted code element, in matmul MACs (measured ballpark on CPU)
_GATHER_COST = 16

class STFCallback:
    """The training-loop callback that drives STF: after every optimizer step it marks a new step
    on each STF layer, so the layer's next training forward renormalises its dictionary and (every
    ``refresh_every`` steps) re-solves its codes. Hand it to :func:`stackcomp.train.train` with
    the model whose DS layers are in STF mode.

    Parameter version counters cannot tell the layer about a step by themselves: fused AdamW
    updates in place without bumping them (which once left STF re-solving its codes only at the
    first step), hence this event.
    """

    def __init__(self, model: nn.Module | None = None):
        self.layers = [m for m in model.modules() if isinstance(m, DSLinear)] if model is not None else None

    def on_optimizer_step(self, state: Any) -> None:
        layers = self.layers if self.layers is not None else [m for m in state.model.modules()
                                                                 if isinstance(m, DSLinear)]
        for layer in layers:
            if layer.stf:
                layer.mark_step()


def _pos_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 1


@register_layer
class DSLinear(CompressedLayer):
    """``y = x W_hat^T + b`` with ``W_hat`` held as per-block dictionaries and ELL codes."""

    layout_version: ClassVar[int] = 1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: int,
        atoms: int,
        nnz: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not all(_pos_int(v) for v in (in_features, out_features, block, atoms, nnz)):
            raise DSLayerError(
                "DSLinear: in_features, out_features, block, atoms and nnz must be positive ints, got "
                f"{in_features}, {out_features}, {block}, {atoms}, {nnz}"
            )
        if in_features % block:
            raise DSLayerError(f"DSLinear: block={block} must divide in_features={in_features}")
        if nnz > atoms:
            raise DSLayerError(f"DSLinear: nnz={nnz} non-zeros per row need at least as many atoms, got atoms={atoms}")
        if dtype not in _DTYPES.values():
            raise DSLayerError(f"DSLinear: dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.block, self.atoms, self.nnz = block, atoms, nnz
        self.num_blocks = nb = in_features // block
        self.dictionary = nn.Parameter(torch.zeros(nb, atoms, block, dtype=dtype))
        self.values = nn.Parameter(torch.zeros(nb, out_features, nnz, dtype=dtype))
        self.register_buffer("indices", torch.zeros(nb, out_features, nnz, dtype=index_dtype(atoms)))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        # STF state: off until start_stf()
        self.init_error: float | None = None  # relative error of the initial factorization, if known
        self.stf = False
        self.refresh_every = 1
        self.stf_keep = 0
        self._stf_updates = 0  # parameter updates seen in STF (steps)
        self._stf_seen: tuple[int, int] | None = None  # versions of (weight, dictionary) last seen

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_factors(
        cls,
        dictionary: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> DSLinear:
        """A layer from factors ``dictionary`` (nb, K, B), ``values``/``indices`` (nb, out, s); copied."""
        if dictionary.dim() != 3 or values.dim() != 3 or values.shape != indices.shape:
            raise DSLayerError(
                f"DSLinear.from_factors: need dictionary (nb, K, B) and values/indices (nb, out, s) of one shape, got "
                f"{tuple(dictionary.shape)}, {tuple(values.shape)}, {tuple(indices.shape)}"
            )
        nb, K, B = dictionary.shape
        if values.shape[0] != nb:
            raise DSLayerError(f"DSLinear.from_factors: dictionary has {nb} blocks, values {values.shape[0]}")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise DSLayerError(f"DSLinear.from_factors: indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= K):
            raise DSLayerError(f"DSLinear.from_factors: indices must lie in [0, {K}), got [{int(indices.min())}, "
                               f"{int(indices.max())}]")
        out_f, s = values.shape[1], values.shape[2]
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise DSLayerError(f"DSLinear.from_factors: bias has shape {tuple(bias.shape)}, expected ({out_f},)")
        dtype = dictionary.dtype if dictionary.dtype in _DTYPES.values() else torch.float32
        layer = cls(nb * B, out_f, B, K, s, bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            layer.dictionary.copy_(dictionary)
            layer.values.copy_(values)
            layer.indices.copy_(indices.to(layer.indices.dtype))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer.to(dictionary.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int, atoms: int, nnz: int, **factorize_kwargs: Any) -> DSLinear:
        """Factorize ``linear.weight`` (see :func:`stackcomp.factorize.dictionary.factorize_ds`)."""
        if not isinstance(linear, nn.Linear):
            raise DSLayerError(f"DSLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        f: DSFactors = factorize_ds(linear.weight.detach(), block, atoms, nnz, **factorize_kwargs)
        bias = None if linear.bias is None else linear.bias.detach()
        layer = cls.from_factors(f.dictionary, f.values, f.indices, bias)
        layer.init_error = f.error
        return layer

    # ------------------------------------------------------------------ dense view

    def reconstruct_weight(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """``W_hat`` (out x in) from the factors, differentiable in ``dictionary`` and ``values``."""
        vals = self.values if values is None else values
        C = codes_to_dense(vals, self.indices.long(), self.atoms)  # (nb, out, K)
        blocks = torch.bmm(C, self.dictionary)  # (nb, out, B)
        return blocks.permute(1, 0, 2).reshape(self.out_features, self.in_features)

    def to_dense(self) -> torch.Tensor:
        with torch.no_grad():
            return self.reconstruct_weight().detach().clone()

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stf and self.training:
            W = self._stf_weight()
            return F.linear(x.to(W.dtype), W, self.bias).to(x.dtype)
        tokens = x.numel() // self.in_features if x.numel() else 0
        # Reconstruct-then-matmul when the tokens amortise building W_hat, else gather from z.
        # A gathered element costs about as much as 16 matmul MACs in PyTorch (memory-bound,
        # strided): counting it as 2 sent 4k-token eval batches down the gather path, 10x slower.
        nb, out_f, s, K = self.num_blocks, self.out_features, self.nnz, self.atoms
        factored = tokens * (self.in_features * K + _GATHER_COST * nb * out_f * s)
        dense = out_f * self.in_features * K + tokens * out_f * self.in_features
        if factored < dense:
            return self.forward_reference(x)
        W = self.reconstruct_weight()
        return F.linear(x.to(W.dtype), W, self.bias).to(x.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The exact factored computation, as the kernels do it: ``z_b = x_b D_b^T``, then a
        gather of z by the indices and a weighted sum over the s slots and the blocks.

        Tokens are processed in chunks so no more than ~4M gathered numbers exist at once.
        """
        if x.shape[-1] != self.in_features:
            raise DSLayerError(f"DSLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        lead = x.shape[:-1]
        dt = self.dictionary.dtype
        x2 = x.reshape(-1, self.in_features).to(dt)
        T, nb, out_f, s = x2.shape[0], self.num_blocks, self.out_features, self.nnz
        idx = self.indices.long().reshape(nb, 1, out_f * s)
        vals = self.values.unsqueeze(1)  # (nb, 1, out, s)
        chunk = max(1, _GATHER_ELEMENTS // max(1, nb * out_f * s))
        outs = []
        for lo in range(0, T, chunk):
            xc = x2[lo : lo + chunk]
            t = xc.shape[0]
            z = torch.bmm(xc.view(t, nb, self.block).transpose(0, 1), self.dictionary.transpose(1, 2))  # (nb, t, K)
            g = z.gather(2, idx.expand(nb, t, out_f * s)).view(nb, t, out_f, s)
            outs.append((g * vals).sum(dim=(0, 3)))
        y = torch.cat(outs, 0) if outs else x2.new_zeros(0, out_f)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, out_f).to(x.dtype)

    # ------------------------------------------------------------------ STF

    def start_stf(
        self,
        refresh_every: int = 1,
        keep: int | None = None,
        weight: torch.Tensor | None = None,
    ) -> DSLinear:
        """Enter STF training: a latent dense ``weight`` Parameter (init: ``weight`` if given, e.g.
        the original linear's weight, else ``to_dense()``), the dictionary trained by gradient,
        the codes re-solved by OMP every ``refresh_every`` optimizer steps (see the module doc).

        ``keep``: OMP warm start; the ``keep`` atoms of each row with the largest |value| in the
        last solution are taken first, the rest are chosen greedily (0: fresh OMP each time;
        ``nnz``: the support never moves, only its values are re-solved). Default ``nnz // 2``.
        Build the optimizer after this call (it adds the ``weight`` Parameter).
        """
        if not _pos_int(refresh_every):
            raise DSLayerError(f"DSLinear.start_stf: refresh_every must be a positive int, got {refresh_every!r}")
        keep = self.nnz // 2 if keep is None else keep
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= self.nnz:
            raise DSLayerError(f"DSLinear.start_stf: keep must be an int in [0, nnz={self.nnz}], got {keep!r}")
        if weight is None:
            weight = self.to_dense()
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise DSLayerError(
                f"DSLinear.start_stf: latent weight must be ({self.out_features}, {self.in_features}), "
                f"got {tuple(weight.shape)}"
            )
        self.weight = nn.Parameter(weight.detach().to(self.dictionary).clone())
        self.dictionary.requires_grad_(True)
        self.values.requires_grad_(False)  # C comes from OMP, not from gradients
        self.stf, self.refresh_every, self.stf_keep = True, refresh_every, keep
        self._stf_updates, self._stf_seen, self._stf_new_step = 0, None, True
        return self

    def mark_step(self) -> None:
        """An optimizer step has updated this layer: the next training forward renormalises the
        dictionary and, every ``refresh_every`` steps, re-solves the codes (:class:`STFCallback`
        calls this; a hand-written loop calls it after each ``optimizer.step()``)."""
        self._stf_new_step = True

    @torch.no_grad()
    def _normalize_dictionary(self) -> None:
        """Unit-norm atoms, with the codes rescaled so that C D is unchanged."""
        norms = self.dictionary.norm(dim=-1)  # (nb, K)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        self.dictionary.div_(safe.unsqueeze(-1))
        self.values.mul_(safe.gather(1, self.indices.long().reshape(self.num_blocks, -1)).view_as(self.values))

    @torch.no_grad()
    def refresh_codes(self, keep: int | None = None) -> None:
        """Re-solve the codes by OMP from the latent ``weight`` and the current dictionary."""
        if not self.stf:
            raise DSLayerError("DSLinear.refresh_codes: only in STF mode (call start_stf first)")
        keep = self.stf_keep if keep is None else keep
        init = None
        if keep > 0:
            order = self.values.abs().argsort(dim=-1, descending=True, stable=True)[..., :keep]
            init = self.indices.long().gather(-1, order)
        work = torch.float64 if self.dictionary.dtype == torch.float64 else torch.float32
        X = ds_blocks(self.weight.detach().to(work), self.block)
        vals, idx = sparse_code(X, self.dictionary.detach().to(work), self.nnz, init_support=init, dtype=work)
        self.values.copy_(vals)
        self.indices.copy_(idx.to(self.indices.dtype))

    def _stf_weight(self) -> torch.Tensor:
        versions = (self.weight._version, self.dictionary._version)
        if torch.is_grad_enabled() and (self._stf_new_step or self._stf_seen != versions):
            # first training forward since an optimizer step (or any in-place change of the parameters)
            self._normalize_dictionary()
            if self._stf_updates % self.refresh_every == 0:
                self.refresh_codes()
            self._stf_updates += 1
            self._stf_seen = (self.weight._version, self.dictionary._version)
            self._stf_new_step = False
        W_hat = self.reconstruct_weight(self.values.detach())  # C constant: D gets the gradient
        return W_hat + (self.weight - self.weight.detach())  # value W_hat, gradient straight to weight

    def freeze(self, train_values: bool = True, train_dictionary: bool = True, resolve: bool = True) -> DSLinear:
        """End STF (support fixed from now on, latent weight dropped) and set which factors keep
        training. On a layer not in STF this only sets ``requires_grad``: the no-STF ablation
        (support frozen from the start, values and dictionary fine-tuned).

        ``resolve``: solve the codes once more from the latent weight first. Pass False after a
        training loop that evaluated (and maybe restored) the current codes: the layer then stays
        exactly the one that was evaluated and selected; a final solve would change it.
        """
        if self.stf:
            self._normalize_dictionary()  # C D unchanged
            if resolve:
                self.refresh_codes()
            del self.weight
            self.stf = False
        self.values.requires_grad_(train_values)
        self.dictionary.requires_grad_(train_dictionary)
        return self

    # ------------------------------------------------------------------ artifacts

    def manifest(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "block": self.block,
            "atoms": self.atoms,
            "nnz": self.nnz,
            "bias": self.bias is not None,
            "dtype": str(self.dictionary.dtype).removeprefix("torch."),
            "index_dtype": str(self.indices.dtype).removeprefix("torch."),
            "layout_version": self.layout_version,
            "stf": self.stf,
            "refresh_every": self.refresh_every,
            "stf_keep": self.stf_keep,
        }

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> DSLinear:
        """An empty layer of the manifest's shapes (in STF mode if saved in it); load the state dict next."""
        who = "layer manifest for DSLinear"
        for key in ("in_features", "out_features", "block", "atoms", "nnz"):
            if key not in entry:
                raise ArtifactError(f"{who} lacks field {key!r} (has {sorted(entry)})")
            if not _pos_int(entry[key]):
                raise ArtifactError(f"{who}: field {key!r} must be a positive integer, got {entry[key]!r}")
        version = entry.get("layout_version", cls.layout_version)
        if version != cls.layout_version:
            raise ArtifactError(
                f"{who} has layout_version {version}, this stackcomp reads {cls.layout_version}; "
                "re-run the stage that produced it"
            )
        dtype_name = entry.get("dtype", "float32")
        if dtype_name not in _DTYPES:
            raise ArtifactError(f"{who}: dtype {dtype_name!r} is not one of {sorted(_DTYPES)}")
        bias = entry.get("bias", True)
        if not isinstance(bias, bool):
            raise ArtifactError(f"{who}: field 'bias' must be true/false, got {bias!r}")
        try:
            layer = cls(entry["in_features"], entry["out_features"], entry["block"], entry["atoms"], entry["nnz"],
                        bias=bias, dtype=_DTYPES[dtype_name])
        except DSLayerError as e:
            raise ArtifactError(f"{who}: {e}") from None
        want_idx = entry.get("index_dtype")
        if want_idx is not None and want_idx != str(layer.indices.dtype).removeprefix("torch."):
            raise ArtifactError(f"{who}: index_dtype {want_idx!r} does not match atoms={layer.atoms} "
                                f"({layer.indices.dtype})")
        if entry.get("stf", False):
            layer.start_stf(refresh_every=int(entry.get("refresh_every", 1)), keep=int(entry.get("stf_keep", 0)),
                            weight=torch.zeros(layer.out_features, layer.in_features))
        return layer

    def storage(self) -> LayerStorage:
        """The factors as stored (the STF latent weight is training state, not counted)."""
        floats = [self.dictionary, self.values] + ([self.bias] if self.bias is not None else [])
        params = sum(t.numel() for t in floats)  # stored numbers; indices are counted in bytes only
        dense = linear_params(self.out_features, self.in_features, self.bias is not None)
        return LayerStorage(params=params, bytes=tensor_bytes(*floats, self.indices), dense_params=dense,
                            dense_bytes=float(dense * FP32_BYTES))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"atoms={self.atoms}, nnz={self.nnz}, bias={self.bias is not None}, stf={self.stf}")
