"""Unlabeled text for distillation: the recipe's ``data.unlabeled`` files.

A student that learns its teacher's outputs needs no labels, so it can learn from far more text
than the task's train split holds (a 3-layer sentence-embedding student distilled on the 10,000
STS-B train sentences alone stops improving early). ``data.unlabeled`` lists text files whose
sentences join the train split's when a training stage asks for unlabeled batches
(``train: {batches: unlabeled}``):

    data:
      unlabeled:
        - corpus/sentences.txt                          # one sentence a line
        - {path: glue/SST-2/train.tsv, column: sentence}  # a column of a TSV/CSV with a header
        - {path: questions.jsonl, column: question, max_sentences: 20000}

Relative paths are looked up in the data folder (``data.data_dir`` or ``$STACKCOMP_DATA_DIR``)
first, then in the working directory. What the files hold goes into every stage key that reads
the data (stackcomp.fingerprint), so editing a file re-runs those stages.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stackcomp.data.sampling import seeded_subset
from stackcomp.errors import DataError

#: formats and the column each reads when ``column`` is not given
FORMATS = {".txt": None, ".tsv": "sentence", ".csv": "sentence", ".jsonl": "text"}


class UnlabeledSource(BaseModel):
    """One file of unlabeled sentences. A bare string in the recipe is ``{path: <string>}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="a .txt (one sentence a line), .tsv/.csv (header row) or .jsonl file")
    column: str | None = Field(default=None, description="the TSV/CSV column or JSONL field holding the text "
                               "(default: sentence for TSV/CSV, text for JSONL; not for .txt)")
    max_sentences: int | None = Field(default=None, ge=1, description="a seeded random subset of this many "
                                      "sentences (after deduplication)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known_format(self):
        suffix = Path(self.path).suffix.lower()
        if suffix not in FORMATS:
            raise ValueError(f"unlabeled file {self.path!r}: unknown format {suffix or '(no suffix)'!r}; "
                             f"expected one of {', '.join(FORMATS)}")
        if suffix == ".txt" and self.column is not None:
            raise ValueError(f"unlabeled file {self.path!r}: a .txt file has one sentence a line, no column")
        return self

    def key(self) -> dict[str, Any]:
        """What a stage key keeps of the source: how it is read, not where it lies (its content
        is hashed separately, as the task's files are)."""
        return {"format": Path(self.path).suffix.lower(), "column": self.column, "max_sentences": self.max_sentences}


def resolve_path(source: UnlabeledSource, data_dir: str | Path | None) -> Path:
    """The file ``source`` names: as given when absolute, else in ``data_dir`` (or
    ``$STACKCOMP_DATA_DIR``) first, then under the working directory."""
    from stackcomp.data.glue import default_data_dir

    path = Path(source.path).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        root = data_dir or default_data_dir()
        candidates = ([Path(root).expanduser() / path] if root else []) + [Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"data.unlabeled: file {source.path!r} not found (looked in {looked})")


def read_sentences(source: UnlabeledSource, data_dir: str | Path | None = None, *, seed: int = 42) -> list[str]:
    """The source's non-empty sentences, deduplicated in file order (then the seeded
    ``max_sentences`` subset, file order kept)."""
    path = resolve_path(source, data_dir)
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            texts = path.read_text(encoding="utf-8").splitlines()
        elif suffix == ".jsonl":
            texts = _jsonl_column(path, source.column or FORMATS[suffix])
        else:
            texts = _table_column(path, source.column or FORMATS[suffix], "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as e:
        raise DataError(f"data.unlabeled: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"data.unlabeled: {path}: cannot read: {e}") from None
    texts = list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))
    if not texts:
        raise DataError(f"data.unlabeled: {path}: no sentences")
    keep = seeded_subset(len(texts), source.max_sentences, seed)
    return texts if keep is None else [texts[i] for i in keep]


def _table_column(path: Path, column: str, delimiter: str) -> list[str]:
    """One column of a TSV (GLUE layout: quoting off) or CSV (quoted fields) with a header row."""
    with path.open(encoding="utf-8", newline="") as f:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        at = _column_index(next(reader, None), column, path)
        return [row[at] for row in reader if len(row) > at]


def _column_index(header: list[str] | None, column: str, path: Path) -> int:
    if not header or column not in header:
        raise DataError(f"data.unlabeled: {path}: no column {column!r} in the header "
                        f"({', '.join(header or []) or 'empty file'}); set `column`")
    return header.index(column)


def _jsonl_column(path: Path, field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = _json_row(line, path, number)
            if not isinstance(row.get(field), str):
                raise DataError(f"data.unlabeled: {path}, line {number}: no text field {field!r}; set `column`")
            texts.append(row[field])
    return texts


def check_source(source: UnlabeledSource, data_dir: str | Path | None) -> Path:
    """The source's file, after checking what can be checked cheaply before a run: it exists,
    and a TSV/CSV header or the first JSONL row has the column (the rest is read when used)."""
    path = resolve_path(source, data_dir)
    suffix = path.suffix.lower()
    column = source.column or FORMATS[suffix]
    try:
        with path.open(encoding="utf-8", newline="") as f:
            if suffix in (".tsv", ".csv"):
                quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
                _column_index(next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",", quoting=quoting),
                                   None), column, path)
            elif suffix == ".jsonl":
                first = next((line for line in f if line.strip()), None)
                row = _json_row(first, path, 1) if first is not None else None
                if row is not None and not isinstance(row.get(column), str):
                    raise DataError(f"data.unlabeled: {path}, first row: no text field {column!r}; set `column`")
    except UnicodeDecodeError as e:
        raise DataError(f"data.unlabeled: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"data.unlabeled: {path}: cannot read: {e}") from None
    return path


def _json_row(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"data.unlabeled: {path}, line {number}: not JSON ({e.msg})") from None
    return row if isinstance(row, dict) else {}


def unlabeled_files(sources: list[UnlabeledSource], data_dir: str | Path | None) -> list[Path]:
    """The file of every source, in order, for lock.json and stage keys (an error for a missing one)."""
    return [resolve_path(s, data_dir) for s in sources]


def corpus(task_sentences: list[str], sources: list[UnlabeledSource], data_dir: str | Path | None,
           seed: int) -> list[str]:
    """The train split's sentences, then each source's, deduplicated in that order."""
    texts = list(task_sentences)
    for source in sources:
        texts.extend(read_sentences(source, data_dir, seed=seed))
    return list(dict.fromkeys(texts))


def tokenize_sentences(tokenizer: Any, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
    """One row of model inputs per sentence (truncated to ``max_length``; no padding), in
    chunks so a large corpus is not one giant tokenizer call."""
    wanted = {"input_ids", *getattr(tokenizer, "model_input_names", ())}
    rows: list[dict[str, list[int]]] = []
    for start in range(0, len(texts), 2000):
        enc = tokenizer(texts[start:start + 2000], truncation=True, max_length=max_length)
        keys = [k for k in enc if k in wanted]
        rows.extend({k: enc[k][i] for k in keys} for i in range(len(enc["input_ids"])))
    return rows


def lengths_of(rows: list[dict[str, Any]]) -> np.ndarray:
    """Token counts of tokenized rows (what length-grouped batching sorts by)."""
    return np.array([len(r["input_ids"]) for r in rows], dtype=np.int64)


__all__ = ["FORMATS", "UnlabeledSource", "check_source", "corpus", "lengths_of", "read_sentences", "resolve_path", "tokenize_sentences",
           "unlabeled_files"]
