"""The ``ner`` kind: CoNLL and JSON-lines reading, first-subword label alignment, the seqeval
entity metric against seqeval itself and by hand, distillation rows, and runs through the engine."""

from __future__ import annotations

import json
import textwrap
import types
from pathlib import Path

import pytest
import torch

from stackcomp.data import conll
from stackcomp.errors import DataError, NumericalError
from stackcomp.tasks import get_task
from stackcomp.tasks.ner import IGNORE, NerTask, align_labels, ner_metrics, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = conll.CONLL2003_LABELS

#: sentences in CoNLL-2003's shipped layout (word POS tag); tags are IOB2
SENTENCES = [
    [("EU", "NNP", "B-ORG"), ("rejects", "VBZ", "O"), ("German", "JJ", "B-MISC"), ("call", "NN", "O"),
     ("to", "TO", "O"), ("boycott", "VB", "O"), ("British", "JJ", "B-MISC"), ("lamb", "NN", "O"), (".", ".", "O")],
    [("Peter", "NNP", "B-PER"), ("Blackburn", "NNP", "I-PER")],
    [("BRUSSELS", "NNP", "B-LOC"), ("1996-08-22", "CD", "O")],
    [("The", "DT", "O"), ("European", "NNP", "B-ORG"), ("Commission", "NNP", "I-ORG"), ("said", "VBD", "O"),
     ("on", "IN", "O"), ("Thursday", "NNP", "O"), ("it", "PRP", "O"), ("disagreed", "VBD", "O"), (".", ".", "O")],
    [("Germany", "NNP", "B-LOC"), ("'s", "POS", "O"), ("representative", "NN", "O"), ("Werner", "NNP", "B-PER"),
     ("Zwingmann", "NNP", "I-PER"), ("said", "VBD", "O"), (".", ".", "O")],
    [("Rustu", "NNP", "B-PER"), ("Recber", "NNP", "I-PER"), ("plays", "VBZ", "O"), ("in", "IN", "O"),
     ("Istanbul", "NNP", "B-LOC"), ("for", "IN", "O"), ("the", "DT", "O"), ("World", "NNP", "B-MISC"),
     ("Cup", "NNP", "I-MISC")],
]


def conll_text(sentences, *, docstart: bool = False, chunk: bool = False) -> str:
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for sentence in sentences:
        for word, pos, tag in sentence:
            lines.append(f"{word} {pos} I-NP {tag}" if chunk else f"{word} {pos} {tag}")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_conll(folder, train_copies: int = 4):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(conll_text(SENTENCES * train_copies))
    (folder / "dev.txt").write_text(conll_text(SENTENCES))
    return folder


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_tokenizer_dir)


