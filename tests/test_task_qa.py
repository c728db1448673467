"""The ``qa`` kind: SQuAD reading and the article split, windows with answer positions, the
standard post-processing, the official EM/F1, distillation rows, and runs through the engine."""

from __future__ import annotations

import json
import textwrap
import types

import numpy as np
import pytest
import torch

from stackcomp.data import squad
from stackcomp.errors import DataError
from stackcomp.tasks import get_task
from stackcomp.tasks.qa import MASKED_LOGIT, QATask, answer_positions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FILLER = ("The river flows north past old mills and quiet farms. " * 12).strip()
LONG_CONTEXT = FILLER + " The secret code of the vault is zebra, said the keeper."


@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_tokenizer_dir)


def _qa(qid: str, question: str, context: str, answer: str, occurrence: int = 0) -> dict:
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return {"id": qid, "question": question, "answers": [{"text": answer, "answer_start": start}] * 2}


def _articles(n: int) -> list[dict]:
    """``n`` articles of two paragraphs, two questions each, every answer planted and known."""
    articles = []
    for a in range(n):
        paragraphs = []
        for p in range(2):
            city, year = f"Town{a}{p}", 1900 + 10 * a + p
            context = f"{city} was founded in {year} by farmers. Its river is called the Blue {a}{p} River."
            paragraphs.append({"context": context, "qas": [
                _qa(f"q{a}-{p}-0", f"When was {city} founded?", context, str(year)),
                _qa(f"q{a}-{p}-1", f"What is the river of {city} called?", context, f"Blue {a}{p} River"),
            ]})
        articles.append({"title": f"Article_{a}", "paragraphs": paragraphs})
    return articles


def write_squad(folder, n_articles: int = 5, train_articles: int | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": _articles(n_articles)}))
    if train_articles:
        (folder / "train-v1.1.json").write_text(json.dumps({"version": "1.1", "data": _articles(train_articles)}))
    return folder


# ----------------------------------------------------------------------------- the official score


def test_normalize_answer_is_the_official_one():
    assert squad.normalize_answer("The  Cat!") == "cat"
    assert squad.normalize_answer("  An apple, a PEAR and the plum.") == "apple pear and plum"
    assert squad.normalize_answer("theory") == "theory"  # articles only as whole words
    assert squad.normalize_answer("1,000") == "1000"


def test_exact_match_and_f1_cases_by_hand():
    assert squad.exact_match_score("the Denver Broncos", "Denver Broncos!")
    assert not squad.exact_match_score("Denver", "Denver Broncos")
    # pred {cat, sat}, gold {cat, sat, on, mat}: precision 1, recall 1/2 -> F1 2/3
    assert squad.f1_score("the cat sat", "a cat sat on the mat") == pytest.approx(2 / 3)
    # repeated tokens count as often as both sides have them: pred {a?} no; {x, x, y} vs {x, y, y}: 2 common
    assert squad.f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert squad.f1_score("", "cat") == 0.0 and squad.f1_score("dog", "cat") == 0.0
    examples = [{"id": "1", "answers": {"text": ["Denver Broncos", "the Broncos"]}},
                {"id": "2", "answers": {"text": ["in 1990"]}},
                {"id": "3", "answers": {"text": ["blue"]}}]
    scores = squad.squad_scores({"1": "Broncos", "2": "1990"}, examples)  # "3" unanswered scores 0
    # q1: best F1 over golds = F1("Broncos", "the Broncos") = 1 (EM too); q2: P 1, R 1/2 -> 2/3
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


# ----------------------------------------------------------------------------- reading and splitting


def test_article_split_keeps_articles_whole(tmp_path):
    rows = squad.read_squad_file(write_squad(tmp_path / "sq", n_articles=10) / "dev-v1.1.json")
    assert len(rows) == 40 and rows[0]["answers"]["text"][0] == "1900"
    train, dev, note = squad.split_by_article(rows)
    n_eval = round(10 * squad.EVAL_ARTICLE_FRACTION)
    assert {r["article"] for r in dev} == set(range(10 - n_eval, 10))
    assert not {r["title"] for r in train} & {r["title"] for r in dev}
    assert len(train) + len(dev) == len(rows) and "article split" in note


def test_json_lines_in_the_hub_layout(tmp_path):
    context = "Paris is the capital of France."
    lines = [{"id": f"{i}", "title": t, "context": context, "question": "Capital?",
              "answers": {"text": ["Paris"], "answer_start": [0]}} for i, t in enumerate(["A", "A", "B", "C"])]
    path = tmp_path / "dev.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = squad.read_squad_file(path)
    assert [r["article"] for r in rows] == [0, 0, 1, 2]


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON (line 1"),
    (json.dumps({"version": "1.1"}), "\"data\" list"),
    (json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "abc", "qas": [
        {"id": "1", "question": "q", "answers": [{"text": "zzz", "answer_start": 2}]}]}]}]}),
     "data[0].paragraphs[0].qas[0]: answer 'zzz' at 2 is not inside the context"),
])
def test_malformed_files_name_file_and_place(tmp_path, content, words):
    path = tmp_path / "dev-v1.1.json"
    path.write_text(content)
    with pytest.raises(DataError, match="dev-v1.1.json") as e:
        squad.read_squad_file(path)
    assert words in str(e.value)


