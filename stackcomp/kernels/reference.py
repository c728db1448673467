"""DS layer forward in plain torch: the exact oracle and the fastest uncompiled paths.

Canonical tensors (what ``DSLinear`` stores): ``dictionary`` (nb, K, B), ``values`` (nb, out, s),
``indices`` (nb, out, s) integer, ``bias`` (out,) or None; ``in = nb * B``.

* :func:`ds_forward_reference` -- the test oracle: float64, no tricks, obviously right.
* :func:`ds_forward_embedding_bag` -- z = bmm(D, x^T), then one ``F.embedding_bag`` does the
  gather and the weighted sum (fastest uncompiled path for small and medium token counts).
* :func:`ds_forward_rebuild` -- rebuilds W = C.D with one ``embedding_bag`` and runs one GEMM
  (best uncompiled path for thousands of tokens: memory is saved, time is not).
* :func:`ds_forward_torch` -- picks between the last two by token count.
* :func:`ds_forward_act8_reference` -- the oracle of the vnni8 int8 kernel: the same rounding of
  activations to 8 bits, in plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stackcomp.errors import StackcompError

#: from this many tokens on, rebuilding W and running one GEMM beats embedding_bag
REBUILD_MIN_TOKENS = 1024


class KernelError(StackcompError):
    """Tensors handed to a DS kernel have the wrong shapes, dtypes or index range."""


def check_ds(dictionary: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
             bias: torch.Tensor | None = None, name: str = "DS layer") -> tuple[int, int, int, int, int]:
    """Validate canonical DS tensors; returns (nb, K, B, out, s)."""
    if dictionary.dim() != 3:
        raise KernelError(f"{name}: dictionary must be (n_blocks, atoms, block), got shape {tuple(dictionary.shape)}")
    nb, K, B = dictionary.shape
    if values.dim() != 3 or values.shape[0] != nb:
        raise KernelError(f"{name}: values must be (n_blocks={nb}, out, nnz), got shape {tuple(values.shape)}")
    if indices.shape != values.shape:
        raise KernelError(f"{name}: indices shape {tuple(indices.shape)} != values shape {tuple(values.shape)}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise KernelError(f"{name}: indices must be an integer tensor, got {indices.dtype}")
    out, s = values.shape[1], values.shape[2]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out):
        raise KernelError(f"{name}: bias must be (out={out},), got shape {tuple(bias.shape)}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= K:
            raise KernelError(f"{name}: indices must lie in [0, {K}) (atoms), found [{lo}, {hi}]")
    return nb, K, B, out, s


def _flat_x(x: torch.Tensor, in_features: int, name: str = "DS layer") -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.shape[-1] != in_features:
        raise KernelError(f"{name}: input has {x.shape[-1]} features, the layer expects {in_features}")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, in_features), lead


def ds_forward_reference(x: torch.Tensor, dictionary: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact DS forward (float64 inside, result in x's dtype). The oracle for every kernel test."""
    nb, K, B, out, s = check_ds(dictionary, values, indices, bias)
    x2, lead = _flat_x(x, nb * B)
    xb = x2.double().reshape(-1, nb, B)                       # (T, nb, B)
    z = torch.einsum("tnb,nkb->ntk", xb, dictionary.double())  # (nb, T, K)
    y = torch.zeros(x2.shape[0], out, dtype=torch.float64, device=x.device)
    for b in range(nb):
        g = z[b][:, indices[b].long()]                         # (T, out, s)
        y += (g * values[b].double()).sum(-1)
    if bias is not None:
        y += bias.double()
    return y.to(x.dtype).reshape(*lead, out)


def _round_per_token(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v (T, n) float32 -> (q in [-127, 127] as float32, scale amax/127), rounding as the kernel does."""
    amax = v.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.clamp(torch.round(v * inv), -127, 127)
    return q, amax / 127.0


def ds_forward_act8_reference(x: torch.Tensor, dictionary_q: torch.Tensor, dictionary_scale: torch.Tensor,
                              values_q: torch.Tensor, values_scale: torch.Tensor, indices: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the vnni8 kernel computes, step by step in float32 / exact integers (test oracle).

    int8 ``dictionary_q`` (nb, K, B) with per-atom ``dictionary_scale`` (nb, K); int8 ``values_q``
    (nb, out, s) with per-row ``values_scale`` (out,). x is rounded per token to 8 bits, z = x D^T
    in exact integers, rescaled, rounded per token (over all blocks) to 8 bits, gathered in exact
    integers and rescaled. Matches the kernel to float32 rounding (it fuses the last multiply-add).
    """
    nb, K, B, out, s = check_ds(dictionary_q.float(), values_q.float(), indices, bias)
    x2, lead = _flat_x(x, nb * B)
    xq, xs = _round_per_token(x2.float())
    zi = torch.einsum("tnb,nkb->tnk", xq.double().reshape(-1, nb, B), dictionary_q.double())  # exact
    z = zi.float() * (dictionary_scale.float().unsqueeze(0) * xs.unsqueeze(-1))              # (T, nb, K)
    zq, zs = _round_per_token(z.reshape(-1, nb * K))
    zq = zq.double().reshape(-1, nb, K)
    acc = torch.zeros(x2.shape[0], out, dtype=torch.float64)
    for b in range(nb):
        acc += (zq[:, b][:, indices[b].long()] * values_q[b].double()).sum(-1)               # exact
    y = acc.float() * (values_scale.float()[:out].unsqueeze(0) * zs)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, out)


