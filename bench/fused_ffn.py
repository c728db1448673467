"""The fused int8 FFN kernel against torch's int8 linears and fp32, side by side in one run.

    python bench/fused_ffn.py                         # per FFN, 384->1536->384, threads 1,2
    python bench/fused_ffn.py --threads 1 --dims 768x3072 --act gelu_tanh
    python bench/fused_ffn.py --model                 # also whole models: a random MiniLM-L6-shaped
                                                      # 3-layer student, int8 + pack, with and without fuse_ffn
    python bench/fused_ffn.py --model path/to/packed  # ... or a saved int8 (unpacked or packed) model
    python bench/fused_ffn.py --threads 1 --clock thread   # CPU time of the calling thread (shared machines)

Per FFN (one transformer block's linear, GELU, linear), at batch 32 x 50 tokens and batch 1 x 20 tokens:
  fp32      nn.Linear + GELU + nn.Linear
  int8      Int8Linear (torch backend: quantized::linear_dynamic, fbgemm, per-tensor reduce_range
            activations) + GELU + Int8Linear: what the int8 pass leaves
  fused     FusedInt8FFN (pack's fuse_ffn): one C++ call, per-row 8-bit activations; on a CPU with AMX,
            calls of at least AMX_MIN_TOKENS tokens run its AMX path
  fused_vnni  the same kernel held to its AVX-512 VNNI path (only shown where AMX is available)
  fused_pt  the same kernel on its portable (non-VNNI) path (``--generic``)
``--crossover``: the kernel's AMX path against its VNNI path by token count (where AMX is available),
which is what AMX_MIN_TOKENS is set from.
Whole models (``--model``): ``int8`` is the int8 pass + pack, ``fused`` the same with fuse_ffn.
Timing: rounds interleave the candidates; each round takes the median of several calls; the table shows
the minimum over rounds of those medians (min-of-medians) in microseconds, and ratios against int8.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from stackcomp.kernels import ds_cpu
from stackcomp.kernels.ffn import AMX_MIN_TOKENS, AMX_MULTIPLE, ffn_forward_cpu, ffn_has_amx, ffn_kernel, ffn_operands
from stackcomp.nn.fused import FusedInt8FFN
from stackcomp.nn.quantized import Int8Linear

CASES = {"b32x50": (32, 50), "b1x20": (1, 20)}


#: ``--clock``: wall time, or the calling thread's CPU time (1 thread only: on a shared machine it leaves out
#: the time the thread waited for a core, which wall time counts)
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_interleaved(fns: dict, rounds: int, budget_s: float = 0.05, min_calls: int = 3,
                     clock=time.perf_counter) -> dict[str, float]:
    meds: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            f = fns[k]
            f()  # warm
            ts: list[float] = []
            t_end = time.perf_counter() + budget_s
            while len(ts) < min_calls or time.perf_counter() < t_end:
                t0 = clock()
                f()
                ts.append(clock() - t0)
            meds[k].append(statistics.median(ts))
    return {k: min(v) * 1e6 for k, v in meds.items()}


def ffn_candidates(d: int, hid: int, act: str, x: torch.Tensor, generic: bool) -> dict:
    lin1, lin2 = nn.Linear(d, hid), nn.Linear(hid, d)
    q1, q2 = Int8Linear.from_linear(lin1), Int8Linear.from_linear(lin2)
    fused = FusedInt8FFN.from_layers(lin1, act, lin2)
    approx = "tanh" if act == "gelu_tanh" else "none"
    fns = {"fp32": lambda: lin2(F.gelu(lin1(x), approximate=approx)),
           "int8": lambda: q2(F.gelu(q1(x), approximate=approx)),
           "fused": lambda: fused(x)}
    run = fused._kernel()
    if run.amx:
        fns["fused_vnni"] = lambda: ffn_forward_cpu(x, run.ops, act, run.ext, path="vnni")
    if generic:
        fns["fused_pt"] = lambda: ffn_forward_cpu(x, run.ops, act, run.ext, path="generic")
    return fns


def bench_crossover(args) -> None:
    """The kernel's AMX path against its VNNI path (same operands, 64-padded) by token count."""
    d, hid = (int(v) for v in args.dims.split("x"))
    ext = ds_cpu.get_extension()
    if not ffn_has_amx(ext):
        print("crossover: no AMX here (CPU, OS or build): nothing to compare")
        return
    lin1, lin2 = nn.Linear(d, hid), nn.Linear(hid, d)
    ops = ffn_operands(*(t for lay in (Int8Linear.from_linear(lin1), Int8Linear.from_linear(lin2))
                         for t in (lay.weight, lay.weight_scale, lay.bias)), multiple=AMX_MULTIPLE)
    print(f"AMX vs VNNI path of the fused FFN {d}->{hid}->{d} by tokens (AMX_MIN_TOKENS = {AMX_MIN_TOKENS}); "
          "min-of-medians, microseconds")
    for nt in args.threads:
        torch.set_num_threads(nt)
        for tokens in (8, 16, 24, 32, 48, 64, 96, 128, 256, 1600):
            x = torch.randn(tokens, d)
            fns = {p: (lambda p=p: ffn_forward_cpu(x, ops, args.act, ext, path=p)) for p in ("vnni", "best")}
            r = time_interleaved(fns, args.rounds, clock=CLOCKS[args.clock])
            print(f"  threads={nt} tokens={tokens:5d}  vnni {r['vnni']:8.1f}  amx {r['best']:8.1f}  "
                  f"vnni/amx {r['vnni'] / r['best']:.2f}")