def test_malformed_json_line_names_its_line(tmp_path):
    path = tmp_path / "dev.jsonl"
    ok = {"id": "1", "context": "abc", "question": "q", "answers": {"text": ["a"], "answer_start": [0]}}
    path.write_text(json.dumps(ok) + "\n" + json.dumps({"id": "2", "question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"dev.jsonl:2: expected an object with id, context"):
        squad.read_squad_file(path)


def test_task_names_files_and_errors(tmp_path):
    t = get_task("qa/squad")
    assert isinstance(t, QATask) and t.kind == "qa" and t.main_metric == "f1" and "exact_match" in t.metrics
    assert get_task("qa/rajpurkar/squad").name == "qa/squad" and t.hub_source()[0] == "rajpurkar/squad"
    with pytest.raises(DataError, match="known: qa/squad"):
        get_task("qa/squadd")
    root = tmp_path / "data"
    write_squad(root / "squad_v1.1")
    files = t.data_files(["train", "validation"], root)
    assert files == {"train": root / "squad_v1.1" / "dev-v1.1.json", "dev": root / "squad_v1.1" / "dev-v1.1.json"}
    assert "article split" in t.split_note(root)
    write_squad(root / "squad_v1.1", train_articles=3)
    assert t.data_files(["train"], root)["train"].name == "train-v1.1.json" and t.split_note(root) is None
    with pytest.raises(DataError, match="no dev file in .*empty.*expected one of dev-v1.1.json"):
        t.check_data(["dev"], tmp_path / "empty")
    folder_task = get_task(f"qa/{root / 'squad_v1.1'}")
    assert folder_task.folder == root / "squad_v1.1" and folder_task.data_files(["dev"], None)["dev"].is_file()


def test_hub_path_reads_rajpurkar_squad_rows(monkeypatch):
    """Without a data dir the rows come from ``datasets.load_dataset("rajpurkar/squad")`` (stubbed:
    no network here), titles numbered as articles; a failed load is one DataError."""
    import datasets

    monkeypatch.delenv("STACKCOMP_DATA_DIR", raising=False)
    context = "Paris is the capital of France."
    hub = datasets.Dataset.from_list([{"id": f"{i}", "title": t, "context": context, "question": "Capital?",
                                       "answers": {"text": ["Paris"], "answer_start": [0]}}
                                      for i, t in enumerate(["A", "B", "B"])])
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: asked.append((name, split)) or hub)
    task = get_task("qa/squad")
    assert task.data_files(["train", "dev"], None) is None
    splits, note = task.load_splits(None)
    assert note is None and asked == [("rajpurkar/squad", "train"), ("rajpurkar/squad", "validation")]
    assert [r["article"] for r in splits["dev"]] == [0, 1, 1]
    asked.clear()
    data = task.build_data(types.SimpleNamespace(is_fast=True, pad_token="[PAD]", model_max_length=512), {})
    assert len(data.examples("dev")) == 3 and data.split_note is None
    assert asked == [("rajpurkar/squad", "validation")]  # evaluating reads no train split

    def offline(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load rajpurkar/squad .*ConnectionError: offline"):
        task.load_splits(None)


# ----------------------------------------------------------------------------- windows and answers


def _decode(tokenizer, ids, start, end) -> str:
    return tokenizer.decode(ids[start:end + 1]).strip()


def test_train_windows_put_the_answer_on_its_tokens(tokenizer):
    context = "Marie Curie won the Nobel Prize in Physics in 1903 together with Pierre Curie."
    ex = {"id": "1", "question": "  Who won with Marie Curie?", "context": context,
          "answers": {"text": ["Pierre Curie"], "answer_start": [context.index("Pierre")]}}
    f = squad.build_features([ex], tokenizer, 64, train=True)
    assert len(f) == 1
    ids = f.inputs["input_ids"][0]
    assert _decode(tokenizer, ids, f.start_positions[0], f.end_positions[0]) == "pierre curie"
    assert ids[:2] == [tokenizer.cls_token_id, tokenizer.convert_tokens_to_ids("who")]  # question first, stripped


def test_long_context_answer_lands_in_a_later_window(tokenizer):
    ex = {"id": "z", "question": "What is the code?", "context": LONG_CONTEXT,
          "answers": {"text": ["zebra"], "answer_start": [LONG_CONTEXT.index("zebra")]}}
    f = squad.build_features([ex], tokenizer, 64, train=True)
    assert len(f) > 2 and set(f.example_index) == {0}
    assert max(f.lengths) == 64
    assert f.start_positions[0] == f.end_positions[0] == 0  # not in the first window: the CLS token
    holding = [i for i in range(len(f)) if f.start_positions[i] > 0]
    assert holding and holding[0] > 0
    for i in holding:
        assert _decode(tokenizer, f.inputs["input_ids"][i], f.start_positions[i], f.end_positions[i]) == "zebra"
    long_question = dict(ex, question="why " * 40)  # leaves no room for the context: a clear error
    with pytest.raises(DataError, match="max_length 32.*raise data.max_length"):
        squad.build_features([long_question], tokenizer, 32, train=True)
    # consecutive windows overlap by the stride
    first, second = f.inputs["input_ids"][0], f.inputs["input_ids"][1]
    q = first.index(tokenizer.sep_token_id) + 1
    stride = squad.doc_stride(64)
    assert first[-1 - stride:-1] == second[q:q + stride]


def _planted_logits(f: squad.Features, rows: list[int], target: str, tokenizer, width: int):
    """Logits over ``width`` positions: low everywhere, a peak on ``target``'s tokens in each window
    holding it, and higher peaks on the question tokens (which must never be chosen)."""
    start = np.full((len(rows), width), -5.0, dtype=np.float32)
    end = start.copy()
    for r, i in enumerate(rows):
        start[r, 1:4] = end[r, 1:4] = 50.0  # question tokens
        offsets = f.offsets[i]
        for k, o in enumerate(offsets):
            if o is not None and LONG_CONTEXT[o[0]:o[1]] == target:
                start[r, k], end[r, k] = 9.0, 8.0
    return start, end


def test_post_processing_recovers_the_planted_answer(tokenizer):
    ex = {"id": "z", "title": "t", "question": "What is the code?", "context": LONG_CONTEXT,
          "answers": {"text": ["zebra"], "answer_start": [LONG_CONTEXT.index("zebra")]}}
    f = squad.build_features([ex], tokenizer, 64, train=False)
    assert all(o is None for o in f.offsets[0][:5])  # CLS and question tokens are outside the context
    width = 80  # wider than any window: the padding is 0, above every real logit but never a candidate
    rows = list(range(len(f)))[::-1]  # any row order: feature ids say which window is which
    start, end = _planted_logits(f, rows, "zebra", tokenizer, width)
    for r, i in enumerate(rows):
        start[r, len(f.offsets[i]):] = end[r, len(f.offsets[i]):] = 0.0
    answers = squad.best_answers([ex], f, start, end, rows)
    assert answers == {"z": "zebra"}
    assert squad.squad_scores(answers, [ex]) == {"exact_match": 1.0, "f1": 1.0}


def test_spans_end_after_they_start_and_stay_short(tokenizer):
    context = "alpha beta gamma delta epsilon"
    ex = {"id": "g", "question": "Which?", "context": context, "answers": {"text": ["delta"], "answer_start": [17]}}
    f = squad.build_features([ex], tokenizer, 32, train=False)
    at = {context[o[0]:o[1]]: k for k, o in enumerate(f.offsets[0]) if o is not None}
    start = np.full((1, len(f.offsets[0])), -5.0)
    end = start.copy()
    start[0, at["delta"]], end[0, at["beta"]] = 10.0, 10.0  # the best end lies before the best start
    start[0, at["alpha"]], end[0, at["epsilon"]] = 4.0, 5.0
    start[0, at["beta"]] = -4.0
    # delta..epsilon (15) beats alpha..beta (14); delta..beta (20) is backwards
    assert squad.best_answers([ex], f, start, end, [0])["g"] == "delta epsilon"
    # one token at most: beta..beta (-4 + 10) beats delta..delta (10 - 5)
    assert squad.best_answers([ex], f, start, end, [0], max_answer_length=1)["g"] == "beta"
    # no valid span in any window: the empty answer
    assert squad.best_answers([ex], f, start[:, :1], end[:, :1], [0])["g"] == ""


# ----------------------------------------------------------------------------- the data object


@pytest.fixture
def qa_data_dir(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_squad(root / "squad_v1.1", n_articles=10)
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(root))
    return root


def test_predictions_in_any_order_score_perfect_when_they_peak_on_the_gold_span(qa_data_dir, tokenizer):
    data = get_task("qa/squad").build_data(tokenizer, {"max_length": 48})
    assert "article split" in data.split_note and len(data.examples("dev")) == 8  # 2 of 10 articles
    gold = data.features("dev", train=True)  # the same windows, with answer positions
    preds, labels = [], []
    for batch in data.eval_loader(3):  # longest first, not file order
        ids = batch["feature_index"]
        logits = torch.full((*batch["input_ids"].shape, 2), -3.0)
        for r, i in enumerate(ids.tolist()):
            logits[r, gold.start_positions[i], 0] = 5.0
            logits[r, gold.end_positions[i], 1] = 5.0
        preds.append(logits)
        labels.append(ids)
    width = max(p.shape[1] for p in preds)
    preds = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[1])) for p in preds])
    assert data.compute_metrics(preds, torch.cat(labels)) == {"exact_match": 1.0, "f1": 1.0}
    shuffled = torch.randperm(len(preds))
    assert data.compute_metrics(preds[shuffled], torch.cat(labels)[shuffled])["f1"] == 1.0
    wrong = torch.cat(labels).roll(1)  # logits of one window read as another's
    assert data.compute_metrics(preds, wrong)["f1"] < 1.0
    with pytest.raises(DataError, match="not a window"):
        data.compute_metrics(preds, torch.cat(labels) + 1000)