@pytest.fixture
def ner_data_dir(tmp_path, monkeypatch):
    write_conll(tmp_path / "data" / "conll2003")
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _tiny_encoder(minilm_tokenizer_dir, folder, seed: int = 0, layers: int = 2):
    """A tiny BERT encoder without a head (as MiniLM ships) and the MiniLM tokenizer, in ``folder``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_tokenizer_dir).save_pretrained(folder)
    return folder


def _tiny_tagger(minilm_tokenizer_dir, tmp_path, seed: int = 0, layers: int = 2):
    folder = _tiny_encoder(minilm_tokenizer_dir, tmp_path / f"enc-{seed}-{layers}", seed, layers)
    torch.manual_seed(seed)
    return get_task("ner/conll2003").load_model(str(folder)).eval()


# ----------------------------------------------------------------------------- reading files


def test_conll_columns_docstart_and_the_tag_in_the_last_column(tmp_path):
    shipped, original = tmp_path / "a.txt", tmp_path / "b.txt"
    shipped.write_text(conll_text(SENTENCES[:2]))
    original.write_text(conll_text(SENTENCES[:2], docstart=True, chunk=True))
    for path in (shipped, original):
        s = conll.read_conll(path)
        assert s.tokens == [[w for w, _, _ in sent] for sent in SENTENCES[:2]]
        assert s.tags == [[t for _, _, t in sent] for sent in SENTENCES[:2]]
    assert conll.read_conll(shipped).lines == [1, 11]


@pytest.mark.parametrize("content, line, words", [
    ("EU NNP B-ORG\nrejects\n", 2, "expected a word and its tag"),
    ("EU NNP B-ORG\n\nGerman JJ MISC\n", 3, "not an IOB tag"),
    ("EU NNP B-ORG\nrejects VBZ o\n", 2, "not an IOB tag"),
])
def test_malformed_conll_lines_name_file_and_line(tmp_path, content, line, words):
    path = tmp_path / "train.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=words) as e:
        conll.read_conll(path)
    assert f"{path}:{line}:" in str(e.value)


@pytest.mark.parametrize("row, words", [
    ('{"tokens": ["a", "b"], "ner_tags": ["O"]}', "2 tokens but 1 tags"),
    ('{"words": ["a"], "ner_tags": ["O"]}', "expected keys 'tokens' and 'ner_tags'"),
    ('{"tokens": ["a"], "ner_tags": [1]}', "is a number; give tags as strings"),
    ('{"tokens": ["a"], "tags": ["PER"]}', "not an IOB tag"),
    ('["a", "O"]', "expected an object"),
    ('{"tokens": ["a"], "ner_tags": ["O"]', "not a JSON object"),
])
def test_malformed_json_lines_name_file_and_line(tmp_path, row, words):
    path = tmp_path / "train.jsonl"
    path.write_text('{"tokens": ["Paris"], "ner_tags": ["B-LOC"]}\n\n' + row + "\n")
    with pytest.raises(DataError, match=words) as e:
        conll.read_jsonl(path)
    assert f"{path}:3:" in str(e.value)


def test_conll2003_has_the_hub_label_order_and_a_folder_its_own_sorted_labels(tmp_path):
    assert get_task("ner/conll2003").label_names == (
        "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
    folder = tmp_path / "animals"
    folder.mkdir()
    rows = [{"tokens": ["the", "red", "fox"], "tags": ["O", "B-ANIMAL", "I-ANIMAL"]},
            {"tokens": ["Bonn"], "tags": ["B-CITY"]}]
    (folder / "train.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    (folder / "dev.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(
        {"tokens": ["a", "cat"], "tags": ["O", "B-PET"]}) + "\n")
    task = get_task(f"ner/{folder}")
    assert isinstance(task, NerTask) and task.name == f"ner/{folder}" and task.short_name == "animals"
    assert task.label_names == ("O", "B-ANIMAL", "B-CITY", "I-ANIMAL")
    kwargs = task.model_kwargs()
    assert kwargs["num_labels"] == 4 and kwargs["id2label"][2] == "B-CITY" and kwargs["label2id"]["I-ANIMAL"] == 3
    train = task.load_split("train", None)
    assert train["ner_tags"] == [[0, 1, 3], [2]]
    with pytest.raises(DataError, match=r"dev\.jsonl:2: tag 'B-PET' \(word 'cat'\) is not one of the labels"):
        task.load_split("dev", None)


def test_conll2003_folder_accepts_json_lines_with_hub_ids(tmp_path):
    folder = tmp_path / "conll2003"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"tokens": ["Peter", "Blackburn"], "ner_tags": [1, 2]}) + "\n")
    task = get_task("ner/conll2003")
    assert task.data_files(["train"], tmp_path) == {"train": folder / "train.jsonl"}
    assert task.load_split("train", tmp_path)["ner_tags"] == [[1, 2]]
    assert task.load_split("train", folder)["tokens"] == [["Peter", "Blackburn"]]  # the folder itself works too


def test_task_names_files_and_errors(tmp_path, monkeypatch):
    assert get_task("ner/conll2003").name == get_task("ner/CoNLL-2003").name == "ner/conll2003"
    assert get_task("ner/conll2003").hub_source() == ("eriktks/conll2003", None)
    with pytest.raises(DataError, match="did you mean 'ner/conll2003'"):
        get_task("ner/conl2003")
    with pytest.raises(DataError, match="names no dataset"):
        get_task("ner/")
    with pytest.raises(DataError, match="no folder"):
        get_task(f"ner/{tmp_path / 'missing'}")
    task = get_task("ner/conll2003")
    assert task.data_files(["train", "validation"], tmp_path) == {
        "train": tmp_path / "conll2003" / "train.txt", "dev": tmp_path / "conll2003" / "dev.txt"}
    with pytest.raises(DataError, match=r"ner/conll2003 dev: no file at .*dev\.txt"):
        task.check_data(["dev"], tmp_path)
    with pytest.raises(DataError, match="has no split 'dev2'"):
        task.data_files(["dev2"], tmp_path)
    monkeypatch.delenv("STACKCOMP_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert task.data_files(["train"], None) is None
    with pytest.raises(DataError, match="offline .* eriktks/conll2003 is not in the local cache"):
        task.check_data(["train"], None)


# ----------------------------------------------------------------------------- alignment


def test_align_labels_puts_each_word_label_on_its_first_subword():
    assert align_labels([None, 0, 0, 1, 2, 2, 2, None], [3, 4, 0]) == [IGNORE, 3, IGNORE, 4, 0, IGNORE, IGNORE, IGNORE]


def test_planted_sentence_labels_sit_on_first_subwords(ner_data_dir, tokenizer):
    data = get_task("ner/conll2003").build_data(tokenizer, {"max_length": 64})
    rustu = data.dataset("dev")[5]  # Rustu Recber plays in Istanbul for the World Cup
    pieces = tokenizer.convert_ids_to_tokens(rustu["input_ids"])
    assert pieces[:6] == ["[CLS]", "rust", "##u", "rec", "##ber", "plays"] and pieces[-1] == "[SEP]"
    labeled = [(p, LABELS[t]) for p, t in zip(pieces, rustu["labels"]) if t != IGNORE]
    assert labeled == [("rust", "B-PER"), ("rec", "I-PER"), ("plays", "O"), ("in", "O"), ("istanbul", "B-LOC"),
                       ("for", "O"), ("the", "O"), ("world", "B-MISC"), ("cup", "I-MISC")]
    assert all(t == IGNORE for p, t in zip(pieces, rustu["labels"]) if p.startswith(("##", "[")))
    assert data.truncated["dev"] == {"sentences": 0, "words": 0}


def test_long_sentences_are_cut_and_counted(ner_data_dir, tokenizer):
    # max_length 6 leaves [CLS] + 4 subwords + [SEP]; a word whose first subword is in keeps its label.
    # Kept by hand: "eu rejects german call" 4 of 9 words; "peter blackburn" 2 of 2; "brussels 1996 -"
    # 2 of 2 (1996-08-22's first subword is in); "the european commission said" 4 of 9;
    # "germany ' s representative" 3 of 7 ('s is two subwords); "rust ##u rec ##ber" 2 of 9.
    data = get_task("ner/conll2003").build_data(tokenizer, {"max_length": 6})
    ds = data.dataset("dev")
    assert [sum(t != IGNORE for t in row) for row in ds["labels"]] == [4, 2, 2, 4, 3, 2]
    assert all(len(ids) <= 6 for ids in ds["input_ids"])
    assert data.truncated["dev"] == {"sentences": 4, "words": 5 + 5 + 4 + 7}


def test_byte_level_tokenizer_gets_a_prefix_space_and_a_slow_one_a_clear_error(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Peter Blackburn visited London and Peter saw Blackburn"] * 20, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    roberta = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, add_prefix_space=False)
    fixed = word_tokenizer(roberta)
    enc = fixed([["Peter", "Blackburn"]], is_split_into_words=True)
    pieces = fixed.convert_ids_to_tokens(enc["input_ids"][0])
    firsts = [pieces[i] for i, w in enumerate(enc.word_ids(0)) if w is not None and w != enc.word_ids(0)[i - 1]]
    assert firsts == ["ĠPeter", "ĠBlackburn"]  # as in running text, not the word-continuation pieces
    slow = types.SimpleNamespace(is_fast=False, pad_token="[PAD]", name_or_path="slow")
    with pytest.raises(DataError, match="not a fast"):
        get_task("ner/conll2003").build_data(slow, {})


# ----------------------------------------------------------------------------- the metric


def _encode(sequences: list[list[str]], width: int, fill: int = 7) -> torch.Tensor:
    """(N, width) ids: each tag, then a position the metric must skip (a second subword)."""
    out = torch.full((len(sequences), width), fill)
    for i, tags in enumerate(sequences):
        for j, tag in enumerate(tags):
            out[i, 2 * j] = LABELS.index(tag)
    return out


def _labels(sequences: list[list[str]], width: int) -> torch.Tensor:
    out = torch.full((len(sequences), width), IGNORE)
    for i, tags in enumerate(sequences):
        for j, tag in enumerate(tags):
            out[i, 2 * j] = LABELS.index(tag)
    return out


GOLD = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"],
        ["O", "B-MISC", "I-MISC", "O"],
        ["B-LOC", "B-LOC", "O"]]
PRED = [["B-PER", "O", "O", "B-LOC", "O", "O"],  # PER cut short, ORG missed
        ["O", "I-MISC", "I-MISC", "B-PER"],  # I- opening an entity (conlleval counts it), a spurious PER
        ["B-LOC", "I-LOC", "O"]]  # two LOCs merged into one


@pytest.mark.filterwarnings("ignore:Precision and F-score are ill-defined")  # seqeval's own calls: ORG is never predicted
def test_metric_is_seqevals_on_planted_sequences():
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    width = 14
    m = ner_metrics(_encode(PRED, width), _labels(GOLD, width), LABELS)
    assert m["f1"] == pytest.approx(f1_score(GOLD, PRED))
    assert m["precision"] == pytest.approx(precision_score(GOLD, PRED))
    assert m["recall"] == pytest.approx(recall_score(GOLD, PRED))
    assert m["accuracy"] == pytest.approx(accuracy_score(GOLD, PRED))
    micro = classification_report(GOLD, PRED, output_dict=True)["micro avg"]  # what evaluate's seqeval reports
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((micro["precision"], micro["recall"],
                                                                     micro["f1-score"]))
    # by hand: gold PER LOC ORG | MISC | LOC LOC = 6 entities; predicted PER(cut) LOC | MISC PER | LOC(merged)
    # = 5; right: LOC (sentence 1) and MISC = 2
    assert (m["precision"], m["recall"]) == pytest.approx((2 / 5, 2 / 6))
    assert m["accuracy"] == pytest.approx(8 / 13)  # tags right: 4 of 6, 2 of 4, 2 of 3
    logits = torch.nn.functional.one_hot(_encode(PRED, width, fill=0), len(LABELS)).float()
    assert ner_metrics(logits, _labels(GOLD, width), LABELS) == m


def test_all_correct_is_one_and_a_shifted_boundary_scores_as_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    labels = _labels(gold, 12)
    assert ner_metrics(_encode(gold, 12), labels, LABELS) == {"f1": 1.0, "precision": 1.0, "recall": 1.0,
                                                             "accuracy": 1.0}
    # the PER span shifted one word right (words 1-2 instead of 0-1): 2 of 3 predicted entities right,
    # 2 of 3 gold found
    shifted = [["O", "B-PER", "I-PER", "B-LOC", "O", "B-ORG"]]
    m = ner_metrics(_encode(shifted, 12), labels, LABELS)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert m["accuracy"] == pytest.approx(3 / 6)  # the first three tags are wrong
    # PER cut to one word and ORG dropped: P = 1/2, R = 1/3, F1 = 2PR/(P+R) = 0.4
    m = ner_metrics(_encode([["B-PER", "O", "O", "B-LOC", "O", "O"]], 12), labels, LABELS)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((0.5, 1 / 3, 0.4))


def test_metric_refuses_mismatched_or_diverged_predictions():
    labels = _labels(GOLD, 14)
    with pytest.raises(DataError, match="differ"):
        ner_metrics(_encode(PRED, 12), labels, LABELS)
    bad = torch.zeros(3, 14, len(LABELS))
    bad[0, 0, 0] = float("nan")
    with pytest.raises(NumericalError):
        ner_metrics(bad, labels, LABELS)
    with pytest.raises(DataError, match="no labeled words"):
        ner_metrics(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), IGNORE), LABELS)


def test_evaluation_reads_every_word_at_its_first_subword(ner_data_dir, tokenizer, minilm_tokenizer_dir, tmp_path):
    """The loop's evaluate (batches sorted by length, padded to each batch's width) gives what
    tagging each sentence alone and reading its first subwords gives."""
    from seqeval.metrics import f1_score

    from stackcomp.train import evaluate

    model = _tiny_tagger(minilm_tokenizer_dir, tmp_path)
    data = get_task("ner/conll2003").build_data(tokenizer, {"max_length": 64})
    metrics = evaluate(model, data.eval_loader(4), data.compute_metrics, predict=data.predict)
    gold, pred = [], []
    with torch.no_grad():
        for sentence in SENTENCES:
            enc = tokenizer([w for w, _, _ in sentence], is_split_into_words=True, return_tensors="pt")
            ids = model(**enc).logits[0].argmax(-1)
            words = enc.word_ids(0)
            firsts = [i for i, w in enumerate(words) if w is not None and (i == 0 or words[i - 1] != w)]
            pred.append([LABELS[int(ids[i])] for i in firsts])
            gold.append([t for _, _, t in sentence])
    assert metrics["f1"] == pytest.approx(f1_score(gold, pred, zero_division=0))
    assert set(metrics) >= {"f1", "precision", "recall", "accuracy", "eval_loss"}


# ----------------------------------------------------------------------------- batches and distillation


def test_batches_hold_model_inputs_and_labels(ner_data_dir, tokenizer, minilm_tokenizer_dir, tmp_path):
    data = get_task("ner/conll2003").build_data(tokenizer, {"max_length": 32, "max_train_samples": 10})
    assert len(data.dataset("train")) == 10
    batch = next(iter(data.train_loader(4)))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE).all())
    model = _tiny_tagger(minilm_tokenizer_dir, tmp_path)
    for b in data.calibration_batches(5, 2) + data.latency_batches(4, 2):
        assert "labels" not in b
        assert model(**b).logits.shape == (*b["input_ids"].shape, len(LABELS))
    assert [len(b["input_ids"]) for b in data.latency_batches(4, 2)] == [4, 2]
    with pytest.raises(DataError, match="augment"):
        data.train_loader(4, augment=object())


def test_kd_rows_are_the_same_words_for_student_and_teacher(ner_data_dir, tokenizer, minilm_tokenizer_dir, tmp_path):
    task = get_task("ner/conll2003")
    data = task.build_data(tokenizer, {"max_length": 32})
    batch = next(iter(data.train_loader(4, group_by_length=False)))
    student = _tiny_tagger(minilm_tokenizer_dir, tmp_path, seed=0, layers=1)
    teacher = _tiny_tagger(minilm_tokenizer_dir, tmp_path, seed=1)
    s, t = task.kd_outputs(student, batch), task.kd_outputs(teacher, batch)
    words = int((batch["labels"] != IGNORE).sum())
    assert s["logits"].shape == t["logits"].shape == (words, len(LABELS))
    assert torch.isfinite(s["loss"])
    full = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(s["logits"], full[batch["labels"] != IGNORE], atol=1e-6)
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    s2 = task.kd_outputs(student, unlabeled)
    assert s2["logits"].shape == (int(batch["attention_mask"].sum()), len(LABELS)) and s2["loss"] is None


@pytest.mark.parametrize("kind", ["distilbert", "roberta", "deberta-v2"])
def test_other_encoders_tag_and_distill_per_word(kind, ner_data_dir, tokenizer):
    """Encoders without token types (DistilBERT) or with their own positions read the same batches."""
    from transformers import AutoModelForTokenClassification

    from stackcomp.train import evaluate
    from tests.conftest import _tiny_config

    task = get_task("ner/conll2003")
    config = _tiny_config(kind)
    config.update(task.model_kwargs())
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config).eval()
    data = task.build_data(tokenizer, {"max_length": 32})
    metrics = evaluate(model, data.eval_loader(4), data.compute_metrics, predict=data.predict)
    assert 0.0 <= metrics["f1"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
    batch = next(iter(data.train_loader(4)))
    rows = task.kd_outputs(model, batch)["logits"]
    assert rows.shape == (int((batch["labels"] != IGNORE).sum()), len(LABELS))


# ----------------------------------------------------------------------------- through the engine


def test_finetune_compress_distill_and_evaluate_through_the_engine(ner_data_dir, minilm_tokenizer_dir, tmp_path):
    from stackcomp.engine import Engine
    from stackcomp.plan import build_plan
    from stackcomp.recipe import load_recipe

    model_dir = _tiny_encoder(minilm_tokenizer_dir, tmp_path / "encoder")
    recipe = tmp_path / "ner.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: tiny-ner
        model: {model_dir}
        task: ner/conll2003
        data: {{max_length: 32}}
        evaluate_leaves: false
        x-eval: &eval {{latency_batches: 1, latency_repeats: 1, latency_batch_size: 4}}
        stages:
          ft: {{pass: finetune, params: {{train: {{max_steps: 4, batch_size: 8, lr: 1.0e-3}}}}}}
          ft_eval: {{pass: evaluate, after: ft, params: *eval}}
          ds:
            pass: ds_factorize
            after: ft
            params: {{block: 16, atoms: 8, nnz: 2, iters: 1, stf: true, train: {{max_steps: 2, batch_size: 8}}}}
          q: {{pass: int8, after: ds, params: {{backend: torch}}}}
          packed: {{pass: pack, after: q, params: {{target: cpu}}}}
          packed_eval: {{pass: evaluate, after: packed, params: *eval}}
          kd1:
            pass: distill
            after: ft
            params: {{teacher: ft, student: {{cut: {{layers: [0]}}}}, max_steps: 3, batch_size: 8,
                      weights: {{soft: 0.5, hard: 0.5}}}}
          kd1_eval: {{pass: evaluate, after: kd1, params: *eval}}
    """))
    summary = Engine(build_plan(load_recipe(recipe)), tmp_path / "run").run()
    assert not summary["failed"] and not summary.get("skipped"), (summary["failed"], summary.get("skipped"))
    by_stage = {s["stage"]: s for s in summary["stages"]}
    for stage in ("ft_eval", "packed_eval", "kd1_eval"):
        m = by_stage[stage]["metrics"]
        assert m["main_metric"] == "f1" and 0.0 <= m["f1"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0, m
        assert m["latency_ms_per_batch"] > 0
    kd = json.loads((Path(summary["artifacts_dir"]) / by_stage["kd1"]["key"] / "report.json").read_text())["kd"]
    assert kd["teacher_calls"] == 3 and kd["kd_soft"] > 0 and kd["kd_hard"] > 0  # per-token soft targets
