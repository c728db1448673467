"""PyTorch's dynamic int8 linear on its two x86 engines, side by side: fbgemm (the default) and
oneDNN (which uses the AMX tiles of Sapphire Rapids and later Xeons), by token count.

    python bench/int8_engines.py --threads 2
    python bench/int8_engines.py --threads 1 --tokens 1,20,64,1408
    python bench/int8_engines.py --threads 2 --kernel              # + the kernel backend against the torch one
    STACKCOMP_DATA_DIR=../shared/data python bench/int8_engines.py --model --threads 2 --batch-size 32

The ``torch`` int8 backend runs oneDNN (a copy of the weight packed on first use) from
``stackcomp.nn.quantized.ONEDNN_MIN_WORK`` (tokens x outputs) on where the CPU has AMX: this bench is where
that threshold comes from. Shapes are MiniLM's (hidden 384, FFN 1536) and pruned ones; the weight
and activations are random (the speed does not depend on them). Each cell is the min over rounds
of the per-round median microseconds; ``fbgemm/oneDNN`` > 1 means oneDNN is faster. The last
column checks the two engines' outputs agree (max |diff| / max |y|).

``--kernel``: also the ``kernel`` int8 backend (8-bit per-row activations on stackcomp's compiled kernel,
VNNI / AMX) against the ``torch`` backend as it runs (fbgemm, or oneDNN from ``ONEDNN_MIN_WORK``), each as an
``Int8Linear`` of the same weights; ``torch/kernel`` > 1 means the kernel is faster; the error columns are
each backend's relative Frobenius error against the fp32 product.

``--model``: the whole all-MiniLM-L6-v2 on SST-2 dev batches (the offline weights, classifier
head untrained: speed and agreement only), fp32 against the int8 pass (``backend: torch``) run
with fbgemm only and with the oneDNN switch, interleaved by ``bench/model_latency.py``'s timer.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from contextlib import contextmanager

import torch

import stackcomp.nn.quantized as Q
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


@contextmanager
def onednn_from(work: int):
    before = Q.ONEDNN_MIN_WORK
    Q.ONEDNN_MIN_WORK = work
    try:
        yield
    finally:
        Q.ONEDNN_MIN_WORK = before


class WithWork:
    """The model called with ``ONEDNN_MIN_WORK`` set to ``work`` (2**62: fbgemm for every call)."""

    def __init__(self, model, work: int):
        self.model, self.work = model, work

    def __call__(self, **batch):
        with onednn_from(self.work):
            return self.model(**batch)


@torch.inference_mode()
def bench_model(args) -> None:
    import logging

    from model_latency import time_models  # bench/, beside this script

    from stackcomp.data import DataOptions, TaskData, get_task
    from stackcomp.models import load_base_model
    from stackcomp.passes.base import PassContext, run_pass
    from stackcomp.passes.int8 import Int8Pass

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    for name in ("stackcomp", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    task = get_task("glue/sst2")
    model, tok = load_base_model("minilm-l6", task)
    model.eval()
    data = TaskData(task, tok, DataOptions(max_length=128))
    batches = []
    for i, b in enumerate(data.eval_loader(args.batch_size, sort_by_length=False)):
        if i >= args.batches:
            break
        batches.append({k: v for k, v in b.items() if k != "labels"})
    with tempfile.TemporaryDirectory() as tmp:
        int8 = run_pass(Int8Pass({"backend": "torch"}), copy.deepcopy(model),
                        PassContext(stage="int8", work_dir=tmp))
    models = {"fp32": model, "int8 fbgemm": WithWork(int8, 1 << 62), "int8 auto": WithWork(int8, Q.ONEDNN_MIN_WORK)}
    ms = time_models(models, batches, args.rounds)

    def last_hidden(m, b):  # the encoder's output: the head is untrained here
        return m(**b, output_hidden_states=True).hidden_states[-1]

    ref = [last_hidden(models["fp32"], b) for b in batches]
    fb = [last_hidden(models["int8 fbgemm"], b) for b in batches]
    diff = {n: (max(float((last_hidden(m, b) - r).norm() / r.norm()) for b, r in zip(batches, ref)),
                max(float((last_hidden(m, b) - f).norm() / f.norm()) for b, f in zip(batches, fb)))
            for n, m in models.items()}
    tokens = sum(b["attention_mask"].numel() for b in batches) / len(batches)
    print(f"\nall-MiniLM-L6-v2 on SST-2 dev: {len(batches)} batches x {args.batch_size} ({tokens:.0f} padded "
          f"tokens a batch), threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':<12} {'ms/batch':>9} {'vs fp32':>8} {'vs fbgemm':>10} {'err vs fp32':>12} {'err vs fbgemm':>14}")
    for n in models:
        print(f"{n:<12} {ms[n]:>9.2f} {ms['fp32'] / ms[n]:>7.2f}x {ms['int8 fbgemm'] / ms[n]:>9.2f}x "
              f"{diff[n][0]:>12.1e} {diff[n][1]:>14.1e}")
    print("(err: relative Frobenius error of the encoder's last hidden states, the largest over the batches)")


def bench_kernel(args) -> None:
    """The ``kernel`` int8 backend against the ``torch`` one (with its oneDNN switch), per shape and token count."""
    from torch import nn

    ok, why = Q.get_backend("kernel").available(torch.device("cpu"))
    if not ok:
        raise SystemExit(f"the kernel backend cannot run here: {why}")
    torch.manual_seed(0)
    print(f"threads {args.threads}; AMX (oneDNN for the torch backend's large calls): {onednn_for_large_calls()}")
    print(f"{'shape':22s} {'tokens':>6s} {'torch us':>9s} {'kernel us':>10s} {'torch/kernel':>13s} "
          f"{'err torch':>10s} {'err kernel':>11s}")
    for label, (k, n) in SHAPES.items():
        lin = nn.Linear(k, n)
        layers = {b: Q.Int8Linear.from_linear(lin, b) for b in ("torch", "kernel")}
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k)
            best: dict[str, float] = {}
            with torch.inference_mode():
                for _ in range(args.rounds):  # backends interleaved within each round
                    for b, layer in layers.items():
                        best[b] = min(best.get(b, float("inf")), median_us(lambda l=layer: l(x), args.reps))
                ref = lin(x)
                err = {b: float((layer(x) - ref).norm() / ref.norm()) for b, layer in layers.items()}
            print(f"{label:22s} {m:6d} {best['torch']:9.1f} {best['kernel']:10.1f} {best['torch'] / best['kernel']:13.2f} "
                  f"{err['torch']:10.4f} {err['kernel']:11.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="1,8,20,32,64,128,256,512,1408")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--model", action="store_true", help="time the whole MiniLM int8 model instead")
    ap.add_argument("--kernel", action="store_true", help="time the kernel int8 backend against the torch one instead")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        return bench_model(args)
    if args.kernel:
        return bench_kernel(args)
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
