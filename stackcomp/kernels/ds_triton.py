"""DS layer on GPU with Triton, and the 2:4 semi-structured helper for plain linears.

Two kernels, not one fused kernel:

1. ``z = x_b D_b^T`` for every block: a batched tile GEMM on tensor cores (``tl.dot``), written
   as z (T, nb*K) in fp32;
2. the gather: each program owns BLOCK_T tokens x BLOCK_O output rows and accumulates
   ``v[b, j, o] * z[t, b*K + idx[b, j, o]]`` over all blocks and nonzeros, then adds the bias.

Why not fused: a program that makes its own z tile must make it for *all* K atoms of every
block, yet it only serves its BLOCK_O output rows, so every output tile recomputes z: the
dictionary product would be done out/BLOCK_O times (12x for out=768, BLOCK_O=64: more work than
the dense layer). Keeping z for all outputs needs one program per token tile (too few programs
for small T). z is small (T*nb*K floats, the size of the activations when K ~ B), so writing it
once and reading it from L2 costs less than either.

Layout (``pack_ds(..., target="cuda")``): values/indices ``(nb, 1, s, out_pad)``, i.e. (nb, s, out),
so neighbouring output rows are neighbouring addresses. fp32 activations use exact fp32 dots
(``input_precision="ieee"``, like ``nn.Linear`` without TF32); fp16/bf16 use tensor cores with
fp32 accumulation. int8 packs are dequantized on load (per atom / per row scales).

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported) on
CPU tensors: that is how the tests check them.
"""

from __future__ import annotations

import functools

import torch

from stackcomp.kernels.packed import PackedDS
from stackcomp.kernels.reference import KernelError