def test_batches_hold_model_inputs_and_labels(qa_data_dir, tokenizer):
    data = get_task("qa/squad").build_data(tokenizer, {"max_length": 48, "max_train_samples": 12})
    assert len(data.examples("train")) == 12
    assert not {r["title"] for r in data.examples("train")} & {r["title"] for r in data.examples("dev")}
    batch = next(iter(data.train_loader(4)))
    assert {"input_ids", "attention_mask", "start_positions", "end_positions"} <= set(batch)
    for b in data.calibration_batches(5, 2) + data.latency_batches(4, 3):
        assert set(b) <= {"input_ids", "attention_mask", "token_type_ids"}
    assert [len(b["input_ids"]) for b in data.latency_batches(4, 3)] == [4, 4, 4]
    slow = types.SimpleNamespace(is_fast=False, pad_token="[PAD]")  # a Python tokenizer has no offsets mapping
    with pytest.raises(DataError, match="needs a fast tokenizer"):
        get_task("qa/squad").build_data(slow, {})


def _tiny_qa(minilm_tokenizer_dir, tmp_path, seed: int = 0, layers: int = 2):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    model = AutoModelForQuestionAnswering.from_config(config).eval()
    folder = tmp_path / f"tiny-qa-{seed}-{layers}"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_tokenizer_dir).save_pretrained(folder)
    return model, folder


