"""The ``ner`` kind: named-entity recognition as token classification (``ner/conll2003``, ``ner/<folder>``).

The model tags every subword (``AutoModelForTokenClassification``); a word's tag is read at its
first subword: the word's gold label sits there, the word's other subwords and the special
tokens get -100 (ignored by the loss and the metric), as in Hugging Face's ``run_ner``. The
metric is entity-level precision, recall and F1 (main: ``f1``) and tag accuracy from
``seqeval`` in its default mode (the CoNLL ``conlleval`` script's counting, what ``run_ner`` and
``evaluate``'s seqeval report), on the IOB2 tags.

Data (:mod:`stackcomp.data.conll`): ``<data_dir>/conll2003/{train,dev,test}.txt`` in CoNLL
columns, else the hub's ``eriktks/conll2003``; ``ner/<folder>`` reads a user's folder of CoNLL
or JSON-lines files with its own label set. Sentences longer than ``data.max_length`` subwords
are cut there; their last words are not scored (counted and logged).
"""

from __future__ import annotations

import difflib
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stackcomp.data import conll
from stackcomp.errors import DataError, NumericalError
from stackcomp.tasks.base import (
    Task,
    local_data_folder,
    register_task_kind,
    require_hub_cache,
)

if TYPE_CHECKING:
    import datasets
    from torch import nn
    from torch.utils.data import DataLoader

log = logging.getLogger("stackcomp.data")

#: label id of positions that are not a word's first subword (padding, special tokens, continuations)
IGNORE = -100
CONLL_DIR = "conll2003"
_CONLL_NAMES = ("conll2003", "conll-2003", "conll", "conll03", "eriktks/conll2003")