def flat_bag_indices(indices: torch.Tensor, atoms: int) -> torch.Tensor:
    """(nb, out, s) block-local atom indices -> (out, nb*s) int64 rows of the stacked (nb*K) table."""
    nb, out, s = indices.shape
    off = (torch.arange(nb, device=indices.device) * atoms).view(nb, 1, 1)
    return (indices.long() + off).permute(1, 0, 2).reshape(out, nb * s)


def ds_forward_embedding_bag(x: torch.Tensor, dictionary: torch.Tensor, values: torch.Tensor,
                             indices: torch.Tensor | None, bias: torch.Tensor | None = None, *,
                             bag_indices: torch.Tensor | None = None,
                             bag_weights: torch.Tensor | None = None) -> torch.Tensor:
    """zT = bmm(D, x_b^T) (nb, K, T), then y^T = embedding_bag(flat idx, zT, weights=values).

    ``bag_indices``/``bag_weights`` (out, nb*s) may be passed precomputed (see
    :func:`flat_bag_indices`) to save the re-layout on every call.
    """
    nb, K, B = dictionary.shape
    x2, lead = _flat_x(x, nb * B)
    T = x2.shape[0]
    dt = x2.dtype
    zT = torch.bmm(dictionary.to(dt), x2.reshape(T, nb, B).permute(1, 2, 0))  # (nb, K, T)
    if bag_indices is None:
        bag_indices = flat_bag_indices(indices, K)
    if bag_weights is None:
        bag_weights = values.permute(1, 0, 2).reshape(values.shape[1], -1)
    out = bag_indices.shape[0]
    yT = F.embedding_bag(bag_indices, zT.reshape(nb * K, T), per_sample_weights=bag_weights.to(dt), mode="sum")
    y = yT.t()
    if bias is not None:
        y = y + bias.to(dt)
    return y.reshape(*lead, out)


def ds_rebuild_weight(dictionary: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None, *,
                      bag_indices: torch.Tensor | None = None, bag_weights: torch.Tensor | None = None,
                      ) -> torch.Tensor:
    """The dense W (out x in) = [C_1 D_1, ..., C_nb D_nb], with one embedding_bag."""
    nb, K, B = dictionary.shape
    if bag_indices is None:
        bag_indices = flat_bag_indices(indices, K)
    if bag_weights is None:
        bag_weights = values.permute(1, 0, 2).reshape(values.shape[1], -1)
    out = bag_indices.shape[0]
    s = bag_indices.shape[1] // nb
    rows = F.embedding_bag(bag_indices.reshape(out * nb, s), dictionary.reshape(nb * K, B),
                           per_sample_weights=bag_weights.reshape(out * nb, s).to(dictionary.dtype), mode="sum")
    return rows.reshape(out, nb * B)


def ds_forward_rebuild(x: torch.Tensor, dictionary: torch.Tensor, values: torch.Tensor,
                       indices: torch.Tensor | None, bias: torch.Tensor | None = None, **bag) -> torch.Tensor:
    """Rebuild W, then one GEMM (for thousands of tokens)."""
    w = ds_rebuild_weight(dictionary, values, indices, **bag).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def ds_forward_torch(x: torch.Tensor, dictionary: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None,
                     bias: torch.Tensor | None = None, **bag) -> torch.Tensor:
    """Fastest uncompiled path: embedding_bag below REBUILD_MIN_TOKENS tokens, rebuild+GEMM above."""
    T = x.numel() // max(1, x.shape[-1])
    if T >= REBUILD_MIN_TOKENS:
        return ds_forward_rebuild(x, dictionary, values, indices, bias, **bag)
    return ds_forward_embedding_bag(x, dictionary, values, indices, bias, **bag)
