"""Whole-model latency on SST-2 dev batches: fp32 vs int8-only vs DS (+int8) packed, in one run.

    STACKCOMP_DATA_DIR=../shared/data python bench/model_latency.py
    python bench/model_latency.py --threads 2 --batch-size 32 --batches 8 --ratio 2.8 --json

The models are built here with the passes, from MiniLM-L6 (the offline ``minilm-l6`` alias,
random classification head: accuracy is not measured, speed does not depend on it):

  fp32      the model as loaded
  int8      int8 pass (torch backend) on every encoder linear
  ds        ds_factorize at ``--ratio`` of the linear bytes, no STF (no training), packed fp32
  ds+int8   the same factors through the int8 pass (torch backend), packed int8 (the full stack)

Timing: each round runs every model over the same dev batches (the first ``--batches`` in file
order, as ``evaluate`` times them), the models taking turns on every batch (order reversed every
other round), and takes each model's median per batch; the table shows the minimum over rounds
of those medians (min-of-medians), with the ratios against fp32 and against int8-only. ``agree``
is the share of sequences whose argmax matches fp32's (a sanity check, not accuracy). Bytes are
whole-model bytes (embeddings included).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from stackcomp.data import DataOptions, TaskData, get_task
from stackcomp.evaluate import size_report
from stackcomp.models import load_base_model
from stackcomp.passes.base import PassContext, run_pass
from stackcomp.passes.ds_factorize import DSFactorizePass
from stackcomp.passes.int8 import Int8Pass
from stackcomp.passes.pack import PackPass


def block_candidates(model, ratio: float, block: int) -> list[list[int]]:
    """One (B, K, s) per distinct encoder linear shape at ``ratio`` with block width ``block``:
    sized as bench/ds_kernel_speed.py sizes its layers (K = 128 or 64, s filling the budget)."""
    from stackcomp.targets import select_modules

    from ds_kernel_speed import ds_config  # bench/ds_kernel_speed.py, beside this script

    shapes = sorted({(m.out_features, m.in_features) for _, m in select_modules(model)})
    cands = []
    for out, inn in shapes:
        _, K, B, s = ds_config(out, inn, block=block, ratio=ratio)
        cands.append([B, K, s])
    return cands


def build_models(model, ratio: float, iters: int, backend: str, log, block: int | None = None) -> dict:
    def apply(the_pass, m):
        """The pass as the engine runs it (analyze, transform, finetune) on a fresh context."""
        ctx = PassContext(stage="bench", work_dir=Path("/tmp"), log=log)
        return run_pass(the_pass, m, ctx), ctx.analysis.report

    models = {"fp32": model}
    models["int8"], _ = apply(Int8Pass({"backend": backend}), copy.deepcopy(model))
    t = time.perf_counter()
    params = {"ratio": ratio, "stf": False, "iters": iters, "train": {"epochs": 0}}
    if block:
        params["candidates"] = block_candidates(model, ratio, block)
        log.info("candidates (B, K, s): %s", params["candidates"])
    dsm, _ = apply(DSFactorizePass(params), copy.deepcopy(model))
    log.info("factorized in %.0f s", time.perf_counter() - t)
    stack, _ = apply(Int8Pass({"backend": backend}), copy.deepcopy(dsm))
    models["ds"], _ = apply(PackPass({"target": "cpu"}), dsm)
    models["ds+int8"], report = apply(PackPass({"target": "cpu"}), stack)
    models["_kernel"] = report["ds_kernel"]
    return models


@torch.inference_mode()
def time_models(models: dict, batches: list[dict], rounds: int) -> dict[str, float]:
    """Min over rounds of each model's median ms per batch. Models take turns on every batch, so
    a slow spell of the machine (other tenants, frequency) hits them all alike."""
    best: dict[str, float] = {}
    for name, m in models.items():  # warm up: kernel builds, prepacked weights, allocator
        for b in batches[:2]:
            m(**b)
    for r in range(rounds):
        per: dict[str, list[float]] = {name: [] for name in models}
        order = list(models.items())
        if r % 2:
            order.reverse()  # nobody always runs first after another model warmed the caches
        for b in batches:
            for name, m in order:
                t0 = time.perf_counter()
                m(**b)
                per[name].append(time.perf_counter() - t0)
        for name, times in per.items():
            best[name] = min(best.get(name, float("inf")), statistics.median(times) * 1e3)
    return best


@torch.inference_mode()
def agreement(models: dict, batches: list[dict], ref_name: str = "fp32") -> dict[str, float]:
    """Share of sequences whose argmax matches the ``ref_name`` model's."""
    ref = [models[ref_name](**b).logits.argmax(-1) for b in batches]
    out = {}
    for name, m in models.items():
        got = [m(**b).logits.argmax(-1) for b in batches]
        out[name] = float(sum(int((g == r).sum()) for g, r in zip(got, ref)) / sum(r.numel() for r in ref))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--ratio", type=float, default=2.8, help="DS compression of the linear bytes")
    ap.add_argument("--iters", type=int, default=4, help="dictionary-learning iterations (speed only)")
    ap.add_argument("--block", type=int, default=None,
                    help="DS block width for every layer (kernel-friendly sizes); default: the pass's own "
                         "least-error search, i.e. what the recipes get")
    ap.add_argument("--backend", default="torch", choices=["torch", "bitsandbytes"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="also print one JSON line with everything")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("stackcomp", "bitsandbytes", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    log = logging.getLogger("bench")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    task = get_task("glue/sst2")
    model, tok = load_base_model(args.model, task)
    model.eval()
    data = TaskData(task, tok, DataOptions(max_length=args.max_length))
    batches = []
    for i, b in enumerate(data.eval_loader(args.batch_size, sort_by_length=False)):
        if i >= args.batches:
            break
        batches.append({k: v for k, v in b.items() if k != "labels"})
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)

    models = build_models(model, args.ratio, args.iters, args.backend, log, args.block)
    kernel = models.pop("_kernel")
    ms = time_models(models, batches, args.rounds)
    agree = agreement(models, batches)
    sizes = {n: size_report(m)["model_bytes"] for n, m in models.items()}
    lin = {n: size_report(m)["linear_bytes"] for n, m in models.items()}

    print(f"\n{args.model} on SST-2 dev: {len(batches)} batches x {args.batch_size} sequences, max_length "
          f"{args.max_length} ({tokens:.0f} real tokens per batch), threads {torch.get_num_threads()}, "
          f"DS blocks: {args.block or 'searched per layer'}, "
          f"load average {os.getloadavg()[0]:.1f}, DS kernel: {kernel}, int8 backend: {args.backend}")
    print(f"{'model':<9} {'ms/batch':>9} {'vs fp32':>8} {'vs int8':>8} {'MB':>7} {'linear MB':>10} {'agree':>6}")
    for n in models:
        print(f"{n:<9} {ms[n]:>9.2f} {ms['fp32'] / ms[n]:>7.2f}x {ms['int8'] / ms[n]:>7.2f}x {sizes[n] / 1e6:>7.2f} "
              f"{lin[n] / 1e6:>10.2f} {agree[n]:>6.3f}")
    if args.json:
        print(json.dumps({"args": vars(args), "ms_per_batch": ms, "model_bytes": sizes, "linear_bytes": lin,
                          "argmax_agreement": agree, "ds_kernel": kernel, "threads": torch.get_num_threads(),
                          "load_average": os.getloadavg()[0], "tokens_per_batch": tokens}))


if __name__ == "__main__":
    main()
