"""Training-set augmentation for distillation: teacher-labelled perturbed copies of each example.

A student distilled on the task's own examples sees each one's teacher distribution once per
epoch; more inputs near the data give the soft targets more to teach (Tang et al., 2019,
"Distilling Task-Specific Knowledge from BERT into Simple Neural Networks"; TinyBERT's data
augmentation). This implements their two model-free rules on token ids, so it needs nothing but
the tokenizer:

* masking: each content token becomes the tokenizer's mask token with probability ``mask_prob``;
* n-gram sampling: with probability ``ngram_prob`` the copy keeps only a random span of 1 to
  ``ngram_max`` content tokens (single-sentence tasks only: a span would cut a sentence pair).

Tokens are subwords, not words (the papers mask words). Gold labels do not transfer to a
perturbed copy (a span of a negative review can be neutral), so copies carry ``augmented = 1``
and only the teacher's losses see them; originals carry ``augmented = 0``. Copies identical to
their original are dropped. The set is drawn once from ``seed``, so every epoch and a rerun see
the same copies (and the teacher-logit cache serves them after the first epoch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stackcomp.errors import DataError

if TYPE_CHECKING:
    import datasets


class AugmentOptions(BaseModel):
    """How many perturbed copies of each training example to add, and how to perturb them."""

    model_config = ConfigDict(extra="forbid")

    copies: int = Field(default=2, ge=1, description="perturbed copies per training example (an epoch becomes "
                        "1 + copies times longer)")
    mask_prob: float = Field(default=0.1, ge=0, le=1, description="chance that a token becomes the mask token")
    ngram_prob: float = Field(default=0.25, ge=0, le=1, description="chance that a copy keeps only a random "
                              "n-gram (single-sentence tasks)")
    ngram_max: int = Field(default=5, ge=1, description="longest n-gram kept, in tokens")
    seed: int = Field(default=0, ge=0, description="seed of the copies")


def _edges(ids: list[int], special: set[int]) -> tuple[int, int]:
    """Index of the first content token and one past the last (special tokens at both ends)."""
    lo, hi = 0, len(ids)
    while lo < hi and ids[lo] in special:
        lo += 1
    while hi > lo and ids[hi - 1] in special:
        hi -= 1
    return lo, hi


def perturb(row: dict[str, Any], options: AugmentOptions, rng: np.random.Generator, *, mask_id: int,
            special: set[int], pair: bool) -> dict[str, Any]:
    """One perturbed copy of a tokenized row (``input_ids`` and the columns aligned with it)."""
    ids = row["input_ids"]
    out = dict(row)
    if not pair and options.ngram_prob > 0 and rng.random() < options.ngram_prob:
        lo, hi = _edges(ids, special)
        if hi - lo > 1:
            n = int(rng.integers(1, min(options.ngram_max, hi - lo) + 1))
            start = lo + int(rng.integers(0, hi - lo - n + 1))
            for k, v in row.items():
                if isinstance(v, list) and len(v) == len(ids):  # input_ids and the columns aligned with it
                    out[k] = v[:lo] + v[start:start + n] + v[hi:]
    if options.mask_prob > 0:
        hits = (rng.random(len(out["input_ids"])) < options.mask_prob).tolist()
        out["input_ids"] = [mask_id if hit and t not in special else t for t, hit in zip(out["input_ids"], hits)]
    return out


def augment_dataset(ds: datasets.Dataset, tokenizer: Any, options: AugmentOptions, *,
                    pair: bool) -> tuple[datasets.Dataset, np.ndarray]:
    """The tokenized set plus its perturbed copies, with an ``augmented`` column, and every row's length."""
    import datasets
    import pyarrow as pa

    mask_id = getattr(tokenizer, "mask_token_id", None)
    if options.mask_prob > 0 and mask_id is None:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(f"augment.mask_prob is {options.mask_prob} but tokenizer {name!r} has no mask token; "
                        "set augment.mask_prob: 0")
    special = set(getattr(tokenizer, "all_special_ids", ()))
    rng = np.random.default_rng(options.seed)
    columns = ds[:]  # column name -> list, one read of the whole (in-memory) set
    names = list(columns)
    out = {k: list(v) for k, v in columns.items()}
    out["augmented"] = [0] * len(ds)
    for i in range(len(ds)):
        row = {k: columns[k][i] for k in names}
        for _ in range(options.copies):
            c = perturb(row, options, rng, mask_id=mask_id if mask_id is not None else -1, special=special, pair=pair)
            if c["input_ids"] != row["input_ids"]:
                for k in names:
                    out[k].append(c[k])
                out["augmented"].append(1)
    features = ds.features.copy()
    features["augmented"] = datasets.Value("int8")
    lengths = np.array([len(ids) for ids in out["input_ids"]], dtype=np.int64)
    table = pa.Table.from_pydict(out, schema=features.arrow_schema)  # skips datasets' per-row encoding
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features)), lengths
