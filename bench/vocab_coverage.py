"""How much of the word table a task uses: the ``vocab_prune`` pass's count on a real task, no training.

    STACKCOMP_DATA_DIR=../shared/data HF_HUB_OFFLINE=1 python bench/vocab_coverage.py
    python bench/vocab_coverage.py --task glue/sst2 --model minilm-l6 --min-count 1 --json

Runs the pass's ``analyze`` and ``transform`` on the base model (offline ``minilm-l6`` alias:
its 30,522-word WordPiece vocabulary): rows the train split uses (plus the special tokens), the
share of dev tokens and of dev examples that hit a dropped id (mapped to unk), and the word
table's bytes before and after (the remap included), as fp32 and as the ``int8`` pass stores it
with ``embeddings: int8`` / ``int4`` (group 64). The int8/int4 sizes are measured on the
converted layers, not only computed, and the whole-model bytes come from ``size_report``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="glue/sst2")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--min-count", type=int, default=1)
    ap.add_argument("--keep-top-k", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()

    import torch

    from stackcomp.data import DataOptions, TaskData, get_task
    from stackcomp.evaluate import size_report
    from stackcomp.models import load_base_model
    from stackcomp.nn.conversions import Int8Config, convert, layer_storage
    from stackcomp.passes.base import PassContext, run_pass
    from stackcomp.passes.vocab_prune import REPORT_INT4_GROUP, VocabPrunePass

    logging.basicConfig(level=logging.WARNING)
    task = get_task(args.task)
    model, tok = load_base_model(args.model, task)
    data = TaskData(task, tok, DataOptions(max_length=args.max_length))
    before = size_report(model)
    ctx = PassContext(stage="vocab_prune", work_dir=".", task=task, tokenizer=tok, data=data)
    t0 = time.perf_counter()
    pruned = run_pass(VocabPrunePass({"min_count": args.min_count, "keep_top_k": args.keep_top_k}), model, ctx)
    seconds = time.perf_counter() - t0
    report = dict(ctx.analysis.report)
    table = pruned.get_input_embeddings()
    measured = {"fp32": layer_storage(table).bytes}
    for fmt in ("int8", "int4"):
        q = convert("int8", table, Int8Config(embedding_format=fmt, embedding_group_size=REPORT_INT4_GROUP))
        measured[fmt] = layer_storage(q).bytes
    for fmt, b in report["bytes"].items():
        assert b["after"] == measured[fmt], (fmt, b["after"], measured[fmt])  # the formula is what is stored
    report.update(model_bytes_before=before["model_bytes"], model_bytes_after=size_report(pruned)["model_bytes"],
                  seconds=round(seconds, 1), remap_dtype=str(table.remap.dtype).removeprefix("torch."),
                  torch=torch.__version__)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.task} / {args.model}: {report['vocab_kept']} of {report['vocab_size']} rows kept "
          f"({report['vocab_kept_share']:.1%}; {report['train_distinct_ids']} ids seen in "
          f"{report['train_tokens']:,} train tokens, {report['special_ids']} special)")
    print(f"dev: {report['dev_unseen_tokens']} of {report['dev_tokens']:,} tokens unseen "
          f"({report['vocab_unseen_token_share']:.2%}, {report['dev_unseen_distinct_ids']} distinct ids) -> "
          f"{report['unseen_maps_to']}; {report['dev_examples_with_unseen']} of {report['dev_examples']} "
          f"examples hold one ({report['dev_examples_with_unseen_share']:.1%})")
    print(f"{'word table':<12}{'before':>14}{'after':>14}{'ratio':>8}   (after: kept rows + "
          f"{report['remap_dtype']} remap of {report['vocab_size']} ids)")
    for fmt, b in report["bytes"].items():
        label = f"{fmt} (g{REPORT_INT4_GROUP})" if fmt == "int4" else fmt
        print(f"{label:<12}{b['before']:>14,.0f}{b['after']:>14,.0f}{b['ratio']:>7.2f}x")
    print(f"whole model (fp32): {report['model_bytes_before']:,} -> {report['model_bytes_after']:,} bytes; "
          f"pass took {report['seconds']} s")


if __name__ == "__main__":
    main()
