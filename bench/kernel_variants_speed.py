"""The prebuilt CPU kernel variants against a JIT build with -march=native (what stackcomp compiled
at first use before the kernels were built at install time), on the same packed layers.

    python bench/kernel_variants_speed.py                          # 1 thread, tokens 1,128,512
    python bench/kernel_variants_speed.py --threads 2 --tokens 128

The -march=native build is compiled once here (gcc and ninja needed; cached in
TORCH_EXTENSIONS_DIR). Layers as in ds_kernel_speed.py (~2.8x compression, B = 128); every
variant this CPU runs is timed, interleaved, min over rounds of the median of several calls (us).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ds_kernel_speed import ds_config

from stackcomp.kernels import ds_cpu, isa
from stackcomp.kernels.packed import pack_ds

NATIVE_FLAGS = [*isa.COMMON_CFLAGS, "-march=native"]


def best_median_us(fns: dict, x: torch.Tensor, rounds: int = 7, calls: int = 9) -> dict[str, float]:
    best = {n: float("inf") for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                f(x)
                ts.append(time.perf_counter() - t)
            best[n] = min(best[n], statistics.median(ts))
    return {n: v * 1e6 for n, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1536x384,768x3072", help="out x in, comma-separated")
    ap.add_argument("--tokens", default="1,128,512")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    native = ds_cpu.load_extension(ds_cpu.extension_name(ds_cpu.SOURCE, NATIVE_FLAGS), [ds_cpu.SOURCE], NATIVE_FLAGS,
                                   list(isa.LDFLAGS))
    exts = {"native(JIT)": native}
    for v in isa.down_from(isa.detected()):
        ext, why = ds_cpu.import_built(v)
        if ext is None:
            raise SystemExit(f"the {v} variant is not built ({why}): pip install --no-build-isolation -e .")
        exts[v] = ext
    print(f"threads {a.threads}; CPU runs {isa.detected()}; times in us")
    g = torch.Generator().manual_seed(0)
    for shape in a.shapes.split(","):
        out, inn = map(int, shape.split("x"))
        nb, K, B, s = ds_config(out, inn)
        d = torch.randn(nb, K, B, generator=g)
        v = torch.randn(nb, out, s, generator=g)
        idx = torch.stack([torch.stack([torch.randperm(K, generator=g)[:s] for _ in range(out)])
                           for _ in range(nb)]).to(torch.uint8 if K <= 256 else torch.int16)
        bias = torch.randn(out, generator=g)
        for dtype in ("fp32", "int8"):
            for T in map(int, a.tokens.split(",")):
                x = torch.randn(T, inn, generator=g)
                fns = {n: ds_cpu.cpu_caller(pack_ds(d, v, idx, bias, dtype=dtype), e) for n, e in exts.items()}
                us = best_median_us(fns, x)
                print(f"{shape:9s} {dtype} T={T:4d}  " + "  ".join(f"{n}={t:9.1f}" for n, t in us.items()), flush=True)


if __name__ == "__main__":
    main()
