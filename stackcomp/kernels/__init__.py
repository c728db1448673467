"""Kernels for packed compressed layers: tensors and layouts only, nothing about passes.

Entry points:

* :func:`pack_ds` / :class:`PackedDS` -- re-lay a DS layer out for a kernel (fp32 or int8),
  save/load as plain tensors + JSON meta;
* :func:`ds_forward_packed` -- run a packed layer (compiled CPU kernel, torch, Triton, reference);
* :func:`choose_kernel` -- which kernel a target gets here;
* :func:`ds_forward_reference` -- the exact oracle on canonical tensors;
  :func:`ds_forward_act8_reference` -- the oracle of the int8 kernel with 8-bit activations;
  :func:`ds_forward_torch` -- the fastest uncompiled path on canonical tensors;
* :func:`semi_structured_24` -- 2:4 sparse weights for plain linears (CUDA, compute >= 8.0).

Importing this package loads nothing: the C++ kernel, compiled per ISA variant when the package
is built, is imported on first use, the best variant this CPU runs (see ``ds_cpu``, ``isa``).
"""

from stackcomp.kernels.dispatch import KERNELS, choose_kernel, ds_forward_packed
from stackcomp.kernels.ds_triton import semi_structured_24, semi_structured_24_supported
from stackcomp.kernels.packed import PackedDS, pack_ds
from stackcomp.kernels.reference import (
    KernelError,
    ds_forward_act8_reference,
    ds_forward_embedding_bag,
    ds_forward_rebuild,
    ds_forward_reference,
    ds_forward_torch,
    ds_rebuild_weight,
)

__all__ = [
    "KERNELS",
    "KernelError",
    "PackedDS",
    "choose_kernel",
    "ds_forward_act8_reference",
    "ds_forward_embedding_bag",
    "ds_forward_packed",
    "ds_forward_rebuild",
    "ds_forward_reference",
    "ds_forward_torch",
    "ds_rebuild_weight",
    "pack_ds",
    "semi_structured_24",
    "semi_structured_24_supported",
]
