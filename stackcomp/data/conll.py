"""Token-classification data: CoNLL column files, JSON lines, or the hub, as word lists and tags.

A split is a ``datasets.Dataset`` with ``tokens`` (the words of a sentence) and ``ner_tags``
(one label id per word, ids into the task's label list). Three sources give the same shape:

- CoNLL column files (``train.txt``, ``dev.txt``, ``test.txt``): one word a line, columns
  separated by whitespace, the tag in the last column (``word POS tag`` as shipped, or the
  original ``word POS chunk tag``); a blank line ends a sentence; ``-DOCSTART-`` lines (the
  original distribution's document breaks) are skipped.
- JSON lines (``train.jsonl``...): one sentence an object, ``{"tokens": [...], "ner_tags": [...]}``
  (``tags`` also works), tags as strings (``"B-PER"``).
- the hub (``eriktks/conll2003``), whose ``ner_tags`` are ClassLabel ids, mapped by name.

CoNLL-2003 has a fixed label list, the hub's order, so local files and the hub agree on ids;
a user's own folder gets the tags its train split uses, sorted, ``O`` first.
Malformed lines are a :class:`~stackcomp.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stackcomp.errors import DataError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("stackcomp.data")

#: CoNLL-2003's tags in the order of the hub's ``ner_tags`` ClassLabel (eriktks/conll2003)
CONLL2003_LABELS: tuple[str, ...] = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
CONLL2003_HUB = "eriktks/conll2003"

SPLITS = ("train", "dev", "test")
#: file stems a split may have in a folder, first found wins
_STEMS = {"train": ("train",), "dev": ("dev", "validation", "valid"), "test": ("test",)}
_SUFFIXES = (".txt", ".conll", ".jsonl", ".json")
#: IOB2 (and IOB1, IOBES) tags: O, or a prefix and an entity type
_TAG = re.compile(r"^(O|[BIES]-\S+)$")
_DOCSTART = "-DOCSTART-"


@dataclass
class Sentences:
    """Words and string tags of one split, and where they came from (each sentence's first line)."""

    tokens: list[list[str]]
    tags: list[list[str]]
    path: Path
    lines: list[int]

    def __len__(self) -> int:
        return len(self.tokens)


def resolve_split(split: str) -> str:
    """``train``, ``dev`` or ``test`` for ``split`` (``validation``, ``valid``, ``eval`` mean dev)."""
    key = str(split).strip().lower()
    key = {"validation": "dev", "valid": "dev", "eval": "dev"}.get(key, key)
    if key not in SPLITS:
        raise DataError(f"token-classification data has no split {split!r}; its splits are {', '.join(SPLITS)}")
    return key


def split_file(folder: str | os.PathLike, split: str) -> Path:
    """The file holding ``split`` in ``folder`` (``dev.txt``, ``validation.jsonl``...): the first
    that exists, else ``<split>.txt`` (which then reads as missing)."""
    split, folder = resolve_split(split), Path(folder).expanduser()
    for stem in _STEMS[split]:
        for suffix in _SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return folder / f"{split}.txt"


def _check_tag(tag: str, path: Path, line: int) -> str:
    if not _TAG.match(tag):
        raise DataError(f"{path}:{line}: tag {tag!r} is not an IOB tag (O, B-TYPE or I-TYPE)")
    return tag


def read_conll(path: str | os.PathLike) -> Sentences:
    """Sentences of a CoNLL column file: the first column is the word, the last the tag."""
    path = Path(path)
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    lines: list[int] = []
    words: list[str] = []
    labels: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    if words:
                        tokens.append(words)
                        tags.append(labels)
                        words, labels = [], []
                    continue
                if parts[0] == _DOCSTART:
                    continue
                if not words:
                    lines.append(number)
                if len(parts) < 2:
                    raise DataError(f"{path}:{number}: expected a word and its tag separated by spaces "
                                    f"('word POS tag'), got {line.rstrip()!r}")
                words.append(parts[0])
                labels.append(_check_tag(parts[-1], path, number))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if words:
        tokens.append(words)
        tags.append(labels)
    return Sentences(tokens, tags, path, lines)


def read_jsonl(path: str | os.PathLike, id_names: tuple[str, ...] | None = None) -> Sentences:
    """Sentences of a JSON-lines file, ``{"tokens": [...], "ner_tags": [...]}`` a line.

    Tags are strings; integer tags are read through ``id_names`` (a label list whose order
    the file follows, e.g. CoNLL-2003's hub order) and refused without one.
    """
    path = Path(path)
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    lines: list[int] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected an object with 'tokens' and 'ner_tags', got {type(row).__name__}")
                words = row.get("tokens")
                labels = row.get("ner_tags", row.get("tags"))
                if words is None or labels is None:
                    raise DataError(f"{where}: expected keys 'tokens' and 'ner_tags' (or 'tags'), got {sorted(row)}")
                if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                    raise DataError(f"{where}: 'tokens' must be a list of strings")
                if not isinstance(labels, list) or len(labels) != len(words):
                    raise DataError(f"{where}: {len(words)} tokens but "
                                    f"{len(labels) if isinstance(labels, list) else 'no list of'} tags")
                if not words:
                    continue
                tags.append([_json_tag(t, id_names, where) for t in labels])
                tokens.append(words)
                lines.append(number)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    return Sentences(tokens, tags, path, lines)


def _json_tag(tag: object, id_names: tuple[str, ...] | None, where: str) -> str:
    if isinstance(tag, str):
        if not _TAG.match(tag):
            raise DataError(f"{where}: tag {tag!r} is not an IOB tag (O, B-TYPE or I-TYPE)")
        return tag
    if isinstance(tag, int) and not isinstance(tag, bool):
        if id_names is None:
            raise DataError(f"{where}: tag {tag} is a number; give tags as strings ('B-PER'), since a folder of "
                            "your own data has no label list to read numbers through")
        if not 0 <= tag < len(id_names):
            raise DataError(f"{where}: tag id {tag} is outside the label list {list(id_names)}")
        return id_names[tag]
    raise DataError(f"{where}: tag {tag!r} is neither a tag string nor a label id")


def read_split_file(path: str | os.PathLike, id_names: tuple[str, ...] | None = None) -> Sentences:
    """A split file in either format, by its suffix (``.jsonl``/``.json``: JSON lines)."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return read_jsonl(path, id_names)
    return read_conll(path)


def label_list(sentences: Sentences) -> tuple[str, ...]:
    """The tags ``sentences`` use, sorted, ``O`` first: the label order of a user's own data."""
    seen = {t for row in sentences.tags for t in row}
    return ("O", *sorted(seen - {"O"}))


def to_dataset(sentences: Sentences, labels: tuple[str, ...]) -> datasets.Dataset:
    """``tokens`` and ``ner_tags`` (ids into ``labels``); a tag outside ``labels`` names its file and line."""
    import datasets

    index = {name: i for i, name in enumerate(labels)}
    ids: list[list[int]] = []
    for n, row in enumerate(sentences.tags):
        unknown = [i for i, t in enumerate(row) if t not in index]
        if unknown:
            at, where = unknown[0], sentences.lines[n]
            line = where + at if sentences.path.suffix.lower() not in (".jsonl", ".json") else where
            raise DataError(f"{sentences.path}:{line}: tag {row[at]!r} (word {sentences.tokens[n][at]!r}) is not one "
                            f"of the labels {list(labels)}")
        ids.append([index[t] for t in row])
    if not ids:
        raise DataError(f"{sentences.path}: no sentences")
    from stackcomp.data.loaders import _quiet_datasets

    with _quiet_datasets():  # from_dict with ClassLabel features checks every id in Python: cast in Arrow instead
        return datasets.Dataset.from_dict({"tokens": sentences.tokens, "ner_tags": ids}).cast(features(labels))


def features(labels: tuple[str, ...]) -> datasets.Features:
    """The columns of a split: words, and tag ids named by ``labels``."""
    import datasets

    return datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                              "ner_tags": datasets.Sequence(datasets.ClassLabel(names=list(labels)))})


