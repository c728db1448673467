"""Latency of saved stage models from finished runs, side by side in one process.

    STACKCOMP_DATA_DIR=../shared/data python bench/stage_latency.py runs/minilm-sst2-stack3 ft kd3 kd3_int8 kd3_pack
    ... runs/minilm-sst2-stack3 ft kd3_int8 --onnx ft,kd3     # + the fp32 models in ONNX Runtime, fp32 and int8
    ... runs/search-sst2/runs/0 ft runs/search-sst2/runs/7::pack   # RUN::STAGE: a stage of another run
                                                                  # (a search's trials), shown as 7:pack
    ... runs/minilm-sst2-fast ft prune25_vocab_ort@onnx_int8       # STAGE@onnx / STAGE@onnx_int8: the graph a
                                                                  # `pack target: onnx` stage wrote, in ONNX Runtime
    ... runs/minilm-sst2-fast ft prune25_fused prune25_fused%fbgemm  # STAGE%fbgemm: the torch int8 linears on
                                                                  # fbgemm only (no oneDNN for large calls)
    ... runs/minilm-sst2-fast ft prune25_fused prune25_fused%vnni    # STAGE%vnni: fused FFNs without their AMX
                                                                  # path; both: STAGE%fbgemm%vnni
    ... runs/minilm-sst2-fast ft prune25_vocab_kernel_unpad%torchtables  # STAGE%torchtables: 4-bit tables
                                                                  # looked up with torch ops (no compiled lookup)
    ... runs/minilm-sst2-fast ft prune25_vocab_kernel_half_native%blocks  # STAGE%blocks: native blocks one by
                                                                  # one, the base model's forward transformers' own

Each evaluate stage times its own model when it runs, so models evaluated at different times
(another session, another load on the machine) are not comparable. This loads the named stages'
artifacts (from the run's artifact folder or the shared cache it used) and times them
interleaved over the same dev batches of the run's task (``--task``, any kind: the batches
``evaluate`` times, e.g. single STS-B sentences for ``embeddings/stsb``), with the timing of
``bench/model_latency.py`` (min over rounds of the per-round median ms per batch). Ratios are
against the first stage. ``agree`` (argmax agreement with the first stage) is shown for models
with logits.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import warnings

import torch
from transformers import AutoTokenizer

from stackcomp.artifacts import load_model
from stackcomp.data import DataOptions
from stackcomp.evaluate import size_report
from stackcomp.nn.native_blocks import remove_native_model
from stackcomp.nn.quantized import Int4Embedding
from stackcomp.report import Run
from stackcomp.tasks import get_task

from int8_engines import WithWork  # bench/, beside this script
from model_latency import agreement, time_models


class OrtModel:
    """An ONNX Runtime session called like the torch model (``model(**batch).logits``). Its threads
    do not spin between runs: spinning ONNX Runtime workers would take the cores from the torch
    models timed right after them (measured: the fp32 teacher 1.5x slower at batch 32, 2 threads)."""

    def __init__(self, path, threads: int):
        from stackcomp.onnx_export import ort_session

        self.session = ort_session(path, threads=threads, spinning=False)
        self.nbytes = os.path.getsize(path)

    def __call__(self, **inputs):
        from types import SimpleNamespace

        from stackcomp.onnx_export import run_session

        return SimpleNamespace(logits=run_session(self.session, inputs))


def ort_models(name: str, model, example: dict, threads: int) -> dict:
    """``name@ort`` and ``name@ort-int8``: the stage model exported to ONNX, fp32 and dynamic int8."""
    import tempfile

    from stackcomp.onnx_export import export_onnx, quantize_onnx_int8

    folder = tempfile.mkdtemp(prefix=f"stage_latency_{name}_")
    path = export_onnx(model, os.path.join(folder, "model.onnx"), example)
    qpath, _ = quantize_onnx_int8(path, os.path.join(folder, "model.int8.onnx"))
    return {f"{name}@ort": OrtModel(path, threads), f"{name}@ort-int8": OrtModel(qpath, threads)}


def stage_model_folder(run: Run, spec: str) -> tuple[str, os.PathLike]:
    """``STAGE`` of ``run``, or ``RUN::STAGE`` of another run (labelled ``<run folder>:STAGE``)."""
    if "::" in spec:
        other, stage = spec.rsplit("::", 1)
        return f"{os.path.basename(os.path.normpath(other))}:{stage}", Run(other).artifact(stage) / "model"
    return spec, run.artifact(spec) / "model"


#: ``STAGE%fbgemm``: the stage's model with the torch int8 backend's oneDNN switch off
#: (``stackcomp.nn.quantized.ONEDNN_MIN_WORK``), to show what that switch gives side by side
FBGEMM = "%fbgemm"
#: ``STAGE%vnni``: the stage's model with its fused FFNs held to the kernel's VNNI path (no AMX)
VNNI = "%vnni"
#: ``STAGE%torchtables``: the stage's model with its 4-bit tables looked up by torch ops
TORCH_TABLES = "%torchtables"
#: ``STAGE%blocks``: a native-blocks stage with its base model's forward back to transformers' own: each
#: block still one C++ call, but not the embeddings and blocks as one (the two levers side by side)
BLOCKS_ONLY = "%blocks"
SWITCHES = (FBGEMM, VNNI, TORCH_TABLES, BLOCKS_ONLY)



def without_ffn_amx(model):
    """``model`` with every FusedInt8FFN's AMX path off (its kernel handle made now, amx cleared)."""
    from stackcomp.nn.fused import FusedInt8FFN

    for m in model.modules():
        run = m._kernel() if isinstance(m, FusedInt8FFN) else None
        if run is not None:
            run.amx = False
    return model

