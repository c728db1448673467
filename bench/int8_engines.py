"""PyTorch's dynamic int8 linear on its two x86 engines, side by side: fbgemm (the default) and
oneDNN (which uses the AMX tiles of Sapphire Rapids and later Xeons), by token count.

    python bench/int8_engines.py --threads 2
    python bench/int8_engines.py --threads 1 --tokens 1,20,64,1408

The ``torch`` int8 backend packs each weight for both and runs oneDNN from
``stackcomp.nn.quantized.ONEDNN_MIN_WORK`` (tokens x outputs) on where the CPU has AMX: this bench is where
that threshold comes from. Shapes are MiniLM's (hidden 384, FFN 1536) and pruned ones; the weight
and activations are random (the speed does not depend on them). Each cell is the min over rounds
of the per-round median microseconds; ``fbgemm/oneDNN`` > 1 means oneDNN is faster. The last
column checks the two engines' outputs agree (max |diff| / max |y|).
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from stackcomp.nn.quantized import _prepack_with, onednn_for_large_calls, quantize_rows

SHAPES = {"qkv 384->1152": (384, 1152), "attn out 384->384": (384, 384), "ffn in 384->1536": (384, 1536),
          "ffn out 1536->384": (1536, 384), "pruned qkv 384->288": (384, 288), "pruned ffn 384->288": (384, 288)}


def median_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="1,8,20,32,64,128,256,512,1408")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {args.threads}; AMX (oneDNN used for large calls): {onednn_for_large_calls()}")
    print(f"{'shape':22s} {'tokens':>6s} {'fbgemm us':>10s} {'oneDNN us':>10s} {'fbgemm/oneDNN':>14s} {'diff':>9s}")
    for label, (k, n) in SHAPES.items():
        w = torch.randn(n, k) / k ** 0.5
        q, scale = quantize_rows(w)
        bias = torch.randn(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(n, dtype=torch.long), 0)
        packed = {e: _prepack_with(e, qw, bias) for e in ("fbgemm", "onednn")}
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k)
            best = {}
            for _ in range(args.rounds):  # engines interleaved within each round
                for e, p in packed.items():
                    t = median_us(lambda p=p: torch.ops.quantized.linear_dynamic(x, p, True), args.reps)
                    best[e] = min(best.get(e, float("inf")), t)
            ya, yb = (torch.ops.quantized.linear_dynamic(x, packed[e], True) for e in ("fbgemm", "onednn"))
            diff = ((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-30)).item()
            print(f"{label:22s} {m:6d} {best['fbgemm']:10.1f} {best['onednn']:10.1f} "
                  f"{best['fbgemm'] / best['onednn']:14.2f} {diff:9.1e}", flush=True)


if __name__ == "__main__":
    main()