def test_kd_rows_are_start_and_end_distributions_masked_alike(qa_data_dir, tokenizer, minilm_tokenizer_dir, tmp_path):
    task = get_task("qa/squad")
    data = task.build_data(tokenizer, {"max_length": 48})
    batch = next(iter(data.train_loader(4, group_by_length=False)))
    student, _ = _tiny_qa(minilm_tokenizer_dir, tmp_path, seed=0, layers=1)
    teacher, _ = _tiny_qa(minilm_tokenizer_dir, tmp_path, seed=1)
    s = task.kd_outputs(student, batch)
    t = task.kd_outputs(teacher, batch)
    n, width = batch["input_ids"].shape
    assert s["logits"].shape == t["logits"].shape == (2 * n, width)
    assert s["loss"] is not None and torch.isfinite(s["loss"])
    masked = s["logits"] == MASKED_LOGIT
    assert torch.equal(masked, t["logits"] == MASKED_LOGIT)
    valid = answer_positions(batch, width)
    assert torch.equal(~masked, torch.cat([valid, valid]))
    assert bool(masked[batch["attention_mask"].repeat(2, 1) == 0].all())  # padding
    assert bool(masked[:, 1:3].all()) and not bool(masked[:, 0].any())  # question tokens; CLS stays
    # predict: (N, T, 2) and the feature index as labels
    eval_batch = next(iter(data.eval_loader(3)))
    out = data.predict(student, eval_batch)
    assert out["predictions"].shape == (*eval_batch["input_ids"].shape, 2)
    assert torch.equal(out["labels"], eval_batch["feature_index"])


