"""Batched OMP (stackcomp) against scikit-learn's orthogonal_mp_gram, same problems, one run.

10,000 random signals, a random unit-norm dictionary of K=64 atoms, s=8 non-zeros, signal
dimension 32 (K = 2B, the overcomplete shape DSFormer uses) and 64 (K = B). Both solvers get the
same Gram matrix and correlations. Prints the wall times, the speed ratio, the share of rows
with identical supports and the largest coefficient difference.

    python bench/omp.py [--rows 10000] [--atoms 64] [--nnz 8] [--dims 32 64] [--threads 2] [--omp-threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from sklearn.linear_model import orthogonal_mp_gram

from stackcomp.factorize.omp import codes_to_dense, omp


def best_of(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--atoms", type=int, default=64)
    ap.add_argument("--nnz", type=int, default=8)
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the process")
    ap.add_argument("--omp-threads", type=int, default=1,
                    help="threads inside omp() (its num_threads; 0: leave the process setting)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} process threads, omp num_threads="
          f"{args.omp_threads or 'process'}; rows={args.rows} K={args.atoms} s={args.nnz}; "
          f"load average {os.getloadavg()[0]:.1f} (2 cores)")
    for B in args.dims:
        rng = np.random.default_rng(0)
        D = rng.standard_normal((args.atoms, B))
        D /= np.linalg.norm(D, axis=1, keepdims=True)
        X = rng.standard_normal((args.rows, B))
        G, Xy = D @ D.T, D @ X.T  # float64, as sklearn wants them

        t = time.perf_counter()
        C_ref = orthogonal_mp_gram(G, Xy, n_nonzero_coefs=args.nnz).T  # (rows, K)
        t_sk = time.perf_counter() - t

        g32 = torch.tensor(G, dtype=torch.float32)
        xy32 = torch.tensor(Xy.T, dtype=torch.float32).contiguous()
        g64 = torch.tensor(G)
        xy64 = torch.tensor(Xy.T).contiguous()
        nt = args.omp_threads or None
        omp(g32, xy32, args.nnz, num_threads=nt)  # warm-up
        for name, g, xy in (("fp32", g32, xy32), ("fp64", g64, xy64)):
            dtype = torch.float64 if name == "fp64" else torch.float32
            t_min, t_med, (v, i) = best_of(lambda: omp(g, xy, args.nnz, dtype=dtype, num_threads=nt), args.repeats)
            C = codes_to_dense(v.double(), i, args.atoms).numpy()
            same = float(((C != 0) == (C_ref != 0)).all(axis=1).mean())
            diff = float(np.abs(C - C_ref).max())
            print(
                f"B={B:3d} {name}: sklearn {t_sk * 1e3:8.1f} ms | ours best {t_min * 1e3:6.1f} ms "
                f"(median {t_med * 1e3:6.1f}) | speed-up {t_sk / t_min:6.1f}x (median {t_sk / t_med:6.1f}x) | "
                f"identical supports {same * 100:6.2f}% | max |coef diff| {diff:.2e}"
            )


if __name__ == "__main__":
    main()
