"""Train a tiny BERT on a learnable synthetic task; run alone or under ``accelerate launch``.

Used by tests/test_train.py::test_two_process_matches_single. The global batch is fixed
(``GLOBAL_BATCH``), so each of N processes gets ``GLOBAL_BATCH // N`` sequences per step. With
accelerate's default sharding (process i takes batches i, i+N, ... of the same shuffled order)
the N-process run sees the same examples in the same optimizer steps as the single-process run,
and dropout is off: the runs differ only by floating-point reduction order.

Usage: python tests/_accelerate_script.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from stackcomp.train import TrainConfig, make_accelerator, train

VOCAB, LENGTH, GLOBAL_BATCH = 64, 12, 16


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Label 1 iff the first token is in the upper half of the vocabulary (balanced; chance 50%)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    labels = (ids[:, 0] >= (VOCAB + 4) // 2).long()
    mask = torch.ones(LENGTH, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()), "n": float(labels.numel())}


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    state = make_accelerator()  # before any other accelerate state, so multi-CPU is picked up
    per_process = GLOBAL_BATCH // state.num_processes
    train_loader = DataLoader(make_data(256, 1), batch_size=per_process, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    eval_loader = DataLoader(make_data(200, 2), batch_size=32)  # 200: the last batch is partial
    config = TrainConfig(epochs=3, lr=3e-3, warmup_ratio=0.1, log_every=16, seed=0, eval_every=None)
    result = train(tiny_bert(), train_loader, config, eval_loader=eval_loader, compute_metrics=accuracy,
                   main_metric="accuracy")
    if state.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"processes": state.num_processes, "steps": result.steps,
                       "best_metrics": result.best_metrics,
                       "evals": [h for h in result.history if "accuracy" in h]}, f)


if __name__ == "__main__":
    main(sys.argv[1])
