"""GLUE tasks: what each one is, and reading a split from local GLUE TSVs or from the hub.

Label ids follow the hub's ``nyu-mll/glue`` order for every task, so a model trained on local
files and one trained on hub data mean the same thing by label 0. Columns follow the hub too:
the task's text fields, ``label`` (int, or float for STS-B) and ``idx`` (the row's position).

Local files use the standard GLUE download layout, ``<data_dir>/glue/<TASK>/<split>.tsv``:
tab separated, quoting off (sentences contain quote characters), a header row except CoLA's
train and dev files. Splits are named ``train``, ``dev``, ``test`` (MNLI: ``dev_matched``,
``dev_mismatched``, ``test_matched``, ``test_mismatched``); the hub's ``validation*`` names
are accepted too.
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stackcomp.errors import DataError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("stackcomp.data")

DATA_DIR_ENV = "STACKCOMP_DATA_DIR"
HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its names, columns, labels (hub order) and metrics.

    ``main_metric`` is what model selection and reports rank by. Tasks the GLUE benchmark scores
    with two numbers (MRPC and QQP: F1 and accuracy; STS-B: Pearson and Spearman) rank by
    ``combined_score``, their mean, which is how the GLUE leaderboard scores them.
    """

    name: str  # canonical, e.g. "glue/sst2"
    glue_dir: str  # folder in the GLUE download layout, e.g. "SST-2"
    hub: tuple[str, str]  # (dataset id, config) for datasets.load_dataset
    text_fields: tuple[str, ...]  # hub column names, one or two
    num_labels: int  # 1 for regression
    label_names: tuple[str, ...]  # index = label id, hub order; () for regression
    is_regression: bool
    metrics: tuple[str, ...]  # keys compute_metrics returns
    main_metric: str
    dev_splits: tuple[str, ...] = ("dev",)  # the first is the default evaluation split
    test_splits: tuple[str, ...] = ("test",)

    @property
    def dev_split(self) -> str:
        """The split evaluation uses unless told otherwise."""
        return self.dev_splits[0]

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits, *self.test_splits)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    def hub_split(self, split: str) -> str:
        """The hub's name for one of our split names (``dev*`` is ``validation*`` there)."""
        return split.replace("dev", "validation", 1) if split.startswith("dev") else split


_PAIR_F1 = ("accuracy", "f1", "combined_score")
_ACC = ("accuracy",)


def _spec(name, glue_dir, config, fields, labels, metrics, main, **kw) -> TaskSpec:
    regression = not labels
    return TaskSpec(name=f"glue/{name}", glue_dir=glue_dir, hub=(HUB_ID, config), text_fields=fields,
                    num_labels=1 if regression else len(labels), label_names=labels,
                    is_regression=regression, metrics=metrics, main_metric=main, **kw)


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    _spec("cola", "CoLA", "cola", ("sentence",), ("unacceptable", "acceptable"),
          ("matthews_correlation", "accuracy"), "matthews_correlation"),
    _spec("sst2", "SST-2", "sst2", ("sentence",), ("negative", "positive"), _ACC, "accuracy"),
    _spec("mrpc", "MRPC", "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
          _PAIR_F1, "combined_score"),
    _spec("stsb", "STS-B", "stsb", ("sentence1", "sentence2"), (),
          ("pearson", "spearmanr", "combined_score"), "combined_score"),
    _spec("qqp", "QQP", "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
          _PAIR_F1, "combined_score"),
    _spec("mnli", "MNLI", "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          _ACC, "accuracy", dev_splits=("dev_matched", "dev_mismatched"),
          test_splits=("test_matched", "test_mismatched")),
    _spec("qnli", "QNLI", "qnli", ("question", "sentence"), ("entailment", "not_entailment"), _ACC, "accuracy"),
    _spec("rte", "RTE", "rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), _ACC, "accuracy"),
    _spec("wnli", "WNLI", "wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), _ACC, "accuracy"),
)}