#: ``STAGE@<suffix>``: the ONNX graph file a ``pack target: onnx`` stage wrote in its artifact
ONNX_GRAPHS = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx"}


def stage_graph(run: Run, spec: str, threads: int) -> tuple[str, OrtModel] | None:
    """``STAGE@onnx`` / ``STAGE@onnx_int8`` (``RUN::STAGE@...`` too): that stage's graph as an
    ONNX Runtime session; None for any other spec."""
    base, _, graph = spec.rpartition("@")
    if graph not in ONNX_GRAPHS or not base:
        return None
    name, folder = stage_model_folder(run, base)
    path = folder.parent / "onnx" / ONNX_GRAPHS[graph]
    if not path.is_file():
        raise SystemExit(f"{spec}: {path} does not exist (was {base} a `pack target: onnx` stage"
                         f"{', with onnx_int8: true' if graph == 'onnx_int8' else ''}?)")
    return f"{name}@{graph}", OrtModel(path, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (runs/<recipe name>)")
    ap.add_argument("stages", nargs="+", help="stages whose saved models to time (RUN::STAGE for another run's); "
                    "the first is the reference")
    ap.add_argument("--task", default=None, help="default: the run's task")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=None,
                    help="default: the run's recipe data.max_length, else 64 (QA needs its windows' length)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole timing (each run: --rounds rounds) and "
                    "report each model's speedup over the runs: median and lowest (a target such as 'median of "
                    "five runs, none below 8x')")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--onnx", default="", help="comma list of stages to also time in ONNX Runtime: each is "
                    "exported (stackcomp.onnx_export) and run as '<stage>@ort' (fp32) and '<stage>@ort-int8' "
                    "(ONNX Runtime's dynamic int8)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    run = Run(args.run)
    if args.max_length is None:
        args.max_length = int((run.recipe.get("data") or {}).get("max_length") or 64)
    models, folders = {}, {}
    for spec in args.stages:
        graph = stage_graph(run, spec, torch.get_num_threads())
        if graph is not None:
            models[graph[0]] = graph[1]
            continue
        base, switches = spec, []
        while base.endswith(SWITCHES):
            switch = next(w for w in SWITCHES if base.endswith(w))
            base, switches = base.removesuffix(switch), [switch, *switches]
        name, folder = stage_model_folder(run, base)
        folders[name] = folder
        model = load_model(folder, device="cpu").eval()
        if VNNI in switches:
            model = without_ffn_amx(model)
        if BLOCKS_ONLY in switches:
            model = remove_native_model(model)
        if TORCH_TABLES in switches:
            for m in model.modules():
                if isinstance(m, Int4Embedding):
                    m.kernel = False
        models[name + "".join(switches)] = WithWork(model, 1 << 62) if FBGEMM in switches else model
    if not folders:
        raise SystemExit("the stages must include at least one torch model (the first sets the tokenizer)")
    args.stages = list(models)
    tok = AutoTokenizer.from_pretrained(folders[next(iter(folders))])
    task = get_task(args.task or run.task or "glue/sst2")
    data = task.build_data(tok, DataOptions(max_length=args.max_length))
    batches = data.latency_batches(args.batch_size, args.batches)

    for name in [n for n in args.onnx.split(",") if n]:
        model = models[name] if name in models else load_model(stage_model_folder(run, name)[1], device="cpu").eval()
        models.update(ort_models(name, model, batches[0], torch.get_num_threads()))

    ref = args.stages[0]
    with torch.inference_mode():
        runs = [time_models(models, batches, args.rounds) for _ in range(max(1, args.runs))]
        ms = {n: statistics.median(r[n] for r in runs) for n in models}
        speedups = {n: [r[ref] / r[n] for r in runs] for n in models}
        try:
            agree = agreement(models, batches, ref_name=ref)
        except AttributeError:  # no logits (a bi-encoder's hidden states): nothing to agree on
            agree = {n: float("nan") for n in models}
    sizes = {n: m.nbytes if isinstance(m, OrtModel) else size_report(getattr(m, "model", m))["model_bytes"]
             for n, m in models.items()}
    print(f"\n{args.run}: {len(batches)} {task.name} dev batches x {args.batch_size}, max_length {args.max_length}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    many = len(runs) > 1
    if many:
        print(f"{len(runs)} runs: ms/batch and speedup are medians over the runs; 'lowest' is the lowest speedup")
    print(f"{'stage':<16} {'ms/batch':>9} {'vs ' + ref:>12}" + (f" {'lowest':>8}" if many else "")
          + f" {'MB':>8} {'x smaller':>10} {'agree':>6}")
    for n in models:
        print(f"{n:<16} {ms[n]:>9.2f} {statistics.median(speedups[n]):>11.2f}x"
              + (f" {min(speedups[n]):>7.2f}x" if many else "")
              + f" {sizes[n] / 1e6:>8.2f} {sizes[ref] / sizes[n]:>9.2f}x {agree[n]:>6.3f}")
    if args.json:
        print(json.dumps({"args": vars(args), "ms_per_batch": ms, "ms_per_batch_runs": runs, "speedup_runs": speedups,
                          "model_bytes": sizes, "argmax_agreement": agree, "threads": torch.get_num_threads(),
                          "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
