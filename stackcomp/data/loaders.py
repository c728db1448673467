"""A task's data ready for a model: tokenized once, capped, and served as torch DataLoaders.

Tokenization is lazy (a split is tokenized the first time something asks for it) and happens
once per split, batched, truncating to ``max_length`` without padding; batches are padded to
their own longest sequence (``DataCollatorWithPadding``). Training batches group sequences of
similar length (``transformers``' ``LengthGroupedSampler``), evaluation batches are sorted by
length, longest first; either way each label travels in the batch with its own sequence.

Sample caps take a seeded random subset (``options.seed``) for train and eval alike, so a
small eval cap still samples the whole dev set rather than its first rows (which in some GLUE
files are ordered by source or genre); the subset keeps file order.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from stackcomp.data.augment import AugmentOptions, augment_dataset
from stackcomp.data.glue import TaskSpec, get_task, load_split, resolve_split
from stackcomp.data.metrics import compute_metrics as _compute_metrics
from stackcomp.data.sampling import seeded_subset as _subset  # the task kinds import it from here
from stackcomp.data.unlabeled import UnlabeledSource
from stackcomp.errors import DataError

if TYPE_CHECKING:
    import datasets
    from torch.utils.data import DataLoader

log = logging.getLogger("stackcomp.data")


class DataOptions(BaseModel):
    """How a recipe's task data is read, capped and tokenized (the recipe's ``data:`` section)."""

    model_config = ConfigDict(extra="forbid")

    max_train_samples: int | None = Field(default=None, ge=1, description="seeded random subset of train")
    max_eval_samples: int | None = Field(default=None, ge=1, description="seeded random subset of the eval split")
    max_length: int = Field(default=128, ge=2, description="tokens per example after truncation")
    seed: int = Field(default=42, ge=0, lt=2**32, description="seed for sample caps, shuffling and calibration picks")
    group_by_length: bool = Field(default=True, description="train batches of similar length (less padding)")
    data_dir: str | None = Field(default=None, description="folder holding glue/<TASK>/*.tsv; "
                                 "default $STACKCOMP_DATA_DIR, else the hub")
    eval_split: str | None = Field(default=None, description="evaluation split, default the task's dev split "
                                   "(MNLI: dev_matched; dev_mismatched also works)")
    unlabeled: list[UnlabeledSource] = Field(default_factory=list, description="text files of unlabeled "
                                             "sentences that distillation learns from next to the train split's "
                                             "(stages with train.batches: unlabeled; stackcomp.data.unlabeled)")


class _Collate:
    """Dynamic padding to the batch's longest sequence; returns a plain dict of tensors."""

    def __init__(self, tokenizer: Any):
        from transformers import DataCollatorWithPadding

        self.inner = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.inner(features))


@contextmanager
def _quiet_datasets():
    """No datasets progress bars while we map: the engine shows its own progress."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def capped(raw: datasets.Dataset, cap: int | None, seed: int) -> datasets.Dataset:
    """``raw`` cut to the seeded random subset a sample cap asks for (file order kept), or as it is."""
    keep = _subset(len(raw), cap, seed)
    return raw if keep is None else raw.select(keep, keep_in_memory=True)


def map_quietly(raw: datasets.Dataset, encode: Any, *, key: str, batch_size: int = 1000) -> datasets.Dataset:
    """``raw.map(encode)``: batched, in memory, without datasets' progress bars or cache files.
    ``key`` names what makes the result (task, split, max_length, cap, seed, tokenizer): an explicit
    fingerprint spares datasets from hashing the tokenizer through the closure."""
    fingerprint = hashlib.sha256(f"{key}|{raw._fingerprint}".encode()).hexdigest()[:32]
    with _quiet_datasets():
        return raw.map(encode, batched=True, batch_size=batch_size, remove_columns=raw.column_names,
                       keep_in_memory=True, load_from_cache_file=False, new_fingerprint=fingerprint)


def calibration_order(lengths: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` examples (all if fewer) picked at random (seeded), longest first, so batches
    of them hold little padding: what every kind's ``calibration_batches`` serves."""
    if n < 1:
        raise DataError(f"calibration needs at least one example, got n={n}")
    pick = _subset(len(lengths), n, seed)
    pick = np.arange(len(lengths)) if pick is None else pick
    return pick[np.argsort(-np.asarray(lengths)[pick], kind="stable")]