def triton_available() -> bool:
    """Triton imports and can run here: a CUDA device, or the interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means: not available
        return False
    return torch.cuda.is_available() or _interpreting()


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def ds_z_kernel(x_ptr, d_ptr, ds_ptr, z_ptr, T, NB, K, B, stride_xt, stride_zt,
                    QUANT: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_k = tl.program_id(1)
        b = tl.program_id(2)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mt = offs_t < T
        mk = offs_k < K
        acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for i0 in range(0, B, BLOCK_B):
            offs_i = i0 + tl.arange(0, BLOCK_B)
            mi = offs_i < B
            xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + b * B + offs_i[None, :],
                         mask=mt[:, None] & mi[None, :], other=0.0)
            dt = tl.load(d_ptr + b * K * B + offs_k[None, :] * B + offs_i[:, None],
                         mask=mi[:, None] & mk[None, :], other=0)          # D_b^T tile (BLOCK_B, BLOCK_K)
            if IEEE:  # fp32 activations (and bf16 under the interpreter, whose bf16 dot is wrong)
                acc += tl.dot(xt.to(tl.float32), dt.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xt, dt.to(xt.dtype))
        if QUANT:
            acc = acc * tl.load(ds_ptr + b * K + offs_k, mask=mk, other=0.0)[None, :]
        tl.store(z_ptr + offs_t[:, None] * stride_zt + b * K + offs_k[None, :], acc,
                 mask=mt[:, None] & mk[None, :])

    @triton.jit
    def ds_gather_kernel(z_ptr, v_ptr, i_ptr, vs_ptr, bias_ptr, y_ptr, T, OUT, OUTP, NB, K, S,
                         stride_zt, stride_yt,
                         QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_o = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        mt = offs_t < T
        mo = offs_o < OUT
        m2 = mt[:, None] & mo[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        zrow = z_ptr + offs_t[:, None] * stride_zt
        for b in range(0, NB):
            for j in range(0, S):
                base = (b * S + j) * OUTP
                v = tl.load(v_ptr + base + offs_o, mask=mo, other=0).to(tl.float32)
                ix = tl.load(i_ptr + base + offs_o, mask=mo, other=0).to(tl.int32)
                zz = tl.load(zrow + b * K + ix[None, :], mask=m2, other=0.0)
                acc += zz * v[None, :]
        if QUANT:
            acc = acc * tl.load(vs_ptr + offs_o, mask=mo, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_o, mask=mo, other=0.0)[None, :]
        tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_o[None, :], acc.to(y_ptr.dtype.element_ty), mask=m2)

    return ds_z_kernel, ds_gather_kernel


def _pow2(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def ds_forward_triton(x: torch.Tensor, packed: PackedDS, block_t: int | None = None,
                      block_o: int | None = None) -> torch.Tensor:
    """Run the two Triton kernels; x (..., in) fp32/fp16/bf16 on the pack's device -> y in x's dtype."""
    if not triton_available():
        raise KernelError("Triton is not available here (needs a CUDA device, or TRITON_INTERPRET=1 for tests)")
    if packed.target != "cuda":
        raise KernelError("the Triton DS kernel needs a layer packed with target='cuda' (layout (nb, s, out))")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise KernelError(f"the Triton DS kernel takes fp32/fp16/bf16 activations, got {x.dtype}")
    if x.device != packed.device:
        raise KernelError(f"input is on {x.device}, the packed layer on {packed.device}")
    z_kernel, gather_kernel = _kernels()
    m, t = packed.meta, packed.tensors
    nb, K, B, s = int(m["n_blocks"]), int(m["atoms"]), int(m["block"]), int(m["nnz"])
    out, out_pad = packed.out_features, int(m["out_pad"])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.shape[1] != nb * B:
        raise KernelError(f"input has {x2.shape[1]} features, the packed layer expects {nb * B}")
    T = x2.shape[0]
    q = packed.dtype == "int8"
    z = torch.empty(T, nb * K, device=x2.device, dtype=torch.float32)
    y = torch.empty(T, out, device=x2.device, dtype=x2.dtype)
    if T == 0:
        return y.reshape(*lead, out)
    BT = block_t or _pow2(T, 16, 64)
    BK = _pow2(K, 16, 64)
    BB = _pow2(B, 16, 64)
    dsc = t["dictionary_scale"] if q else t["dictionary"]  # unused pointer when not QUANT
    ieee = x2.dtype == torch.float32 or (x2.dtype == torch.bfloat16 and _interpreting())
    z_kernel[(triton_cdiv(T, BT), triton_cdiv(K, BK), nb)](
        x2, t["dictionary"], dsc, z, T, nb, K, B, x2.stride(0), z.stride(0),
        QUANT=q, IEEE=ieee, BLOCK_T=BT, BLOCK_K=BK, BLOCK_B=BB)
    BO = block_o or _pow2(out, 16, 64)
    BT2 = block_t or _pow2(T, 1, 32)
    vs = t["values_scale"] if q else t["values"]
    bias = t.get("bias")
    gather_kernel[(triton_cdiv(T, BT2), triton_cdiv(out, BO))](
        z, t["values"], t["indices"], vs, bias if bias is not None else z, y, T, out, out_pad, nb, K, s,
        z.stride(0), y.stride(0), QUANT=q, HAS_BIAS=bias is not None, BLOCK_T=BT2, BLOCK_O=BO)
    return y.reshape(*lead, out)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------- 2:4

def semi_structured_24_supported(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, "") where ``torch.sparse.to_sparse_semi_structured`` can run, else (False, why)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (2:4 semi-structured sparsity needs an NVIDIA GPU)"
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False, f"tensor is on {dev}; 2:4 semi-structured sparsity runs on CUDA only"
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 0):
        return False, f"CUDA compute capability {cap[0]}.{cap[1]} < 8.0 (Ampere or newer is needed)"
    return True, ""


def is_24_sparse(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive input columns (the reduction dim)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def semi_structured_24(weight: torch.Tensor):
    """A 2:4-pruned weight (out x in) as a ``SparseSemiStructuredTensor`` for ``F.linear``.

    Raises KernelError with a plain reason when the device cannot run it (CPU, GPUs older than
    Ampere) or when the weight is not 2:4 along its input dimension.
    """
    ok, why = semi_structured_24_supported(weight.device if weight.is_cuda else "cpu")
    if not ok:
        raise KernelError(f"2:4 semi-structured sparsity is not supported on this device: {why}")
    if not is_24_sparse(weight):
        raise KernelError("weight is not 2:4 sparse along its input dimension (at most 2 nonzeros in every 4 "
                          f"consecutive columns, in % 4 == 0); shape {tuple(weight.shape)}")
    try:
        return torch.sparse.to_sparse_semi_structured(weight)
    except (RuntimeError, ValueError) as e:
        raise KernelError(f"2:4 semi-structured conversion failed for a {tuple(weight.shape)} {weight.dtype} weight: "
                          f"{e}") from e
