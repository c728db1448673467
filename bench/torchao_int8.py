"""Our int8 linears and embeddings against torchao's int8 API, side by side in one run.

    python bench/torchao_int8.py                          # all shapes, tokens 128 and 1
    python bench/torchao_int8.py --threads 1 --rounds 5 --shapes 384x1536 --tokens 128

Decides whether the ``int8`` conversions of plain ``nn.Linear`` / ``nn.Embedding`` should be
torchao's (``torchao.quantization.quantize_``) instead of ours (:mod:`stackcomp.nn.quantized`).
For each linear shape (out x in) and token count it times:

  dense     nn.Linear fp32
  ours      Int8Linear, backend torch (fbgemm dynamic int8; what the int8 pass makes)
  ours_bnb  Int8Linear, backend bitsandbytes (row-wise int8 activations, int32 accumulate)
  ours_mm   Int8Linear, backend intmm (the same row-wise arithmetic on torch._int_mm, oneDNN)
  ao_dyn    torchao Int8DynamicActivationInt8WeightConfig (int8 activations per row + weights)
  ao_wo     torchao Int8WeightOnlyConfig (int8 weights per row, fp32 activations)

and for the embedding tables (MiniLM's word table 30522 x 384, BERT's 30522 x 768) a lookup of
``--tokens`` ids per sequence x ``--batch`` sequences by nn.Embedding, our Int8Embedding, and
torchao's weight-only int8 on the nn.Embedding (where ``quantize_`` accepts one).

Timing: rounds interleave all candidates; each round takes the median of ``--calls`` calls; the
table gives the minimum over rounds of those medians (ms) and the ratio to ``ours`` (> 1: slower
than ours). ``err`` is each int8 form's relative Frobenius error against the fp32 output, so a
faster path is not a less exact one in disguise. torchao is run eagerly (no torch.compile),
as the int8 pass would run it.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time
import warnings

import torch
from torch import nn

from stackcomp.nn.quantized import Int8Embedding, Int8Linear

SHAPES = ["384x384", "1536x384", "384x1536", "768x768", "3072x768", "768x3072"]
TABLES = ["30522x384", "30522x768"]


def _torchao():
    """``(quantize_, {name: config factory})``, or None with the reason torchao cannot be used."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - not installed or broken: the table says so
        return None, f"{type(e).__name__}: {e}"
    return (quantize_, {"ao_dyn": Int8DynamicActivationInt8WeightConfig, "ao_wo": Int8WeightOnlyConfig}), ""


def _ao_model(module: nn.Module, config, quantize_, embedding: bool = False) -> nn.Module:
    m = nn.Sequential(copy.deepcopy(module))
    kw = {"filter_fn": lambda mod, fqn: isinstance(mod, nn.Embedding)} if embedding else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, config(), **kw)
    return m


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


@torch.inference_mode()
def time_all(fns: dict, x: torch.Tensor, rounds: int, calls: int) -> dict[str, float]:
    """Min over rounds of each candidate's median ms per call; candidates take turns every round."""
    for f in fns.values():  # warm up (library handles, packed weights)
        f(x)
        f(x)
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            ts = []
            for _ in range(calls):
                t = time.perf_counter()
                f(x)
                ts.append(time.perf_counter() - t)
            best[k] = min(best[k], statistics.median(ts) * 1e3)
    return best


def _row(label: str, ms: dict[str, float], errs: dict[str, float], cols: list[str]) -> str:
    base = ms.get("ours")
    cells = []
    for c in cols:
        if c not in ms:
            cells.append(f"{'-':>22}")
            continue
        ratio = f"{ms[c] / base:5.2f}x" if base else "   -  "
        err = f"{errs[c]:.1e}" if c in errs else "   -   "
        cells.append(f"{ms[c]:8.3f} {ratio} {err}")
    return f"{label:<24} " + " ".join(cells)


def bench_linears(shapes, tokens, rounds, calls, ao) -> list[str]:
    cols = ["dense", "ours", "ours_bnb", "ours_mm", "ao_dyn", "ao_wo"]
    lines = [f"{'linear (out x in) T':<24} " + " ".join(f"{c + ' ms / vs ours / err':>22}" for c in cols)]
    for shape in shapes:
        out, inn = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        lin = nn.Linear(inn, out).eval()
        fns = {"dense": lin, "ours": Int8Linear.from_linear(lin, "torch"),
               "ours_bnb": Int8Linear.from_linear(lin, "bitsandbytes"),
               "ours_mm": Int8Linear.from_linear(lin, "intmm")}
        if ao[0] is not None:
            quantize_, configs = ao[0]
            for name, cfg in configs.items():
                try:
                    fns[name] = _ao_model(lin, cfg, quantize_)
                except Exception as e:  # noqa: BLE001 - a config this torchao cannot apply: shown as '-'
                    print(f"# {name} on {shape}: {type(e).__name__}: {e}")
        for t in tokens:
            x = torch.randn(t, inn)
            with torch.inference_mode():
                ref = lin(x)
                errs = {k: _rel(f(x), ref) for k, f in fns.items() if k != "dense"}
            lines.append(_row(f"{shape} T={t}", time_all(fns, x, rounds, calls), errs, cols))
    return lines


def bench_embeddings(tables, tokens, batch, rounds, calls, ao) -> list[str]:
    cols = ["dense", "ours", "ao_wo"]
    lines = [f"{'embedding (rows x d) ids':<24} " + " ".join(f"{c + ' ms / vs ours / err':>22}" for c in cols)]
    for shape in tables:
        rows, dim = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        emb = nn.Embedding(rows, dim, padding_idx=0).eval()
        fns = {"dense": emb, "ours": Int8Embedding.from_embedding(emb)}
        if ao[0] is not None:
            quantize_, configs = ao[0]
            try:
                fns["ao_wo"] = _ao_model(emb, configs["ao_wo"], quantize_, embedding=True)
            except Exception as e:  # noqa: BLE001
                print(f"# ao_wo on an nn.Embedding {shape}: {type(e).__name__}: {e}")
        for t in tokens:
            ids = torch.randint(0, rows, (batch, t))
            with torch.inference_mode():
                ref = emb(ids)
                errs = {k: _rel(f(ids), ref) for k, f in fns.items() if k != "dense"}
            lines.append(_row(f"{shape} {batch}x{t}", time_all(fns, ids, rounds, calls), errs, cols))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the minimum is reported")
    ap.add_argument("--calls", type=int, default=20, help="calls per candidate per round (their median counts)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="linear weights out x in, comma-separated")
    ap.add_argument("--tokens", default="128,1", help="tokens per call, comma-separated")
    ap.add_argument("--tables", default=",".join(TABLES), help="embedding tables rows x dim ('' for none)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per embedding lookup")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    ao = _torchao()
    import platform

    version = "not importable: " + ao[1] if ao[0] is None else __import__("torchao").__version__
    print(f"# torch {torch.__version__}, torchao {version}, threads {torch.get_num_threads()}, "
          f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores), rounds {args.rounds}, "
          f"calls {args.calls}; ms = min over rounds of the median call")
    tokens = [int(t) for t in args.tokens.split(",") if t]
    for line in bench_linears([s for s in args.shapes.split(",") if s], tokens, args.rounds, args.calls, ao):
        print(line)
    if args.tables:
        for line in bench_embeddings([s for s in args.tables.split(",") if s], tokens, args.batch, args.rounds,
                                     args.calls, ao):
            print(line)


if __name__ == "__main__":
    main()
