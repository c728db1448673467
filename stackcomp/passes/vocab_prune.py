"""``vocab_prune``: keep only the word-embedding rows a task's training data uses (opt-in).

A classifier fine-tuned on one task looks up a fraction of its tokenizer's vocabulary (SST-2
with the 30,522-word MiniLM vocabulary: see docs/results.md). This pass counts the token ids of
the task's training split (every ``input_ids`` and ``input_ids_*`` key of the training batches,
padding left out by the matching attention mask), keeps

* the ids seen at least ``min_count`` times,
* the tokenizer's special tokens (padding, unk, CLS/SEP, mask...),
* optionally the first ``keep_top_k`` ids of the vocabulary (tokenizers that number tokens by
  frequency, as BPE merges do, put their common tokens first),

and replaces the input embedding table (``model.get_input_embeddings()``) by a
:class:`~stackcomp.nn.remapped.RemappedEmbedding` of the kept rows. The model still takes the
ORIGINAL tokenizer ids: an id remap inside the layer sends each kept id to its row and every
other id to the unk token's row (``unseen: unk``, the default: what the tokenizer itself
produces for a word it cannot spell, so the model has seen that row in training) or to one added
row, the mean of the dropped rows (``unseen: mean``, for tokenizers without an unk token). A
kept id gives exactly the row it gave before.

The report (and the stage's metrics) give ``vocab_kept`` rows of ``vocab_size``, the share of the
dev set's tokens that the remap sends to the unseen row (``vocab_unseen_token_share``, measured
on the eval loader), the share of dev examples holding any such token (only their predictions
can change: a bound on the accuracy cost) and the table's bytes before and after (remap included) as fp32, and as the
``int8`` pass would store it with ``embeddings: int8`` or ``int4`` (group 64), which stacks on
top: the pruned table is an ``nn.Embedding`` to it and becomes ``RemappedInt8Embedding`` /
``RemappedInt4Embedding``.

A word table whose weight is tied to another parameter (an LM head) is refused: pruning its
rows would change the head's output vocabulary.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from stackcomp.errors import PassError, PlanError
from stackcomp.factorize.budget import embedding_table_bytes, remap_bytes
from stackcomp.nn.base import CompressedLayer
from stackcomp.nn.remapped import RemappedEmbedding
from stackcomp.passes.base import Analysis, Pass, PassContext, PassParams, as_analysis
from stackcomp.targets import set_module

#: the int4 group size the report prices the table at (the int8 pass's default)
REPORT_INT4_GROUP = 64
#: batch size of the counting loops (no model runs: only the ids are read)
_COUNT_BATCH = 512


class VocabPruneParams(PassParams):
    min_count: int = Field(default=1, ge=1, description="keep an id seen at least this many times in the train split")
    keep_top_k: int = Field(default=0, ge=0, description="also keep the first k ids of the vocabulary (frequency-"
                                                         "ordered tokenizers put common tokens first)")
    unseen: Literal["unk", "mean"] = Field(
        default="unk", description="where ids not kept go: the unk token's row, or one added row, the mean of "
                                   "the dropped rows")


class VocabPrunePass(Pass):
    """Prune the word-embedding table to the token ids the task's train split uses; other ids map to unk."""

    name = "vocab_prune"
    version = "1"
    Params = VocabPruneParams
    needs = frozenset({"task"})
    forbid_after = {"int8": "prune the vocabulary before int8 quantizes the table (int8 then quantizes the kept rows)",
                    "vocab_prune": "the vocabulary is already pruned"}

    def analyze(self, model: nn.Module, ctx: PassContext) -> Analysis:
        p = self.params
        name, emb = input_table(model)
        if ctx.data is None:
            raise PlanError("vocab_prune needs a task's data to count token ids; set `task:` in the recipe")
        tokenizer = ctx.tokenizer if ctx.tokenizer is not None else getattr(ctx.data, "tokenizer", None)
        vocab, dim = emb.num_embeddings, emb.embedding_dim
        train = count_ids(ctx.data.train_loader(_COUNT_BATCH, group_by_length=False), vocab, "train")
        dev = count_ids(ctx.data.eval_loader(_COUNT_BATCH), vocab, "dev")
        kept = train >= p.min_count
        special = special_ids(tokenizer, vocab)
        kept[special] = True
        kept[: min(p.keep_top_k, vocab)] = True
        unk_id = getattr(tokenizer, "unk_token_id", None)
        if p.unseen == "unk" and (unk_id is None or not 0 <= unk_id < vocab):
            raise PassError("vocab_prune: the tokenizer has no unk token to send unseen ids to; "
                            "set params.unseen: mean (one added row, the mean of the dropped rows)")
        kept_ids = kept.nonzero().squeeze(1)
        rows = kept_ids.numel() + (1 if p.unseen == "mean" and not bool(kept.all()) else 0)
        dev_tokens = int(dev.sum())
        unseen_tokens = int(dev[~kept].sum())
        touched, examples = examples_with(ctx.data.eval_loader(_COUNT_BATCH), ~kept)
        report: dict[str, Any] = {
            "table": name, "vocab_size": vocab, "embedding_dim": dim, "vocab_kept": rows,
            "vocab_kept_ids": int(kept_ids.numel()), "vocab_kept_share": kept_ids.numel() / vocab,
            "train_tokens": int(train.sum()), "train_distinct_ids": int((train > 0).sum()),
            "special_ids": len(special), "dev_tokens": dev_tokens,
            "dev_unseen_tokens": unseen_tokens, "dev_unseen_distinct_ids": int(((dev > 0) & ~kept).sum()),
            "vocab_unseen_token_share": unseen_tokens / dev_tokens if dev_tokens else 0.0,
            "dev_examples": examples, "dev_examples_with_unseen": touched,
            "dev_examples_with_unseen_share": touched / examples if examples else 0.0,
            "unseen_maps_to": f"unk (id {unk_id})" if p.unseen == "unk" else "mean of dropped rows",
            "bytes": table_bytes(vocab, rows, dim),
        }
        return Analysis(report=report, state={"kept_ids": kept_ids, "unk_id": unk_id})

    def transform(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        analysis = ctx.analysis
        if "kept_ids" not in analysis.state:  # called without the engine's analyze (scripts, benches)
            analysis = as_analysis(self.analyze(model, ctx))
        name, emb = input_table(model)
        layer = RemappedEmbedding.from_embedding(emb, analysis.state["kept_ids"], self.params.unseen,
                                                 analysis.state["unk_id"])
        set_module(model, name, layer)
        for key in ("vocab_kept", "vocab_unseen_token_share"):
            ctx.metrics[key] = analysis.report[key]
        ctx.report["vocab_kept"] = analysis.report["vocab_kept"]
        return model


def input_table(model: nn.Module) -> tuple[str, nn.Embedding]:
    """The model's word-embedding table and its module name; refused if not a plain, untied ``nn.Embedding``."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:
        emb = None
    if emb is None:
        raise PassError(f"vocab_prune: {type(model).__name__} has no input embeddings (get_input_embeddings())")
    name = next(n for n, m in model.named_modules() if m is emb)
    if isinstance(emb, CompressedLayer) or type(emb) is not nn.Embedding:
        raise PassError(f"vocab_prune: the word table {name} is a {type(emb).__name__}, not a plain nn.Embedding; "
                        "prune the vocabulary once, before int8")
    tied = [n for n, t in model.named_parameters(remove_duplicate=False)
            if t is emb.weight and n != f"{name}.weight"]
    if tied:
        raise PassError(f"vocab_prune: the word table {name} is tied to {tied[0]} (an LM head); pruning its rows "
                        "would change the head's vocabulary, so it is left to models with an untied table")
    return name, emb


def count_ids(loader: Any, vocab: int, split: str) -> torch.Tensor:
    """How often each id in [0, vocab) occurs in the batches' ``input_ids`` / ``input_ids_*`` keys
    (positions whose matching ``attention_mask`` / ``attention_mask_*`` is 0 left out)."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for batch in loader:
        for key, ids in batch.items():
            if not key.startswith("input_ids") or not torch.is_tensor(ids):
                continue
            mask = batch.get("attention_mask" + key[len("input_ids"):])
            ids = ids[mask.bool()] if torch.is_tensor(mask) and mask.shape == ids.shape else ids.reshape(-1)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise PassError(f"vocab_prune: the {split} split holds token id {int(ids.max())} outside the "
                                f"model's {vocab}-row word table; tokenizer and model do not match")
            counts += torch.bincount(ids.long(), minlength=vocab)
    return counts


def examples_with(loader: Any, dropped: torch.Tensor) -> tuple[int, int]:
    """(examples holding at least one ``dropped`` id, examples) over the batches' id keys: only
    those examples can be predicted differently after pruning (a bound on the accuracy change)."""
    touched = total = 0
    for batch in loader:
        hit = None
        for key, ids in batch.items():
            if not key.startswith("input_ids") or not torch.is_tensor(ids):
                continue
            mask = batch.get("attention_mask" + key[len("input_ids"):])
            row = dropped[ids.long()]
            if torch.is_tensor(mask) and mask.shape == ids.shape:
                row &= mask.bool()
            row = row.reshape(row.shape[0], -1).any(1)
            hit = row if hit is None else hit | row
        if hit is not None:
            touched += int(hit.sum())
            total += int(hit.numel())
    return touched, total


def special_ids(tokenizer: Any, vocab: int) -> torch.Tensor:
    """The tokenizer's special token ids inside the table (always kept)."""
    ids = sorted({int(i) for i in getattr(tokenizer, "all_special_ids", None) or () if i is not None and 0 <= i < vocab})
    return torch.tensor(ids, dtype=torch.long)


def table_bytes(vocab: int, rows: int, dim: int) -> dict[str, dict[str, float | None]]:
    """The word table's bytes before (``vocab`` rows) and after pruning (``rows`` rows plus the remap), as
    fp32, int8 and int4 (group :data:`REPORT_INT4_GROUP`; None where the group does not divide ``dim``)."""
    out = {}
    for fmt in ("fp32", "int8", "int4"):
        try:
            before = embedding_table_bytes(vocab, dim, fmt, REPORT_INT4_GROUP)
            after = embedding_table_bytes(rows, dim, fmt, REPORT_INT4_GROUP) + remap_bytes(vocab, rows)
        except ValueError:
            before = after = None
        out[fmt] = {"before": before, "after": after,
                    "ratio": before / after if before and after else None}
    return out