# ----------------------------------------------------------------------------- through the engine


def _engine_wired() -> bool:
    from pathlib import Path

    from stackcomp import executor

    return "build_data" in Path(executor.__file__).read_text()


@pytest.mark.skipif(not _engine_wired(), reason="the executor does not build task data through the task yet")
def test_finetune_compress_distill_and_evaluate_through_the_engine(qa_data_dir, minilm_tokenizer_dir, tmp_path):
    from stackcomp.engine import Engine
    from stackcomp.plan import build_plan
    from stackcomp.recipe import load_recipe

    _, model_dir = _tiny_qa(minilm_tokenizer_dir, tmp_path)
    recipe = tmp_path / "qa.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: tiny-qa
        model: {model_dir}
        task: qa/squad
        data: {{max_length: 48}}
        evaluate_leaves: false
        x-eval: &eval {{latency_batches: 1, latency_repeats: 1, latency_batch_size: 4}}
        stages:
          ft: {{pass: finetune, params: {{max_steps: 4, batch_size: 8, lr: 1.0e-3}}}}
          ft_eval: {{pass: evaluate, after: ft, params: *eval}}
          ds: {{pass: ds_factorize, after: ft,
               params: {{block: 16, atoms: 16, nnz: 4, iters: 2, teacher: ft, train: {{max_steps: 2, batch_size: 8}}}}}}
          q: {{pass: int8, after: ds}}
          packed: {{pass: pack, after: q}}
          packed_eval: {{pass: evaluate, after: packed, params: *eval}}
          kd: {{pass: distill, after: ft, params: {{teacher: ft, student: {{cut: {{layers: [0]}}}}, max_steps: 3,
               batch_size: 8, lr: 1.0e-3, weights: {{soft: 0.5, hard: 0.5}}, temperature: 2.0}}}}
          kd_eval: {{pass: evaluate, after: kd, params: *eval}}
    """))
    summary = Engine(build_plan(load_recipe(recipe)), tmp_path / "run").run()
    assert not summary["failed"] and not summary["skipped"], (summary["failed"], summary["skipped"])
    by_stage = {s["stage"]: s for s in summary["stages"]}
    assert by_stage["kd"]["metrics"]["train_steps"] == 3
    for stage in ("ft_eval", "packed_eval", "kd_eval"):
        m = by_stage[stage]["metrics"]
        assert 0.0 <= m["exact_match"] <= m["f1"] <= 1.0, m
        assert m["latency_ms_per_batch"] > 0