def _norm(name: str) -> str:
    key = name.strip().lower()
    for prefix in ("glue/", "glue:", "nyu-mll/glue/"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("-", "").replace("_", "").replace(" ", "")


_ALIASES: dict[str, str] = {}
for _s in TASKS.values():
    _ALIASES[_norm(_s.name)] = _s.name
    _ALIASES[_norm(_s.glue_dir)] = _s.name
_ALIASES["mnlimatched"] = "glue/mnli"


def list_tasks() -> list[str]:
    """Canonical names of the known tasks, e.g. ``["glue/cola", "glue/sst2", ...]``."""
    return list(TASKS)


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The task called ``name``: "glue/sst2", "sst2", "SST-2", "glue/sst-2" (any case) all work."""
    if isinstance(name, TaskSpec):
        return name
    if not isinstance(name, str):
        raise DataError(f"task must be a name like 'glue/sst2', got {type(name).__name__}")
    canonical = _ALIASES.get(_norm(name))
    if canonical is None:
        close = difflib.get_close_matches(_norm(name), list(_ALIASES), n=1, cutoff=0.6)
        hint = f"did you mean {_ALIASES[close[0]]!r}? " if close else ""
        raise DataError(f"unknown task {name!r}; {hint}known tasks: {', '.join(TASKS)} "
                        "(GLUE folder names like 'SST-2' work too)")
    return TASKS[canonical]


def resolve_split(task: str | TaskSpec, split: str) -> str:
    """Our canonical split name for ``split`` ("validation" -> "dev"; MNLI "dev" -> "dev_matched")."""
    spec = get_task(task)
    key = str(split).strip().lower().replace("-", "_")
    key = {"validation": "dev", "eval": "dev", "valid": "dev"}.get(key, key)
    if key.startswith("validation"):
        key = "dev" + key[len("validation"):]
    if key == "dev":
        key = spec.dev_split
    elif key == "test":
        key = spec.test_splits[0]
    if key not in spec.splits:
        raise DataError(f"{spec.name} has no split {split!r}; its splits are {', '.join(spec.splits)}")
    return key


# ---------------------------------------------------------------------------------- local files


@dataclass(frozen=True)
class _Layout:
    """Where a task's fields sit in its GLUE TSVs."""

    text: tuple[str, ...]  # local column names, in the order of TaskSpec.text_fields
    label: str
    headerless: tuple[str, ...] = ()  # column names of files that have no header row
    headerless_splits: frozenset[str] = frozenset()


_LAYOUTS: dict[str, _Layout] = {
    "glue/cola": _Layout(("sentence",), "label", ("source", "label", "original_mark", "sentence"),
                         frozenset({"train", "dev"})),
    "glue/sst2": _Layout(("sentence",), "label"),
    "glue/mrpc": _Layout(("#1 String", "#2 String"), "Quality"),
    "glue/stsb": _Layout(("sentence1", "sentence2"), "score"),
    "glue/qqp": _Layout(("question1", "question2"), "is_duplicate"),
    "glue/mnli": _Layout(("sentence1", "sentence2"), "gold_label"),
    "glue/qnli": _Layout(("question", "sentence"), "label"),
    "glue/rte": _Layout(("sentence1", "sentence2"), "label"),
    "glue/wnli": _Layout(("sentence1", "sentence2"), "label"),
}


def default_data_dir() -> str | None:
    """``$STACKCOMP_DATA_DIR`` if set and not empty."""
    return os.environ.get(DATA_DIR_ENV) or None


def local_path(task: str | TaskSpec, split: str, data_dir: str | os.PathLike) -> Path:
    """``<data_dir>/glue/<TASK>/<split>.tsv``; a data_dir that is itself the ``glue`` folder works too."""
    spec = get_task(task)
    root = Path(data_dir).expanduser()
    folder = root / "glue" / spec.glue_dir
    if not folder.is_dir() and (root / spec.glue_dir).is_dir():
        folder = root / spec.glue_dir
    return folder / f"{resolve_split(spec, split)}.tsv"


def _features(spec: TaskSpec) -> datasets.Features:
    import datasets

    label = datasets.Value("float32") if spec.is_regression else datasets.ClassLabel(names=list(spec.label_names))
    return datasets.Features({**{f: datasets.Value("string") for f in spec.text_fields},
                              "label": label, "idx": datasets.Value("int32")})


def _parse_label(spec: TaskSpec, value: str) -> int | float | None:
    """The label id (hub order) for a TSV cell, or None when the cell is not a label of this task."""
    value = value.strip()
    if spec.is_regression:
        try:
            return float(value)
        except ValueError:
            return None
    if value in spec.label_names:
        return spec.label_names.index(value)
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 <= number < spec.num_labels else None


def read_tsv(task: str | TaskSpec, split: str, path: str | os.PathLike) -> datasets.Dataset:
    """Parse one GLUE TSV into hub-shaped columns; malformed rows are skipped and counted.

    A row is malformed when its field count differs from the header's or its label is not one
    of the task's. Up to 1% of rows (at least one) are skipped with a warning; more is an error,
    since the file is then probably not the layout this task expects. Test files without a label
    column get label -1, as on the hub.
    """
    import datasets

    spec = get_task(task)
    split = resolve_split(spec, split)
    layout = _LAYOUTS[spec.name]
    path = Path(path)
    texts: list[list[str]] = [[] for _ in spec.text_fields]
    labels: list[int | float] = []
    idx: list[int] = []
    bad: list[tuple[int, str]] = []
    rows = 0
    try:
        # utf-8-sig: some GLUE files (MRPC) start with a byte-order mark before the header.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if split in layout.headerless_splits:
                columns = list(layout.headerless)
            else:
                columns = [c.strip() for c in next(reader, [])]
            missing = [c for c in layout.text if c not in columns]
            if missing:
                raise DataError(f"{path}: expected columns {list(layout.text)} for {spec.name} {split} "
                                f"(standard GLUE layout), the header has {columns}; missing {missing}")
            text_at = [columns.index(c) for c in layout.text]
            label_at = columns.index(layout.label) if layout.label in columns else None
            if label_at is None and not split.startswith("test"):
                raise DataError(f"{path}: no label column {layout.label!r} for {spec.name} {split}; "
                                f"the header has {columns}")
            width = len(columns)
            for row in reader:
                if not row:
                    continue  # blank line, e.g. at the end of the file
                position = rows
                rows += 1
                if len(row) != width:
                    bad.append((reader.line_num, f"{len(row)} fields, expected {width}"))
                    continue
                label = -1 if label_at is None else _parse_label(spec, row[label_at])
                if label is None:
                    bad.append((reader.line_num, f"label {row[label_at]!r} is not one of {spec.label_names}"))
                    continue
                for column, at in zip(texts, text_at):
                    column.append(row[at])
                labels.append(label)
                idx.append(position)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as a GLUE TSV: {e}") from None
    if bad:
        line, why = bad[0]
        summary = f"{path}: skipped {len(bad)} malformed of {rows} rows (first at line {line}: {why})"
        if len(bad) > max(1, rows // 100):
            raise DataError(summary + f"; more than 1% is too many: is this the {spec.glue_dir} {split} file "
                            "in the standard GLUE layout (tab separated, no quoting)?")
        log.warning(summary)
    if not labels:
        raise DataError(f"{path}: no rows for {spec.name} {split}")
    data = {field: column for field, column in zip(spec.text_fields, texts)}
    return datasets.Dataset.from_dict({**data, "label": labels, "idx": idx}, features=_features(spec))


# ---------------------------------------------------------------------------------- the hub


def _load_hub(spec: TaskSpec, split: str, local_note: str) -> datasets.Dataset:
    import datasets

    hub_id, config = spec.hub
    hub_split = spec.hub_split(split)
    try:
        ds = datasets.load_dataset(hub_id, config, split=hub_split)
    except Exception as e:  # offline, not cached, network: all end the same way for the user
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(_hub_failure_message(spec, split, f"{type(e).__name__}: {cause[:300]}", local_note)) from None
    label = ds.features.get("label")
    if isinstance(label, datasets.ClassLabel) and tuple(label.names) != spec.label_names:
        raise DataError(f"{hub_id}/{config}: hub label names {label.names} differ from {spec.label_names}; "
                        "stackcomp's task table needs an update")
    return ds.select_columns([*spec.text_fields, "label", "idx"])


def _hub_failure_message(spec: TaskSpec, split: str, why: str, local_note: str) -> str:
    hub_id, config = spec.hub
    return (f"{spec.name} {split}: could not load {hub_id} (config {config!r}, split {spec.hub_split(split)!r}) "
            f"from the hub: {why}. {local_note} To use local files, set {DATA_DIR_ENV} (or data.data_dir in the "
            f"recipe) to a folder holding glue/{spec.glue_dir}/{split}.tsv in the standard GLUE layout.")


def load_split(task: str | TaskSpec, split: str = "train",
               data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """One split as a Dataset with the task's text columns, ``label`` and ``idx``.

    Local files when ``data_dir`` (else ``$STACKCOMP_DATA_DIR``) is set, the hub otherwise.
    With a data dir set, a missing file is an error rather than a silent trip to the hub.
    """
    spec = get_task(task)
    split = resolve_split(spec, split)
    origin = "the data_dir argument (data.data_dir in a recipe)" if data_dir is not None else DATA_DIR_ENV
    data_dir = data_dir if data_dir is not None else default_data_dir()
    if data_dir is None:
        return _load_hub(spec, split, f"No local files: {DATA_DIR_ENV} is unset.")
    path = local_path(spec, split, data_dir)
    if not path.is_file():
        raise DataError(_missing_file_message(spec, split, path, data_dir, origin))
    return read_tsv(spec, split, path)


def _missing_file_message(spec: TaskSpec, split: str, path: Path, data_dir: str | os.PathLike, origin: str) -> str:
    present = sorted(p.name for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
    found = f" ({path.parent} holds {', '.join(present)})" if present else ""
    return (f"{spec.name} {split}: no file at {path}{found}; the data dir {data_dir} comes from {origin}. "
            f"Put the GLUE files there as glue/{spec.glue_dir}/{split}.tsv (standard GLUE layout), point "
            f"{DATA_DIR_ENV} at a folder that holds them, or unset {DATA_DIR_ENV} (and data.data_dir) "
            f"to load {spec.hub[0]} ({spec.hub[1]}) from the hub.")


def check_splits_available(task: str | TaskSpec, splits: tuple[str, ...] | list[str],
                           data_dir: str | os.PathLike | None = None) -> None:
    """Raise the DataError :func:`load_split` would raise for a missing split, without reading
    anything: a local file that is not there, or (offline) a hub dataset not in the local cache.
    Online, the hub is assumed reachable."""
    spec = get_task(task)
    origin = "the data_dir argument (data.data_dir in a recipe)" if data_dir is not None else DATA_DIR_ENV
    data_dir = data_dir if data_dir is not None else default_data_dir()
    for split in splits:
        split = resolve_split(spec, split)
        if data_dir is not None:
            path = local_path(spec, split, data_dir)
            if not path.is_file():
                raise DataError(_missing_file_message(spec, split, path, data_dir, origin))
        elif _offline() and not _hub_dataset_cached(spec):
            raise DataError(_hub_failure_message(spec, split, "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and "
                                                 "not in the local cache", f"No local files: {DATA_DIR_ENV} is unset."))


def _offline() -> bool:
    on = {"1", "ON", "YES", "TRUE"}
    return any(os.environ.get(v, "").strip().upper() in on for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_dataset_revision(repo_id: str) -> str | None:
    """The commit of a hub dataset in the local Hugging Face cache (what an offline load reads), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "README.md", repo_type="dataset")
    except Exception:  # no huggingface_hub, or an id it refuses
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def _hub_dataset_cached(spec: TaskSpec) -> bool:
    """Whether an offline ``load_dataset`` can find the task: the hub cache or the datasets cache holds it."""
    if hub_dataset_revision(spec.hub[0]) is not None:
        return True
    try:
        from datasets import config
    except ImportError:
        return False
    return (Path(config.HF_DATASETS_CACHE) / spec.hub[0].replace("/", "___") / spec.hub[1]).is_dir()
