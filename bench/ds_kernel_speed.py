"""Packed DS layer kernels against dense fp32 and int8 dense linears, side by side in one run.

    python bench/ds_kernel_speed.py                   # all shapes, tokens 1,128,2048, torch's thread count
    python bench/ds_kernel_speed.py --threads 1,2 --shapes 768x768 --tokens 128

For each weight shape (out x in) a DS layer at ~2.8x compression of the linear's bytes (fp32
values, uint8 indices when K <= 256; B = 128, K per ``--atoms``, s filling the budget) is made with
random factors of the right shapes (speed does not depend on the numbers), packed fp32 and int8,
and timed against:
  dense   nn.Linear fp32
  qdyn    torch.ao dynamic int8 quantization (fbgemm/x86; per-tensor activation scales)
  bnb     bitsandbytes Linear8bitLt(has_fp16_weights=False) (int8 weights + activations)
  ds32    packed DS, fp32, compiled CPU kernel
  ds8     packed DS, int8 dictionary and values, compiled CPU kernel (the one the pack pass picks:
          8-bit activations and a permute-gather on AVX-512 VBMI+VNNI CPUs, else ds8q15)
  ds8q15  the same layer on the 16-bit-activation int8 kernel (AVX2)
  dstorch DS on the plain torch path (embedding_bag / rebuild+GEMM), the no-compiler fallback
Timing: rounds interleave all candidates; each round takes the median of several calls; the
table shows the minimum over rounds of those medians (min-of-medians), in microseconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings

import torch
from torch import nn

from stackcomp.kernels import ds_cpu
from stackcomp.kernels.dispatch import ds_forward_packed
from stackcomp.kernels.packed import pack_ds
from stackcomp.kernels.reference import ds_forward_reference

SHAPES = ["384x384", "1536x384", "384x1536", "768x768", "3072x768", "768x3072"]


def ds_config(out: int, inn: int, block: int = 128, ratio: float = 2.8,
              atoms: int | str | None = "auto") -> tuple[int, int, int, int]:
    """(nb, K, B, s) with bytes(dense fp32 + bias) / bytes(DS) >= ratio.

    ``atoms`` an int K: s is the largest that fits, capped at min(K, B). ``"auto"`` (default):
    K = 128 if that leaves s >= B/8, else 64 (a block's z is then one or two registers in the
    vnni8 kernel). ``None`` (the sizes of sessions 1-5, made for the q15 kernel): s = B/8 and K
    as large as fits (<= 256, so indices stay uint8); if K hits 256, s takes the rest.
    """
    nb = inn // block
    budget = (out * inn * 4 + out * 4) / ratio - out * 4

    def fill(K: int) -> int:
        return min(int((budget - nb * K * block * 4) // (nb * out * 5)), K, block)

    if atoms == "auto":
        atoms = 128 if fill(128) >= block // 8 else 64
    if atoms is not None:
        s = fill(int(atoms))
        if s < 1:
            raise ValueError(f"{out}x{inn}: K={atoms} atoms of width {block} leave no bytes for values at {ratio}x")
        return nb, int(atoms), block, s
    s = block // 8
    K = int((budget - nb * out * s * 5) // (nb * block * 4))
    if K > 256:
        K = 256
        s = int((budget - nb * K * block * 4) // (nb * out * 5))
    return nb, K, block, s


def ds_bytes(nb: int, K: int, B: int, s: int, out: int) -> int:
    return nb * K * B * 4 + nb * out * s * (4 + (1 if K <= 256 else 2)) + out * 4


def bnb_linear(lin: nn.Linear):
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001
        return None
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns on every fp32 call
    m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False)
    m.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    m.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return m.to("cpu").eval()


def time_interleaved(fns: dict, rounds: int = 5, budget_s: float = 0.03, min_calls: int = 3) -> dict[str, float]:
    meds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            t0 = time.perf_counter()
            f()
            one = time.perf_counter() - t0
            n = max(min_calls, min(200, int(budget_s / max(one, 1e-7))))
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            meds[k].append(statistics.median(ts))
    return {k: min(v) * 1e6 for k, v in meds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,128,2048")
    ap.add_argument("--threads", default=str(torch.get_num_threads()))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-torch-path", action="store_true", help="skip the dstorch column")
    ap.add_argument("--atoms", default="auto", help="K per block, s filling the 2.8x budget; 'auto': 128 if that "
                    "leaves s >= B/8, else 64; 'max': s = B/8 and K as large as fits (the sizes before session 6)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    t0 = time.time()
    ext = ds_cpu.get_extension()
    print(f"CPU kernel: {'built ' + ext.build_info() if ext else 'NOT available: ' + str(ds_cpu.build_error())}"
          f" ({time.time() - t0:.1f} s); torch {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}")
    shapes = [tuple(int(a) for a in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    cols = ["dense", "qdyn", "bnb", "ds32", "ds8", "ds8q15"] + ([] if args.no_torch_path else ["dstorch"])
    rows = []
    atoms = None if args.atoms == "max" else args.atoms if args.atoms == "auto" else int(args.atoms)
    for out, inn in shapes:
        nb, K, B, s = ds_config(out, inn, atoms=atoms)
        d = torch.randn(nb, K, B)
        v = torch.randn(nb, out, s)
        idx = torch.randint(0, K, (nb, out, s), dtype=torch.uint8 if K <= 256 else torch.int16)
        bias = torch.randn(out)
        p32, p8 = pack_ds(d, v, idx, bias, dtype="fp32"), pack_ds(d, v, idx, bias, dtype="int8")
        lin = nn.Linear(inn, out).eval()
        qdyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(inn, out)), {nn.Linear},
                                                      dtype=torch.qint8).eval()
        bnbl = bnb_linear(lin)
        ratio = (out * inn * 4 + out * 4) / ds_bytes(nb, K, B, s, out)
        flops = out * inn / (inn * K + out * nb * s)
        # correctness, once per shape
        xc = torch.randn(37, inn)
        with torch.inference_mode():
            e32 = (ds_forward_packed(xc, p32) - ds_forward_reference(xc, d, v, idx, bias)).abs().max()
            r8 = ds_forward_reference(xc, *p8.unpack())
            e8 = (ds_forward_packed(xc, p8) - r8).abs().max() / r8.abs().max()
            q15 = ds_cpu.cpu_caller(p8, int8_kernel_name="q15") if ext else None
            e8q = (q15(xc) - r8).abs().max() / r8.abs().max() if q15 else float("nan")
        kern8 = ds_cpu.int8_kernel(p8, ext) if ext else "torch"
        cfg = (f"{out}x{inn}: B={B} K={K} s={s} nb={nb}, bytes {ratio:.2f}x, MACs {flops:.2f}x smaller "
               f"(check: ds32 max abs err {float(e32):.1e}; max abs err / max |y| vs the dequantized layer: ds8 "
               f"[{kern8}] {float(e8):.1e}, ds8q15 {float(e8q):.1e})")
        print(cfg, flush=True)
        for nt in threads:
            torch.set_num_threads(nt)
            for T in tokens:
                x = torch.randn(T, inn)
                fns = {"dense": lambda: lin(x), "qdyn": lambda: qdyn(x),
                       "ds32": lambda: ds_forward_packed(x, p32), "ds8": lambda: ds_forward_packed(x, p8)}
                if bnbl is not None:
                    fns["bnb"] = lambda: bnbl(x)
                if q15 is not None:
                    fns["ds8q15"] = lambda: q15(x)
                if not args.no_torch_path:
                    fns["dstorch"] = lambda: ds_forward_packed(x, p32, kernel="torch")
                with torch.inference_mode():
                    r = time_interleaved(fns, rounds=args.rounds)
                rows.append((f"{out}x{inn}", nt, T, r))
                dn = r["dense"]
                print(f"  threads={nt} T={T:5d}  " + "  ".join(f"{k} {r[k]:9.0f}" for k in cols if k in r)
                      + f"  | ds32 {dn / r['ds32']:.2f}x ds8 {dn / r['ds8']:.2f}x dense;"
                      f" ds8 {r['qdyn'] / r['ds8']:.2f}x qdyn" + (f", {r['bnb'] / r['ds8']:.2f}x bnb" if "bnb" in r
                                                                   else ""), flush=True)
    print("\nSpeed-up over dense fp32 nn.Linear (higher is better); last columns: ds8 over the int8 baselines")
    hdr = f"{'shape':>9} {'thr':>3} {'T':>5} | " + " ".join(f"{c:>7}" for c in cols if c != "dense") + \
        " | ds8/qdyn ds8/bnb | dense us"
    print(hdr)
    print("-" * len(hdr))
    for shape, nt, T, r in rows:
        dn = r["dense"]
        sp = " ".join(f"{dn / r[c]:7.2f}" if c in r else f"{'-':>7}" for c in cols if c != "dense")
        print(f"{shape:>9} {nt:>3} {T:>5} | {sp} | {r['qdyn'] / r['ds8']:8.2f} "
              f"{(r['bnb'] / r['ds8']) if 'bnb' in r else float('nan'):7.2f} | {dn:8.0f}")


if __name__ == "__main__":
    main()