class NerTask(Task):
    """Token classification: a tag per word, scored as entities."""

    kind = "ner"
    auto_class = "AutoModelForTokenClassification"
    metrics = ("f1", "precision", "recall", "accuracy")
    main_metric = "f1"

    def __init__(self, name: str = "ner/conll2003", folder: str | Path | None = None):
        self.name = name
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._labels: tuple[str, ...] | None = conll.CONLL2003_LABELS if folder is None else None

    @property
    def short_name(self) -> str:
        return CONLL_DIR if self.folder is None else self.folder.name

    # ------------------------------------------------------------------ labels, head

    @property
    def label_names(self) -> tuple[str, ...]:
        """CoNLL-2003's tags in the hub's order; for a user's folder, the tags of its train split
        (sorted, ``O`` first), read once."""
        if self._labels is None:
            self.check_data(["train"], None)
            self._labels = conll.label_list(conll.read_split_file(conll.split_file(self.folder, "train")))
        return self._labels

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def model_kwargs(self) -> dict[str, Any]:
        names = self.label_names
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}}

    # ------------------------------------------------------------------ where the data is

    def data_folder(self, data_dir: str | Path | None) -> Path | None:
        """The folder holding the split files, or None for the hub."""
        if self.folder is not None:
            return self.folder
        return local_data_folder(data_dir, CONLL_DIR, is_the_folder=lambda root: root.name == CONLL_DIR)

    def data_files(self, splits: list[str], data_dir: str | Path | None) -> dict[str, Path] | None:
        folder = self.data_folder(data_dir)
        if folder is None:
            return None
        return {conll.resolve_split(s): conll.split_file(folder, s) for s in splits}

    def hub_source(self) -> tuple[str, str | None]:
        return (conll.CONLL2003_HUB, None) if self.folder is None else (str(self.folder), None)

    def check_data(self, splits: list[str], data_dir: str | Path | None) -> None:
        files = self.data_files(splits, data_dir)
        if files is None:
            require_hub_cache(self.name, conll.CONLL2003_HUB,
                              f"{CONLL_DIR}/train.txt and dev.txt (CoNLL columns, tag last)")
            return
        for split, path in files.items():
            if not path.is_file():
                folder = path.parent
                held = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
                there = f" ({folder} holds {', '.join(held)})" if held else "" if folder.is_dir() else " (no such folder)"
                hub = (f", or unset STACKCOMP_DATA_DIR (and data.data_dir) to load {conll.CONLL2003_HUB} from the hub"
                       if self.folder is None else "")
                raise DataError(f"{self.name} {split}: no file at {path}{there}; expected {split}.txt (CoNLL columns: "
                                f"word ... tag, a blank line between sentences) or {split}.jsonl{hub}")

    def load_split(self, split: str, data_dir: str | Path | None) -> datasets.Dataset:
        """One split as ``tokens`` and ``ner_tags`` (ids into :attr:`label_names`)."""
        split = conll.resolve_split(split)
        folder = self.data_folder(data_dir)
        if folder is None:
            return conll.load_hub_split(conll.CONLL2003_HUB, split, self.label_names)
        self.check_data([split], data_dir)
        ids = conll.CONLL2003_LABELS if self.folder is None else None  # numbers in JSON lines: the hub's order
        return conll.to_dataset(conll.read_split_file(conll.split_file(folder, split), ids), self.label_names)

    # ------------------------------------------------------------------ data, distillation

    def build_data(self, tokenizer: Any, options: Any) -> NerData:
        return NerData(self, tokenizer, options)

    def kd_outputs(self, model: nn.Module, batch: Mapping[str, Any], *, output_hidden_states: bool = False,
                   output_attentions: bool = False) -> dict[str, Any]:
        """Per-word rows of tag logits (M, C): the positions with a gold label (each word's first
        subword), or every attended token of an unlabeled batch. Student and teacher read the
        same batch, so their rows are the same words in the same order. ``loss``: the model's
        token cross-entropy when the batch has labels."""
        from stackcomp.distill.kd import forward_inputs

        out = model(**forward_inputs(model, batch, drop=()), output_hidden_states=output_hidden_states,
                    output_attentions=output_attentions)
        get = (lambda k: out.get(k)) if isinstance(out, Mapping) else (lambda k: getattr(out, k, None))
        logits = get("logits")
        return {"logits": logits[word_positions(batch).to(logits.device)], "loss": get("loss"),
                "hidden_states": get("hidden_states"), "attentions": get("attentions")}

    def __repr__(self) -> str:
        return f"NerTask({self.name})"


def word_positions(batch: Mapping[str, Any]) -> torch.Tensor:
    """(N, T) bool: where a word is scored (labels not -100), or, without labels, every attended token."""
    labels = batch.get("labels")
    if labels is not None:
        return labels != IGNORE
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)


# ----------------------------------------------------------------------------- tokenizer


def word_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer``, ready for words split in advance: a fast tokenizer (for ``word_ids``), and for
    byte-level BPE (RoBERTa, GPT-2 style) one that puts a space before each word (``add_prefix_space``),
    as each word has in running text; without it every word would be read as a word's continuation."""
    if not getattr(tokenizer, "is_fast", False):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(f"tokenizer {name!r} is not a fast (Rust) tokenizer; token classification needs one to map "
                        "subwords to words (word_ids). Use the model's tokenizer.json (AutoTokenizer with use_fast=True)")
    if not _byte_level_without_prefix_space(tokenizer):
        return tokenizer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        fixed = AutoTokenizer.from_pretrained(tmp, add_prefix_space=True)
    if _byte_level_without_prefix_space(fixed):
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} is byte-level BPE without add_prefix_space and does "
                        "not take add_prefix_space=True; token classification on split words needs it")
    log.info("tokenizer %s: loaded with add_prefix_space=True for words split in advance", tokenizer.name_or_path)
    return fixed


