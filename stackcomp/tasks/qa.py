"""The ``qa`` kind: extractive question answering, SQuAD v1.1 (``qa/squad``, or ``qa/<folder>``).

The model predicts a start and an end logit per token; a question's answer is the best span over
all windows of its context (:mod:`stackcomp.data.squad` does the reading, windows, post-processing
and the official EM/F1). The main metric is ``f1``, also ``exact_match``, both fractions.

Data: ``<data_dir>/squad_v1.1/`` holding ``dev-v1.1.json`` and, when there, ``train-v1.1.json``;
without data dir, the hub's ``rajpurkar/squad``. ``qa/<folder>`` reads a user's folder with the
same files, or ``train.json``/``dev.json``, or JSON lines in the hub's layout (``train.jsonl``,
``dev.jsonl``). **Without a train file the dev file is split by article** (the official file:
first 38 articles train, last 10 evaluate), never by question; ``data.split_note`` says so and
:meth:`QATask.describe_metric` carries it into reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stackcomp.data import squad
from stackcomp.errors import DataError
from stackcomp.tasks.base import (
    Task,
    local_data_folder,
    register_task_kind,
    require_hub_cache,
)

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader

log = logging.getLogger("stackcomp.data")

SPLITS = ("train", "dev")
#: logit given to positions that cannot hold an answer (padding, question) in distillation rows
MASKED_LOGIT = -1e4
_SQUAD_NAMES = ("squad", "squad_v1.1", "squad-v1.1", "squad1.1", "squadv1.1", "squad_v1", "rajpurkar/squad")


def resolve_split(split: str | None) -> str:
    """``train`` or ``dev`` (``validation``, ``eval``, ``valid`` name dev too)."""
    key = str(split or "dev").strip().lower()
    key = {"validation": "dev", "eval": "dev", "valid": "dev"}.get(key, key)
    if key not in SPLITS:
        raise DataError(f"qa tasks have splits train and dev (validation), not {split!r}")
    return key


class QATask(Task):
    """Extractive QA on SQuAD-style data: question + context in, a span of the context out."""

    kind = "qa"
    auto_class = "AutoModelForQuestionAnswering"
    metrics = ("exact_match", "f1")
    main_metric = "f1"

    def __init__(self, name: str = "qa/squad", folder: str | Path | None = None):
        self.name = name
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._note: str | None = None  # the exact split note, once data was built

    @property
    def short_name(self) -> str:
        return "squad" if self.folder is None else self.folder.name

    # ------------------------------------------------------------------ where the data is

    def data_folder(self, data_dir: str | Path | None) -> Path | None:
        """The folder holding the JSON files, or None for the hub."""
        if self.folder is not None:
            return self.folder
        return local_data_folder(data_dir, squad.SQUAD_DIR,
                                 is_the_folder=lambda root: _first(root, squad.DEV_FILES) is not None)

    def train_file(self, data_dir: str | Path | None) -> Path | None:
        folder = self.data_folder(data_dir)
        return None if folder is None else _first(folder, squad.TRAIN_FILES)

    def dev_file(self, data_dir: str | Path | None) -> Path | None:
        folder = self.data_folder(data_dir)
        return None if folder is None else (_first(folder, squad.DEV_FILES) or folder / squad.DEV_FILES[0])

    def data_files(self, splits: list[str], data_dir: str | Path | None) -> dict[str, Path] | None:
        """Each split's file; without a train file, train comes from the dev file (article split)."""
        dev = self.dev_file(data_dir)
        if dev is None:
            return None
        train = self.train_file(data_dir) or dev
        return {s: train if s == "train" else dev for s in map(resolve_split, splits)}

    def hub_source(self) -> tuple[str, str | None]:
        return (squad.HUB_ID, None) if self.folder is None else (str(self.folder), None)

    def check_data(self, splits: list[str], data_dir: str | Path | None) -> None:
        for s in splits:
            resolve_split(s)
        folder = self.data_folder(data_dir)
        if folder is None:
            require_hub_cache(self.name, squad.HUB_ID, f"{squad.SQUAD_DIR}/dev-v1.1.json")
            return
        if _first(folder, squad.DEV_FILES) is None:
            held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            there = f" (it holds {', '.join(held[:8])})" if held else " (no such folder)" if not folder.is_dir() else ""
            raise DataError(f"{self.name}: no dev file in {folder}{there}; expected one of "
                            f"{', '.join(squad.DEV_FILES)} (and optionally {', '.join(squad.TRAIN_FILES)})")

    def split_note(self, data_dir: str | Path | None = None) -> str | None:
        """What the numbers are measured on when the train file is missing (None when it is there)."""
        if self._note is not None:
            return self._note
        folder = self.data_folder(data_dir)
        if folder is None or self.train_file(data_dir) is not None:
            return None
        return (f"article split of {self.dev_file(data_dir).name} (no train file): its last fifth of the articles "
                "evaluate (the official file: last 10 of 48), the rest train")

    def describe_metric(self) -> str:
        note = self.split_note()
        return f"{self.main_metric} on {self.name}" + (f" ({note})" if note else "")

    # ------------------------------------------------------------------ data, distillation

    def build_data(self, tokenizer: Any, options: Any) -> QAData:
        data = QAData(self, tokenizer, options)
        return data

    def load_splits(self, data_dir: str | Path | None, splits: tuple[str, ...] = SPLITS
                    ) -> tuple[dict[str, list[dict[str, Any]]], str | None]:
        """({split: example rows}, note): the files, the article split of the dev file (both splits,
        whatever was asked), or the hub."""
        if self.data_folder(data_dir) is None:
            return {s: squad.load_hub_split(s) for s in splits}, None
        self.check_data(list(splits), data_dir)
        train_file = self.train_file(data_dir)
        if train_file is not None:
            files = {"train": train_file, "dev": self.dev_file(data_dir)}
            return {s: squad.read_squad_file(files[s]) for s in splits}, None
        train, dev, note = squad.split_by_article(squad.read_squad_file(self.dev_file(data_dir)))
        self._note = note
        return {"train": train, "dev": dev}, note

    def kd_outputs(self, model: nn.Module, batch: Mapping[str, Any], *, output_hidden_states: bool = False,
                   output_attentions: bool = False) -> dict[str, Any]:
        """Start and end distributions as rows (2N, T): every window's start logits, then its end
        logits; positions that cannot hold an answer (padding, the question) at -1e4, the same for
        student and teacher since both read the same batch. ``loss`` is the model's QA loss when
        the batch has start/end positions."""
        from stackcomp.distill.kd import forward_inputs

        out = model(**forward_inputs(model, batch, drop=("feature_index",)),
                    output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        get = (lambda k: out.get(k)) if isinstance(out, Mapping) else (lambda k: getattr(out, k, None))
        start, end = get("start_logits"), get("end_logits")
        valid = answer_positions(batch, start.shape[1]).to(start.device)
        logits = torch.cat([start, end]).masked_fill(~torch.cat([valid, valid]), MASKED_LOGIT)
        return {"logits": logits, "loss": get("loss"), "hidden_states": get("hidden_states"),
                "attentions": get("attentions")}

    def __repr__(self) -> str:
        return f"QATask({self.name})"


def answer_positions(batch: Mapping[str, Any], width: int) -> torch.Tensor:
    """(N, T) bool: positions an answer can start or end at: real tokens of the context (second
    segment, where the batch has token types) and the CLS token (the "no answer here" label)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    types = batch.get("token_type_ids")
    if types is not None and bool((types == 1).any()):
        valid = valid & (types == 1)
        valid[:, 0] = True
    return valid[:, :width]


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


# ----------------------------------------------------------------------------- the data


class QAData:
    """Windows of SQuAD examples for one tokenizer: train/eval loaders, calibration and latency
    batches, ``predict`` (start/end logits per window) and ``compute_metrics`` (EM/F1 per question).

    Evaluation batches carry ``feature_index`` (the window's row), which ``predict`` returns as
    labels, so windows evaluated longest first are put back with their question and offsets.
    """

    def __init__(self, task: QATask, tokenizer: Any, options: Any = None):
        from transformers import DataCollatorWithPadding

        from stackcomp.data import DataOptions

        self.task = task
        self.tokenizer = tokenizer
        self.options = options if isinstance(options, DataOptions) else DataOptions.model_validate(options or {})
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{task.name} needs a fast tokenizer (offsets mapping); "
                            f"{type(tokenizer).__name__} is not one")
        if getattr(tokenizer, "pad_token", None) is None:
            raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token, which "
                            "batching needs")
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000 and self.options.max_length > limit:
            raise DataError(f"data.max_length {self.options.max_length} exceeds the tokenizer's model_max_length "
                            f"{limit}; the model cannot take sequences that long")
        self.eval_split = resolve_split(self.options.eval_split)
        self.collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        self._examples: dict[str, list[dict[str, Any]]] = {}
        self._note: str | None = None
        self._features: dict[tuple[str, bool], squad.Features] = {}
        self._scored_split = self.eval_split

    # ------------------------------------------------------------------ facts

    @property
    def main_metric(self) -> str:
        return self.task.main_metric

    @property
    def split_note(self) -> str | None:
        """Set when the dev file was split by article (no train file): report it beside every number."""
        self.examples("dev")
        return self._note

    def examples(self, split: str) -> list[dict[str, Any]]:
        """The split's questions, after the sample caps (a seeded subset, file order kept)."""
        from stackcomp.data.loaders import _subset

        split = resolve_split(split)
        if split not in self._examples:
            raw, note = self.task.load_splits(self.options.data_dir, (split,))
            if note and self._note is None:
                self._note = note
                log.warning("%s: %s; every number on this data is on that split", self.task.name, note)
            for name, rows in raw.items():
                cap = self.options.max_train_samples if name == "train" else self.options.max_eval_samples
                keep = _subset(len(rows), cap, self.options.seed)
                self._examples.setdefault(name, rows if keep is None else [rows[i] for i in keep])
        return self._examples[split]

    def features(self, split: str, *, train: bool) -> squad.Features:
        """Windows of the split: with answer positions (``train``) or with offsets (evaluation)."""
        split = resolve_split(split)
        if (split, train) not in self._features:
            self._features[(split, train)] = squad.build_features(self.examples(split), self.tokenizer,
                                                                  self.options.max_length, train=train)
            f = self._features[(split, train)]
            log.info("tokenized %s %s: %d questions -> %d windows", self.task.name, split,
                     len(self.examples(split)), len(f))
        return self._features[(split, train)]

    # ------------------------------------------------------------------ loaders

    def train_loader(self, batch_size: int, seed: int | None = None, group_by_length: bool | None = None, *,
                     num_workers: int = 0, drop_last: bool = False, augment: Any = None) -> DataLoader:
        """Shuffled training windows (seeded) with ``start_positions``/``end_positions``."""
        from torch.utils.data import DataLoader, RandomSampler
        from transformers.trainer_pt_utils import LengthGroupedSampler

        from stackcomp.data.loaders import _check_batch_size

        _check_batch_size(batch_size)
        if augment is not None:
            raise DataError(f"data augmentation works on sentence tasks; {self.task.name} has none")
        f = self.features("train", train=True)
        rows = [f.row(i) for i in range(len(f))]
        generator = torch.Generator().manual_seed(self.options.seed if seed is None else seed)
        group = self.options.group_by_length if group_by_length is None else group_by_length
        sampler = (LengthGroupedSampler(batch_size, lengths=f.lengths.tolist(), generator=generator) if group
                   else RandomSampler(rows, generator=generator))
        return DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=self.collator,
                          num_workers=num_workers, drop_last=drop_last)

    def eval_loader(self, batch_size: int, *, split: str | None = None, sort_by_length: bool = True,
                    num_workers: int = 0) -> DataLoader:
        """Evaluation windows in a fixed order (longest first, or file order), each with its
        ``feature_index``; :meth:`compute_metrics` scores the split last asked for here."""
        from torch.utils.data import DataLoader

        from stackcomp.data.loaders import _check_batch_size

        _check_batch_size(batch_size)
        split = resolve_split(split or self.eval_split)
        f = self.features(split, train=False)
        order = np.argsort(-f.lengths, kind="stable") if sort_by_length else np.arange(len(f))
        rows = [{**f.row(int(i)), "feature_index": int(i)} for i in order]
        self._scored_split = split
        return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=self.collator,
                          num_workers=num_workers)

    def calibration_batches(self, n: int, batch_size: int, *, seed: int | None = None) -> list[dict[str, torch.Tensor]]:
        """``n`` training windows picked at random (seeded), model inputs only, longest first."""
        from stackcomp.data.loaders import _check_batch_size, calibration_order

        _check_batch_size(batch_size)
        f = self.features("train", train=True)
        pick = calibration_order(f.lengths, n, self.options.seed if seed is None else seed)
        return [self.collator([f.row(int(i), with_labels=False) for i in pick[s:s + batch_size]])
                for s in range(0, len(pick), batch_size)]

    def latency_batches(self, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n_batches`` batches of evaluation windows in file order (repeated when
        there are fewer), model inputs only: the same batches for every model compared."""
        from stackcomp.data.loaders import _check_batch_size

        _check_batch_size(batch_size)
        f = self.features(self.eval_split, train=False)
        picks = np.arange(batch_size * n_batches) % len(f)
        return [self.collator([f.row(int(i), with_labels=False) for i in picks[s:s + batch_size]])
                for s in range(0, len(picks), batch_size)]

    # ------------------------------------------------------------------ predictions and metrics

    def predict(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``predictions`` (N, T, 2): start and end logits of each window; ``labels``: its feature index."""
        from stackcomp.distill.kd import forward_inputs

        out = model(**forward_inputs(model, batch, drop=("feature_index",)))
        get = (lambda k: out.get(k)) if isinstance(out, Mapping) else (lambda k: getattr(out, k, None))
        result = {"predictions": torch.stack([get("start_logits"), get("end_logits")], dim=-1)}
        if batch.get("feature_index") is not None:
            result["labels"] = batch["feature_index"]
        if get("loss") is not None:
            result["loss"] = get("loss")
        return result

    def compute_metrics(self, predictions: Any, labels: Any) -> dict[str, float]:
        """``exact_match`` and ``f1`` (fractions) of the best span per question: ``predictions``
        (N, T, 2) start/end logits (positions past a window's end are padding, never chosen),
        ``labels`` (N,) the windows' feature indices. A question none of whose windows is among
        the predictions scores 0."""
        preds = predictions.detach().float().cpu().numpy() if isinstance(predictions, torch.Tensor) \
            else np.asarray(predictions, dtype=np.float32)
        ids = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        ids = ids.astype(np.int64).reshape(-1)
        split = self._scored_split
        f = self.features(split, train=False)
        if preds.ndim != 3 or preds.shape[-1] != 2 or len(preds) != len(ids):
            raise DataError(f"QA predictions must be (windows, tokens, 2) start/end logits with one feature index "
                            f"each; got {preds.shape} for {ids.shape} labels")
        if len(ids) and (ids.min() < 0 or ids.max() >= len(f)):
            raise DataError(f"feature index {int(ids.max())} is not a window of {self.task.name} {split} "
                            f"({len(f)} windows)")
        examples = self.examples(split)
        answers = squad.best_answers(examples, f, preds[..., 0], preds[..., 1], ids)
        return squad.squad_scores(answers, examples)

    def __repr__(self) -> str:
        return f"QAData({self.task.name}, eval={self.eval_split}, max_length={self.options.max_length})"


def qa_task(dataset: str) -> QATask:
    """``squad`` (also ``squad_v1.1``, ``rajpurkar/squad``), or a folder path holding SQuAD files
    (``qa/./my_squad``, ``qa//data/my_squad``, ``qa/~/my_squad``)."""
    key = dataset.strip()
    if key.lower() in _SQUAD_NAMES:
        return QATask("qa/squad")
    if key and ("/" in key or "\\" in key or key.startswith((".", "~")) or Path(key).expanduser().is_dir()):
        return QATask(f"qa/{key}", folder=key)
    raise DataError(f"unknown qa dataset {dataset!r}; known: qa/squad, or qa/<folder> for a folder holding "
                    f"SQuAD JSON ({', '.join(squad.DEV_FILES[:2])}...)")


qa_task.known = lambda: ["qa/squad"]  # type: ignore[attr-defined]
register_task_kind("qa", qa_task)