class TaskData:
    """Train/eval loaders, calibration batches and metrics for one task and one tokenizer."""

    def __init__(self, task: str | TaskSpec, tokenizer: Any, options: DataOptions | dict | None = None):
        self.task: TaskSpec = get_task(task)
        self.tokenizer = tokenizer
        self.options = options if isinstance(options, DataOptions) else DataOptions.model_validate(options or {})
        if getattr(tokenizer, "pad_token", None) is None:
            name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
            raise DataError(f"tokenizer {name!r} has no pad token, which batching needs; "
                            "give it one (e.g. tokenizer.pad_token = tokenizer.eos_token) before building TaskData")
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000 and self.options.max_length > limit:
            raise DataError(f"data.max_length {self.options.max_length} exceeds the tokenizer's model_max_length "
                            f"{limit}; the model cannot take sequences that long")
        self.eval_split: str = resolve_split(self.task, self.options.eval_split or "dev")
        self.collator = _Collate(tokenizer)
        self._tokenized: dict[str, tuple[datasets.Dataset, np.ndarray]] = {}
        self._sorted: dict[str, datasets.Dataset] = {}
        self._augmented_sets: dict[str, tuple[datasets.Dataset, np.ndarray]] = {}
        self._unlabeled_rows: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ facts

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.task.label_names

    @property
    def is_regression(self) -> bool:
        return self.task.is_regression

    @property
    def main_metric(self) -> str:
        return self.task.main_metric

    # ------------------------------------------------------------------ tokenized splits

    def dataset(self, split: str = "train") -> datasets.Dataset:
        """The tokenized split: columns input_ids, attention_mask, [token_type_ids], labels."""
        return self._split(split)[0]

    def lengths(self, split: str = "train") -> np.ndarray:
        """Tokens per example of the tokenized split, in dataset order."""
        return self._split(split)[1]

    @property
    def train_dataset(self) -> datasets.Dataset:
        return self.dataset("train")

    @property
    def eval_dataset(self) -> datasets.Dataset:
        return self.dataset(self.eval_split)

    def _split(self, split: str) -> tuple[datasets.Dataset, np.ndarray]:
        split = resolve_split(self.task, split)
        if split not in self._tokenized:
            self._tokenized[split] = self._tokenize(split)
        return self._tokenized[split]

    def _tokenize(self, split: str) -> tuple[datasets.Dataset, np.ndarray]:
        opts = self.options
        cap = opts.max_train_samples if split == "train" else opts.max_eval_samples
        raw = capped(load_split(self.task, split, opts.data_dir), cap, opts.seed)
        tokenizer, fields, max_length = self.tokenizer, self.task.text_fields, opts.max_length
        wanted = {"input_ids", *getattr(tokenizer, "model_input_names", ())}

        def encode(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(*(batch[f] for f in fields), truncation=True, max_length=max_length)
            out = {k: v for k, v in enc.items() if k in wanted}
            out["labels"] = batch["label"]
            out["length"] = [len(ids) for ids in enc["input_ids"]]
            return out

        start = time.perf_counter()
        ds = map_quietly(raw, encode, key=f"{self.task.name}|{split}|{max_length}|{cap}|{opts.seed}|{id(tokenizer)}",
                         batch_size=2000)
        lengths = ds.data.column("length").to_numpy().astype(np.int64)
        ds = ds.remove_columns("length")
        log.info("tokenized %s %s: %d examples in %.2f s (longest %d tokens, %d at max_length)", self.task.name, split,
                 len(ds), time.perf_counter() - start, int(lengths.max(initial=0)),
                 int((lengths >= max_length).sum()))
        return ds, lengths

    # ------------------------------------------------------------------ loaders

    def train_loader(self, batch_size: int, seed: int | None = None, group_by_length: bool | None = None,
                     *, num_workers: int = 0, drop_last: bool = False,
                     augment: AugmentOptions | None = None) -> DataLoader:
        """Shuffled training batches (seeded), length-grouped unless told otherwise.

        Each pass over the loader draws a new order from the same seeded generator, so epochs
        differ and a rerun repeats them. Under accelerate's ``prepare`` every process builds the
        same order from the same seed and takes its own shard of the batches. ``augment`` adds
        perturbed copies of every example (:mod:`stackcomp.data.augment`), marked ``augmented``.
        """
        ds, lengths = self._split("train") if augment is None else self._augmented(augment)
        group = self.options.group_by_length if group_by_length is None else group_by_length
        return shuffled_loader(ds, lengths, batch_size, seed=self.options.seed if seed is None else seed,
                               group_by_length=group, collate_fn=self.collator, num_workers=num_workers,
                               drop_last=drop_last)

    def unlabeled_loader(self, batch_size: int, seed: int | None = None, group_by_length: bool | None = None, *,
                         num_workers: int = 0) -> DataLoader:
        """Shuffled (seeded; length-grouped unless told otherwise) batches of single sentences
        without labels: the train split's sentences, then those of the ``data.unlabeled`` files,
        deduplicated (what ``train.batches: unlabeled`` trains on: distillation from soft
        targets). Single-sentence tasks only: the files hold sentences, not pairs."""
        from stackcomp.data.unlabeled import corpus, lengths_of, tokenize_sentences

        if self.task.is_pair:
            raise DataError(f"{self.task.name} takes sentence pairs ({', '.join(self.task.text_fields)}); unlabeled "
                            "batches are single sentences, so train.batches: unlabeled works on single-sentence "
                            "tasks only")
        _check_batch_size(batch_size)
        if self._unlabeled_rows is None:
            opts = self.options
            raw = capped(load_split(self.task, "train", opts.data_dir), opts.max_train_samples, opts.seed)
            texts = corpus(list(raw[self.task.text_fields[0]]), opts.unlabeled, opts.data_dir, opts.seed)
            self._unlabeled_rows = tokenize_sentences(self.tokenizer, texts, opts.max_length)
        rows = self._unlabeled_rows
        group = self.options.group_by_length if group_by_length is None else group_by_length
        return shuffled_loader(rows, lengths_of(rows), batch_size, seed=self.options.seed if seed is None else seed,
                               group_by_length=group, collate_fn=self.collator, num_workers=num_workers)

    def _augmented(self, options: AugmentOptions) -> tuple[datasets.Dataset, np.ndarray]:
        key = options.model_dump_json()
        if key not in self._augmented_sets:
            start, train = time.perf_counter(), self._split("train")[0]
            ds, lengths = augment_dataset(train, self.tokenizer, options, pair=self.task.is_pair)
            log.info("augmented %s train: %d examples -> %d in %.1f s", self.task.name, len(train), len(ds),
                     time.perf_counter() - start)
            self._augmented_sets[key] = ds, lengths
        return self._augmented_sets[key]

    def eval_loader(self, batch_size: int, *, split: str | None = None, sort_by_length: bool = True,
                    num_workers: int = 0) -> DataLoader:
        """Evaluation batches in a fixed order: longest first (least padding), or file order."""
        from torch.utils.data import DataLoader

        _check_batch_size(batch_size)
        split = resolve_split(self.task, split or self.eval_split)
        ds, lengths = self._split(split)
        if sort_by_length:
            if split not in self._sorted:
                order = np.argsort(-lengths, kind="stable")
                self._sorted[split] = ds.select(order, keep_in_memory=True)
            ds = self._sorted[split]
        return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=self.collator,
                          num_workers=num_workers)

    def calibration_batches(self, n: int, batch_size: int, *, seed: int | None = None) -> list[dict[str, torch.Tensor]]:
        """``n`` training examples (not batches; all of train if fewer), picked at random (seeded).

        Batched in order of length, longest first, so little of each batch is padding; use all
        the batches, since early ones hold the longest sequences.
        """
        _check_batch_size(batch_size)
        ds, lengths = self._split("train")
        pick = calibration_order(lengths, n, self.options.seed if seed is None else seed)
        return [self.collator(_rows(ds, pick[i:i + batch_size])) for i in range(0, len(pick), batch_size)]

    def latency_batches(self, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n_batches`` eval batches in file order, model inputs only (what latency is timed on)."""
        batches = []
        for i, batch in enumerate(self.eval_loader(batch_size, sort_by_length=False)):
            if i >= n_batches:
                break
            batches.append({k: v for k, v in batch.items() if k != "labels"})
        return batches

    # ------------------------------------------------------------------ metrics

    @staticmethod
    def predict(model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What evaluation gathers of a batch: logits, labels and loss (``tasks.default_predict``)."""
        from stackcomp.tasks.base import default_predict

        return default_predict(model, batch)

    def compute_metrics(self, predictions: Any, labels: Any) -> dict[str, float]:
        """The task's metrics for logits (N, C) or regression scores (N,) against labels."""
        return _compute_metrics(self.task, predictions, labels)

    def __repr__(self) -> str:
        return (f"TaskData({self.task.name}, eval={self.eval_split}, max_length={self.options.max_length}, "
                f"tokenized={sorted(self._tokenized)})")


def shuffled_loader(rows: Any, lengths: np.ndarray, batch_size: int, *, seed: int, group_by_length: bool,
                    collate_fn: Any, num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """Training batches of ``rows`` in a seeded random order, grouped by ``lengths`` (``transformers``'
    ``LengthGroupedSampler``) unless told otherwise: every task kind's ``train_loader`` is this.

    Each pass over the loader draws a new order from the same seeded generator, so epochs differ and
    a rerun repeats them; under accelerate every process builds the same order and takes its shard."""
    from torch.utils.data import DataLoader, RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    _check_batch_size(batch_size)
    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        sampler = LengthGroupedSampler(batch_size, lengths=np.asarray(lengths).tolist(), generator=generator)
    else:
        sampler = RandomSampler(rows, generator=generator)
    return DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      drop_last=drop_last)


def _rows(ds: datasets.Dataset, indices: np.ndarray) -> list[dict[str, Any]]:
    return ds.__getitems__(indices.tolist())


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
