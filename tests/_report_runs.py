"""Two tiny finished runs for the compare/report/diff tests, built once per test session.

run1 ("tiny-branches"): ft (finetune) -> eval, and two ds_factorize branches after ft (one
without training, one with 2 STF steps), each evaluated; it has a goal. run2 ("tiny-other"):
another seed, ft without an evaluate stage, one ds_factorize branch. Tiny BERT, 96 train and
32 dev sentences of SST-2, so each run takes seconds.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

_CACHE: dict[str, dict[str, Path]] = {}

RECIPE1 = """
    name: tiny-branches
    model: {model}
    task: glue/sst2
    data: {{max_length: 32, max_eval_samples: 32, data_dir: {data}}}
    goal: {{metric_drop: 50, max_bytes: 100MB}}
    stages:
      ft: {{pass: finetune, params: {{max_steps: 2, batch_size: 16, lr: 1.0e-3}}}}
      eval: {{pass: evaluate, after: ft, params: {{latency_repeats: 1}}}}
      ds_a: {{pass: ds_factorize, after: ft, params: {{block: 16, atoms: 8, nnz: 2, iters: 1, train: {{epochs: 0}}}}}}
      ds_b: {{pass: ds_factorize, after: ft, params: {{block: 16, atoms: 8, nnz: 4, iters: 1,
                                                   train: {{max_steps: 2, batch_size: 16}}}}}}
    """

RECIPE2 = """
    name: tiny-other
    model: {model}
    task: glue/sst2
    data: {{max_length: 32, max_eval_samples: 32, data_dir: {data}}}
    seed: 7
    stages:
      ft: {{pass: finetune, params: {{max_steps: 3, batch_size: 16, lr: 1.0e-3}}}}
      ds_c: {{pass: ds_factorize, after: ft, params: {{block: 16, atoms: 8, nnz: 1, iters: 1, train: {{epochs: 0}}}}}}
    """


def build_runs(tmp_path_factory, model_dir: Path, data_dir: Path) -> dict[str, Path]:
    """{"root", "recipe1", "recipe2", "run1", "run2"}; the runs sit at root/<recipe name>."""
    if "runs" in _CACHE:
        return _CACHE["runs"]
    from stackcomp.engine import Engine
    from stackcomp.plan import build_plan
    from stackcomp.recipe import load_recipe

    root = tmp_path_factory.mktemp("report-runs")
    out = {"root": root}
    for i, (text, name) in enumerate(((RECIPE1, "tiny-branches"), (RECIPE2, "tiny-other")), start=1):
        path = root / f"recipe{i}.yaml"
        path.write_text(textwrap.dedent(text.format(model=model_dir, data=data_dir)))
        Engine(build_plan(load_recipe(path)), root / name).run()
        out[f"recipe{i}"] = path
        out[f"run{i}"] = root / name
    _CACHE["runs"] = out
    return out