def _byte_level_without_prefix_space(tokenizer: Any) -> bool:
    """Whether the tokenizer's pre-tokenizer is ByteLevel with add_prefix_space off."""
    def walk(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return not node.get("add_prefix_space", False)
        return any(walk(child) for child in node.get("pretokenizers") or ())

    try:
        return walk(json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer"))
    except (AttributeError, ValueError):
        return False


# ----------------------------------------------------------------------------- the data


class NerData:
    """Words tokenized into subwords with aligned labels: train/eval loaders, calibration and
    latency batches, ``predict`` (a tag id per subword) and ``compute_metrics`` (seqeval)."""

    def __init__(self, task: NerTask, tokenizer: Any, options: Any = None):
        from stackcomp.data.loaders import DataOptions

        self.task = task
        self.options = options if isinstance(options, DataOptions) else DataOptions.model_validate(options or {})
        if getattr(tokenizer, "pad_token", None) is None:
            raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token, which batching "
                            "needs; give it one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000 and self.options.max_length > limit:
            raise DataError(f"data.max_length {self.options.max_length} exceeds the tokenizer's model_max_length "
                            f"{limit}; the model cannot take sequences that long")
        self.tokenizer = word_tokenizer(tokenizer)
        self.eval_split = conll.resolve_split(self.options.eval_split or "dev")
        self.label_names = task.label_names
        from transformers import DataCollatorForTokenClassification

        self._collate = DataCollatorForTokenClassification(self.tokenizer, label_pad_token_id=IGNORE,
                                                           return_tensors="pt")
        self._tokenized: dict[str, tuple[datasets.Dataset, np.ndarray]] = {}
        self._sorted: dict[str, datasets.Dataset] = {}
        #: per split: sentences cut at max_length and their words left without a label position
        self.truncated: dict[str, dict[str, int]] = {}

    main_metric = property(lambda self: self.task.main_metric)
    num_labels = property(lambda self: len(self.label_names))

    def collator(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad to the batch's longest sentence (labels with -100); a plain dict of tensors."""
        return dict(self._collate(features))

    # ------------------------------------------------------------------ tokenized splits

    def dataset(self, split: str = "train") -> datasets.Dataset:
        """The tokenized split: input_ids, attention_mask, [token_type_ids], labels (-100 off first subwords)."""
        return self._split(split)[0]

    def lengths(self, split: str = "train") -> np.ndarray:
        return self._split(split)[1]

    def _split(self, split: str) -> tuple[datasets.Dataset, np.ndarray]:
        split = conll.resolve_split(split)
        if split not in self._tokenized:
            self._tokenized[split] = self._tokenize(split)
        return self._tokenized[split]

    def _tokenize(self, split: str) -> tuple[datasets.Dataset, np.ndarray]:
        from stackcomp.data.loaders import capped, map_quietly

        opts = self.options
        cap = opts.max_train_samples if split == "train" else opts.max_eval_samples
        raw = capped(self.task.load_split(split, opts.data_dir), cap, opts.seed)
        tokenizer, max_length = self.tokenizer, opts.max_length
        wanted = {"input_ids", *getattr(tokenizer, "model_input_names", ())}

        def encode(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
            out = {k: v for k, v in enc.items() if k in wanted}
            out["labels"], out["lost"] = [], []
            for i, tags in enumerate(batch["ner_tags"]):
                labels = align_labels(enc.word_ids(i), tags)
                out["labels"].append(labels)
                out["lost"].append(len(tags) - sum(label != IGNORE for label in labels))
            out["length"] = [len(ids) for ids in enc["input_ids"]]
            return out

        start = time.perf_counter()
        ds = map_quietly(raw, encode, key=f"{self.task.name}|{split}|{max_length}|{cap}|{opts.seed}|{id(tokenizer)}")
        lengths = ds.data.column("length").to_numpy().astype(np.int64)
        lost = ds.data.column("lost").to_numpy()
        ds = ds.remove_columns(["length", "lost"])
        self.truncated[split] = {"sentences": int((lost > 0).sum()), "words": int(lost.sum())}
        log.info("tokenized %s %s: %d sentences in %.2f s (longest %d subwords)", self.task.name, split, len(ds),
                 time.perf_counter() - start, int(lengths.max(initial=0)))
        if lost.any():
            log.warning("%s %s: %d of %d sentences cut at max_length %d subwords; their last %d words are not "
                        "trained on or scored (raise data.max_length to keep them)", self.task.name, split,
                        self.truncated[split]["sentences"], len(ds), max_length, self.truncated[split]["words"])
        return ds, lengths

    # ------------------------------------------------------------------ loaders

    def train_loader(self, batch_size: int, seed: int | None = None, group_by_length: bool | None = None, *,
                     num_workers: int = 0, drop_last: bool = False, augment: Any = None) -> DataLoader:
        """Shuffled training batches (seeded), length-grouped unless told otherwise."""
        from stackcomp.data.loaders import shuffled_loader

        if augment is not None:
            raise DataError(f"{self.task.name}: augment perturbs sentences for sentence classification; "
                            "it does not apply to token classification (remove `augment`)")
        ds, lengths = self._split("train")
        group = self.options.group_by_length if group_by_length is None else group_by_length
        return shuffled_loader(ds, lengths, batch_size, seed=self.options.seed if seed is None else seed,
                               group_by_length=group, collate_fn=self.collator, num_workers=num_workers,
                               drop_last=drop_last)

    def eval_loader(self, batch_size: int, *, split: str | None = None, sort_by_length: bool = True,
                    num_workers: int = 0) -> DataLoader:
        """Evaluation batches in a fixed order: longest first (least padding), or file order."""
        from torch.utils.data import DataLoader

        from stackcomp.data.loaders import _check_batch_size

        _check_batch_size(batch_size)
        split = conll.resolve_split(split or self.eval_split)
        ds, lengths = self._split(split)
        if sort_by_length:
            if split not in self._sorted:
                self._sorted[split] = ds.select(np.argsort(-lengths, kind="stable"), keep_in_memory=True)
            ds = self._sorted[split]
        return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=self.collator, num_workers=num_workers)

    def calibration_batches(self, n: int, batch_size: int, *, seed: int | None = None) -> list[dict[str, torch.Tensor]]:
        """``n`` training sentences (all if fewer) picked at random (seeded), longest first; model inputs only."""
        from stackcomp.data.loaders import _check_batch_size, _rows, calibration_order

        _check_batch_size(batch_size)
        ds, lengths = self._split("train")
        pick = calibration_order(lengths, n, self.options.seed if seed is None else seed)
        return [_inputs(self.collator(_rows(ds, pick[i:i + batch_size]))) for i in range(0, len(pick), batch_size)]

    def latency_batches(self, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n_batches`` eval batches in file order, model inputs only."""
        batches = []
        for i, batch in enumerate(self.eval_loader(batch_size, sort_by_length=False)):
            if i >= n_batches:
                break
            batches.append(_inputs(batch))
        return batches

    # ------------------------------------------------------------------ metrics

    def predict(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The tag id at every subword (N, T), the batch's labels and the model's loss."""
        from stackcomp.distill.kd import forward_inputs

        out = model(**forward_inputs(model, batch, drop=()))
        get = (lambda k: out.get(k)) if isinstance(out, Mapping) else (lambda k: getattr(out, k, None))
        logits = get("logits")
        if not torch.isfinite(logits).all():
            raise NumericalError(f"{self.task.name}: the model's tag logits hold NaN or infinite values; it diverged")
        result = {"predictions": logits.argmax(-1)}
        if batch.get("labels") is not None:
            result["labels"] = batch["labels"]
        if get("loss") is not None:
            result["loss"] = get("loss")
        return result

    def compute_metrics(self, predictions: Any, labels: Any) -> dict[str, float]:
        """seqeval's entity precision/recall/F1 and tag accuracy (see :func:`ner_metrics`)."""
        return ner_metrics(predictions, labels, self.label_names)

    def __repr__(self) -> str:
        return (f"NerData({self.task.name}, eval={self.eval_split}, max_length={self.options.max_length}, "
                f"tokenized={sorted(self._tokenized)})")


def align_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
    """A label per subword: the word's tag at its first subword, -100 at the rest and at special tokens."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE if word is None or word == previous else tags[word])
        previous = word
    return labels


def _inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def tag_sequences(predictions: Any, labels: Any, names: tuple[str, ...]) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) tag strings per sentence, at the positions whose label is not -100.

    predictions: tag ids (N, T) or logits (N, T, C); labels: (N, T) ids with -100.
    """
    preds = _numpy(predictions)
    gold = _numpy(labels)
    if preds.ndim == 3:
        if preds.shape[-1] != len(names):
            raise DataError(f"{len(names)} tags, but the logits have shape {preds.shape}")
        if not np.isfinite(preds).all():
            raise NumericalError("tag logits hold NaN or infinite values; the model output diverged")
        preds = preds.argmax(-1)
    if preds.shape != gold.shape or gold.ndim != 2:
        raise DataError(f"token predictions {preds.shape} and labels {gold.shape} differ; expected (N, T) both")
    preds, gold = preds.astype(np.int64), gold.astype(np.int64)
    scored = gold != IGNORE
    if (gold[scored] >= len(names)).any() or (gold[scored] < 0).any() or (preds[scored] >= len(names)).any():
        raise DataError(f"tag ids outside the {len(names)} labels {list(names)}")
    table = np.asarray(names, dtype=object)
    y_true = [table[g[m]].tolist() for g, m in zip(gold, scored)]
    y_pred = [table[p[m]].tolist() for p, m in zip(preds, scored)]
    return y_true, y_pred


def ner_metrics(predictions: Any, labels: Any, names: tuple[str, ...]) -> dict[str, float]:
    """Entity-level ``precision``, ``recall``, ``f1`` (micro over entity types) and tag ``accuracy``,
    from seqeval in its default (conlleval) mode, as Hugging Face's run_ner and ``evaluate``'s
    seqeval compute them; no entity predicted or gold scores 0, not NaN."""
    from seqeval.metrics import accuracy_score
    from seqeval.metrics.sequence_labeling import precision_recall_fscore_support

    y_true, y_pred = tag_sequences(predictions, labels, names)
    if not any(y_true):
        raise DataError("no labeled words to score")
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    return {"f1": float(f1), "precision": float(precision), "recall": float(recall),
            "accuracy": float(accuracy_score(y_true, y_pred))}


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def ner_task(dataset: str) -> NerTask:
    """``conll2003`` (also ``conll``, ``eriktks/conll2003``), or a folder of your own data
    (``./my_ner``, ``/data/ner``): CoNLL-column or JSON-lines split files."""
    key = dataset.strip()
    if not key:
        raise DataError(f"task 'ner/' names no dataset; known: {', '.join(ner_task.known())}, or ner/<folder>")
    if key.lower() in _CONLL_NAMES:
        return NerTask()
    path = Path(key).expanduser()
    if path.is_dir():
        return NerTask(f"ner/{key}", folder=path)
    if key.startswith((".", "/", "~")) or "/" in key.strip("/"):
        raise DataError(f"ner/{key}: no folder {path}; a folder of your own NER data holds train and dev files "
                        "(train.txt in CoNLL columns, or train.jsonl with tokens and ner_tags)")
    close = difflib.get_close_matches(key.lower(), _CONLL_NAMES, n=1, cutoff=0.6)
    hint = "did you mean 'ner/conll2003'? " if close else ""
    raise DataError(f"unknown NER dataset {dataset!r}; {hint}known: {', '.join(ner_task.known())}, "
                    "or ner/<folder> for a folder of your own CoNLL or JSON-lines files")


ner_task.known = lambda: ["ner/conll2003"]  # type: ignore[attr-defined]
register_task_kind("ner", ner_task)
