"""``evaluate``: the task metric on dev, CPU latency, and exact sizes. Changes nothing.

After ``pack target: onnx`` it also runs the graphs that stage wrote in ONNX Runtime: their latency
on the same batches (``ort_latency_*``; ``ort_int8_*`` for ONNX Runtime's int8 model) and their own
dev metrics (``ort_accuracy``, ``ort_int8_accuracy``, ...; ``onnx_metrics: false`` skips these), so a
graph that ships is scored as it runs, not only through its torch twin."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from stackcomp.evaluate import measure_latency, size_report, unpacked_ds_layers
from stackcomp.onnx_export import onnx_metrics
from stackcomp.passes.base import KEY_OMIT_DEFAULT, Pass, PassContext, PassParams


class EvaluateParams(PassParams):
    batch_size: int = Field(default=128, ge=1, description="batch size for the dev-set metric")
    latency: bool = Field(default=True, description="measure CPU latency")
    latency_batch_size: int = Field(default=32, ge=1, description="sequences per latency batch")
    latency_batches: int = Field(default=8, ge=1, description="dev batches timed (the first ones, fixed order)")
    latency_repeats: int = Field(default=3, ge=1)
    threads: int | None = Field(default=None, ge=1, description="torch threads while timing (default: as set)")
    onnx_metrics: bool = Field(default=True, description="after pack target: onnx, also score the dev metric of "
                               "the ONNX graphs in ONNX Runtime (their latency is measured either way)",
                               json_schema_extra=KEY_OMIT_DEFAULT)


class EvaluatePass(Pass):
    """Measure the model: task metric on the dev split, latency per batch, parameters and bytes."""

    name = "evaluate"
    version = "1"
    Params = EvaluateParams
    changes_model = False

    def analyze(self, model: nn.Module, ctx: PassContext) -> dict:
        import torch

        p = self.params
        ctx.metrics.update(size_report(model))
        if ctx.data is not None:
            from stackcomp.train import evaluate

            ctx.metrics["main_metric"] = ctx.task.main_metric
            if getattr(ctx.data, "split_note", None):  # e.g. SQuAD offline: an article split of dev
                ctx.metrics["data_note"] = ctx.data.split_note
            ctx.metrics.update(evaluate(model, ctx.data.eval_loader(p.batch_size), ctx.data.compute_metrics,
                                        predict=ctx.data.predict))
            batches = None
            if p.latency:
                unpacked = unpacked_ds_layers(model)
                if unpacked:
                    ctx.log.warning("latency: %d DS layer(s) are not packed (e.g. %s) and run the per-block "
                                    "reference product, slower than nn.Linear; add a `pack` stage for the CPU "
                                    "kernels", len(unpacked), unpacked[0])
                batches = [{k: v.to("cpu") for k, v in b.items()}
                           for b in ctx.data.latency_batches(p.latency_batch_size, p.latency_batches)]
                threads = torch.get_num_threads()
                if p.threads:
                    torch.set_num_threads(p.threads)
                try:
                    ctx.metrics.update(measure_latency(model.to("cpu"), batches, repeats=p.latency_repeats))
                finally:
                    torch.set_num_threads(threads)
                    model.to(ctx.device)
            # the ONNX graphs an upstream `pack target: onnx` wrote: timed on the same batches, and scored
            ctx.metrics.update(onnx_metrics(ctx, batches=batches, threads=p.threads or torch.get_num_threads(),
                                            repeats=p.latency_repeats,
                                            eval_loader=ctx.data.eval_loader(p.batch_size) if p.onnx_metrics else None))
        return {}