def load_hub_split(hub_id: str, split: str, labels: tuple[str, ...]) -> datasets.Dataset:
    """``split`` of a hub token-classification dataset, its ``ner_tags`` mapped to ``labels`` by name."""
    import datasets

    split = resolve_split(split)
    hub_split = {"dev": "validation"}.get(split, split)
    try:
        ds = datasets.load_dataset(hub_id, split=hub_split)
    except Exception as e:  # offline, not cached, network: all end the same way for the user
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"could not load {hub_id} (split {hub_split!r}) from the hub: {type(e).__name__}: "
                        f"{cause[:300]}. To use local files, set STACKCOMP_DATA_DIR (or data.data_dir in the recipe) "
                        f"to a folder holding conll2003/{split}.txt (CoNLL columns, tag last)") from None
    feature = ds.features.get("ner_tags")
    names = getattr(getattr(feature, "feature", None), "names", None)
    if names is None:
        raise DataError(f"{hub_id}: expected a 'ner_tags' column of ClassLabel ids, got {feature}")
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise DataError(f"{hub_id}: hub tags {unknown} are not among the labels {list(labels)}")
    to_ours = [labels.index(n) for n in names]
    ds = ds.select_columns(["tokens", "ner_tags"])
    if to_ours == list(range(len(names))) and len(names) == len(labels):
        return ds
    return ds.map(lambda b: {"ner_tags": [[to_ours[t] for t in row] for row in b["ner_tags"]]}, batched=True,
                  features=features(labels))
