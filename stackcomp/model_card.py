"""The README.md of an export folder: what the model is, what it measured, how to load it.

Written from what the exporter knows: the model (class, compressed layers, exact sizes), and when
the ``export`` pass writes it, the task, the metrics and latency it measured on the dev split, the
upstream stages and the export's params. Numbers are printed as measured, with how.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["render_card"]

_SIZE_ROWS = (("model_params", "parameters"), ("model_bytes", "bytes (as stored)"),
              ("model_dense_bytes", "bytes of the dense fp32 model"), ("model_ratio_bytes", "compression (bytes)"),
              ("linear_bytes", "linear-layer bytes"), ("linear_ratio_bytes", "compression of the linear layers"))
_LATENCY_KEYS = ("latency_ms_per_batch", "latency_ms_per_sequence", "latency_batch_size", "latency_batches",
                 "latency_threads")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_card(model: nn.Module, folder_name: str, *, dense: bool, sizes: Mapping[str, Any],
                metrics: Mapping[str, Any] | None = None, task: Any = None, stage: str | None = None,
                upstream: Sequence[str] = (), params: Mapping[str, Any] | None = None, recipe: str | None = None,
                lock: Mapping[str, Any] | None = None) -> str:
    """The model card. ``sizes``: :func:`stackcomp.evaluate.size_report`; ``metrics``: what the
    evaluate pass measures (task metrics, latency); ``upstream``: the stages before, first first;
    ``recipe`` (resolved YAML) and ``lock`` (lock.json's content): how to make the model again."""
    import torch
    import transformers

    from stackcomp.hf_integration import GUARD_WEIGHTS, manifest_layers
    from stackcomp.version import __version__

    cls = type(model).__name__
    kinds = Counter(entry["type"] for entry in manifest_layers(model).values())
    task_name = getattr(task, "name", None)
    lines = ["---", "library_name: transformers", "tags:", "- stackcomp"]
    if task_name:
        lines += [f"- {task_name.replace('/', '-')}"]
    lines += ["---", "", f"# {folder_name}", ""]
    what = "dense weights" if dense else (
        "compressed layers: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) if kinds else "no compressed layer")
    lines += [f"A `{cls}` exported by stackcomp {__version__} ({what}).", ""]
    if task_name:
        lines += [f"- task: `{task_name}`" + (f" (main metric: `{task.main_metric}`)" if getattr(task, "main_metric", None) else "")]
    if stage:
        lines += [f"- export stage: `{stage}`" + (f", after {' -> '.join(f'`{s}`' for s in upstream)}" if upstream else "")]
    if params:
        lines += [f"- export params: `{dict(params)}`"]
    lines += [(f"- made with stackcomp {__version__}, torch {torch.__version__}, "
               f"transformers {transformers.__version__}, Python {platform.python_version()}"), ""]

    task_metrics = {k: v for k, v in (metrics or {}).items()
                    if k not in _LATENCY_KEYS and k not in sizes and k != "main_metric" and isinstance(v, (int, float))}
    if task_metrics:
        lines += ["## Metrics", "", "Measured by the export on the task's dev split (`stackcomp.train.evaluate`).", "",
                  "| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in sorted(task_metrics.items())), ""]
    if metrics and "latency_ms_per_batch" in metrics:
        lines += ["## Latency", "",
                  (f"{_fmt(metrics['latency_ms_per_batch'])} ms per batch of {_fmt(metrics['latency_batch_size'])} "
                   f"sequences ({_fmt(metrics['latency_ms_per_sequence'])} ms per sequence): median over "
                   f"{metrics['latency_batches']} dev batches, {metrics['latency_threads']} torch threads, "
                   f"{platform.processor() or platform.machine()} (`stackcomp.evaluate.measure_latency`)."), ""]
    lines += ["## Size", "", "Exact, every tensor at its stored width (`stackcomp.evaluate.size_report`).", "",
              "| | |", "|---|---|",
              *(f"| {label} | {_fmt(sizes[k])} |" for k, label in _SIZE_ROWS if sizes.get(k) is not None), ""]

    load_lines = [f"from transformers import AutoTokenizer, {cls}", "",
                  f'model = {cls}.from_pretrained("{folder_name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{folder_name}")', "```", ""]
    lines += ["## How to load", ""]
    if dense or not kinds:
        lines += ["Ordinary dense weights: plain transformers loads them, stackcomp is not needed.", "", "```python",
                  *load_lines]
    else:
        lines += [("The compressed layers are stackcomp's: `import stackcomp` registers its quantizer with "
                   "transformers (`quantization_config.quant_method: stackcomp` in `config.json`), which rebuilds "
                   "them before the weights load (`AutoModelFor*` classes too)."), "", "```python",
                  "import stackcomp  # registers the stackcomp quantizer", *load_lines,
                  ("Without `import stackcomp`, transformers refuses the folder: it looks for the weights file "
                   f"`{GUARD_WEIGHTS}` (named in `config.json`), which does not exist, rather than load "
                   "int8 or factorized weights into dense layers."), ""]
    lines += ["With stackcomp, which first checks every file against `CHECKSUMS.json`:", "", "```python",
              "import stackcomp", "", f'model = stackcomp.load("{folder_name}")', "```", ""]
    if recipe:
        lines += ["## Recipe", "", "The recipe that made this model, as it ran (`stackcomp run` on it repeats the "
                  "work; its cache keys are in the lock below).", "", "```yaml", recipe.rstrip(), "```", ""]
    if lock:
        lines += ["## Lock", "", ("Versions, seeds, the hashes of the data and model files, and every stage's key "
                                  "(`lock.json` of the run)."), "", "```json",
                  json.dumps(dict(lock), indent=1, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)