def bench_ffn(args) -> None:
    d, hid = (int(v) for v in args.dims.split("x"))
    print(f"per FFN {d}->{hid}->{d}, act {args.act}; min-of-medians over {args.rounds} rounds, microseconds "
          f"({args.clock} clock)")
    for nt in args.threads:
        torch.set_num_threads(nt)
        for case, (b, t) in CASES.items():
            x = torch.randn(b, t, d)
            fns = ffn_candidates(d, hid, args.act, x, args.generic)
            with torch.inference_mode():
                r = time_interleaved(fns, args.rounds, clock=CLOCKS[args.clock])
            ratios = "  ".join(f"int8/{k} {r['int8'] / r[k]:.2f}" for k in r if k != "int8")
            print(f"  threads={nt} {case:7s} " + "  ".join(f"{k} {v:9.0f}" for k, v in r.items()) + f"   {ratios}")


def student(layers: int = 3) -> nn.Module:
    """A random classifier of MiniLM-L6's geometry (hidden 384, intermediate 1536, 12 heads), ``layers`` deep."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=12, num_hidden_layers=layers,
                     vocab_size=30522, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def packed_pair(model: nn.Module, tmp: str) -> dict[str, nn.Module]:
    """(int8 + pack, int8 + pack with fuse_ffn) from ``model`` (int8 pass first where it has no Int8Linear)."""
    from pathlib import Path

    from stackcomp.passes.base import PassContext, as_analysis
    from stackcomp.passes.int8 import Int8Pass
    from stackcomp.passes.pack import PackPass

    def run(p, m):
        ctx = PassContext(stage=p.name, work_dir=Path(tmp))
        ctx.analysis = as_analysis(p.analyze(m, ctx))
        return p.transform(m, ctx), ctx

    if not any(isinstance(m, Int8Linear) for m in model.modules()):
        model, _ = run(Int8Pass({"backend": "torch"}), model)
    out = {"int8": run(PackPass({"target": "cpu"}), copy.deepcopy(model))[0]}
    fused, ctx = run(PackPass({"target": "cpu", "fuse_ffn": True}), copy.deepcopy(model))
    print(f"  fuse_ffn: {ctx.analysis.report.get('ffn_fused')} FFN(s) fused; parity "
          f"{ctx.report.get('fuse_ffn_parity', {}).get('max_rel_diff', float('nan')):.3g} of max |logit|")
    out["fused"] = fused
    return out


def bench_models(args) -> None:
    import tempfile

    if args.model == "student":
        model = student()
        print("whole model: random 3-layer MiniLM-L6-shaped student (384/1536/12 heads), int8 pass + pack")
    else:
        import stackcomp

        model = stackcomp.load(args.model)
        print(f"whole model: {args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        models = packed_pair(model, tmp)
    vocab = int(getattr(model.config, "vocab_size", 30522))
    for nt in args.threads:
        torch.set_num_threads(nt)
        for case, (b, t) in CASES.items():
            ids = torch.randint(1000, vocab, (b, t), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            fns = {k: (lambda m=m, ids=ids, mask=mask: m(input_ids=ids, attention_mask=mask)) for k, m in models.items()}
            with torch.inference_mode():
                r = time_interleaved(fns, args.rounds, budget_s=0.2, clock=CLOCKS[args.clock])
                agree = float((models["fused"](input_ids=ids).logits.argmax(-1)
                               == models["int8"](input_ids=ids).logits.argmax(-1)).float().mean())
            print(f"  threads={nt} {case:7s} " + "  ".join(f"{k} {v:9.0f}" for k, v in r.items())
                  + f"   int8/fused {r['int8'] / r['fused']:.2f}  argmax agree {agree:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--dims", default="384x1536", help="hidden x intermediate")
    ap.add_argument("--act", default="gelu", choices=["gelu", "gelu_tanh"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--generic", action="store_true", help="also time the kernel's portable path")
    ap.add_argument("--model", nargs="?", const="student", default=None,
                    help="also time whole models: a saved model folder, or none for a random 3-layer student")
    ap.add_argument("--no-ffn", action="store_true", help="skip the per-FFN table")
    ap.add_argument("--crossover", action="store_true", help="also the AMX path vs the VNNI path by token count")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or the main thread's CPU time (shared machines; only with --threads 1)")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.clock == "thread" and args.threads != [1]:
        ap.error("--clock thread measures the calling thread only: use it with --threads 1")
    logging.getLogger("stackcomp").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    ext = ds_cpu.get_extension()
    if not ffn_kernel(ext):
        raise SystemExit(f"the C++ kernel has no fused FFN here ({ds_cpu.build_error() or 'stale build'}): "
                         "python setup.py build_ext --inplace")
    paths = ("AMX (long calls), " if ffn_has_amx(ext) else "") + ("AVX-512 VNNI" if ext.ffn_has_vnni() else "portable")
    print(f"kernel: {ds_cpu.variant()} build, fused FFN path {paths}")
    if not args.no_ffn:
        bench_ffn(args)
    if args.crossover:
        bench_crossover(args)
    if args.model is not None:
        bench_models(args)


if __name__ == "__main__":
    main()
