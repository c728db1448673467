"""Which DS kernel runs where, and one entry point for a packed layer.

Kernels (names used by ``choose_kernel`` and ``ds_forward_packed(kernel=...)``):

* ``"cpu"``       -- the compiled C++ kernel (ds_cpu.cpp; the prebuilt ISA variant this CPU runs,
  see ``ds_cpu`` and ``isa``), CPU-packed layers, any token count;
* ``"torch"``     -- plain torch: embedding_bag below 1024 tokens, rebuild-W + GEMM above;
* ``"triton"``    -- the Triton kernels (CUDA, or the interpreter in tests), CUDA-packed layers;
* ``"reference"`` -- the exact float64 oracle (slow; for tests and debugging).
"""

from __future__ import annotations

import torch

from stackcomp.kernels import ds_cpu
from stackcomp.kernels.packed import PackedDS
from stackcomp.kernels.reference import KernelError, ds_forward_reference, ds_forward_torch, flat_bag_indices

KERNELS = ("cpu", "torch", "triton", "reference")


def choose_kernel(target: str = "auto", T_hint: int | None = None, build: bool = True) -> str:
    """The fastest kernel available for ``target`` ("cpu", "cuda" or "auto").

    cpu: the compiled kernel when one loads (``build=False`` only takes an already loaded one;
    in a never-built source tree it is compiled first), else torch. It beats the torch paths at
    every token count measured (1 to 2048), so ``T_hint`` does not change the CPU choice.
    cuda: Triton when importable, else torch; from ``T_hint >= 4096`` tokens torch's rebuild-W +
    one cuBLAS GEMM (a guess, not measured here: no GPU was available).
    """
    if target == "auto":
        target = "cuda" if torch.cuda.is_available() else "cpu"
    if target == "cpu":
        if build:
            return "cpu" if ds_cpu.get_extension() is not None else "torch"
        return "cpu" if ds_cpu._state["ext"] is not None else "torch"  # never starts a build
    if target == "cuda":
        from stackcomp.kernels.ds_triton import triton_available

        if T_hint is not None and T_hint >= 4096:
            return "torch"
        return "triton" if triton_available() else "torch"
    raise KernelError(f"kernel target must be 'cpu', 'cuda' or 'auto', got {target!r}")


def _canonical(packed: PackedDS) -> dict:
    """Dequantized canonical tensors + embedding_bag operands, made once per packed layer."""
    c = packed.cache.get("canonical")
    if c is None:
        d, v, i, b = packed.unpack()
        K = d.shape[1]
        c = {"dictionary": d, "values": v, "indices": i, "bias": b,
             "bag_indices": flat_bag_indices(i, K), "bag_weights": v.permute(1, 0, 2).reshape(v.shape[1], -1)}
        packed.cache["canonical"] = c
    return c


def ds_forward_packed(x: torch.Tensor, packed: PackedDS, kernel: str | None = None) -> torch.Tensor:
    """y = DS(x) for a packed layer, in x's dtype; ``kernel`` None picks one for the layer.

    None: a CPU-packed layer on CPU runs the compiled kernel (else torch); a CUDA-packed layer
    on a GPU runs Triton (else torch). The CPU choice is remembered in ``packed.cache``. The
    compiled kernels have no backward: when x needs a gradient, None means torch (differentiable
    in x), and naming a compiled kernel raises.
    """
    if x.requires_grad and torch.is_grad_enabled():
        if kernel in ("cpu", "triton"):
            raise KernelError(f"the {kernel} DS kernel has no backward; use kernel='torch' or run under "
                              "torch.no_grad()/inference_mode()")
        kernel = kernel or "torch"
    if kernel is None:
        fast = packed.cache.get("auto_cpu")
        if fast is not None and fast[0] == ds_cpu._state["gen"]:
            return fast[1](x)
        if packed.device.type == "cpu":
            kernel = "cpu" if packed.target == "cpu" and ds_cpu.get_extension() is not None else "torch"
            if kernel == "cpu":
                call = ds_cpu.cpu_caller(packed)
                packed.cache["auto_cpu"] = (ds_cpu._state["gen"], call)
                return call(x)
        else:
            T = x.numel() // max(1, x.shape[-1])
            kernel = choose_kernel("cuda", T_hint=T) if packed.target == "cuda" else "torch"
    if x.shape[-1] != packed.in_features:
        raise KernelError(f"input has {x.shape[-1]} features, the packed DS layer expects {packed.in_features}")
    if kernel == "cpu":
        return ds_cpu.ds_forward_cpu(x, packed)
    if kernel == "triton":
        from stackcomp.kernels.ds_triton import ds_forward_triton

        return ds_forward_triton(x, packed)
    if kernel in ("torch", "reference"):
        c = _canonical(packed)
        if kernel == "reference":
            return ds_forward_reference(x, c["dictionary"], c["values"], c["indices"], c["bias"])
        return ds_forward_torch(x, c["dictionary"], c["values"], None, c["bias"], bag_indices=c["bag_indices"],
                                bag_weights=c["bag_weights"])
    raise KernelError(f"unknown DS kernel {kernel!r}; known: {', '.join(KERNELS)}")
