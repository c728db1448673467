"""SQuAD v1.1 extractive QA: reading the data, the article split, features, post-processing, EM/F1.

Examples are plain dicts with the hub's columns (``id``, ``title``, ``context``, ``question``,
``answers: {"text": [...], "answer_start": [...]}``) plus ``article``, the index of the article
(title) the question belongs to. They come from the official SQuAD JSON (``{"data": [{"title",
"paragraphs": [{"context", "qas": [...]}]}]}``), from JSON lines in the hub's layout (one question a
line), or from the hub (``rajpurkar/squad``).

Features follow Hugging Face's ``run_qa.py``: question first, context second, the context cut into
windows of ``max_length`` tokens that overlap by a stride (:func:`doc_stride`), offsets mapping each
token back to its characters in the context. Training features carry the answer's start/end token
(the CLS token when the answer is not inside the window); evaluation features keep which example
they came from and the offsets, ``None`` outside the context, so predictions can only point into it.

The score is the official SQuAD v1.1 evaluation script's (``evaluate-v1.1.py``): answers
normalized (lower case, no punctuation, no articles, single spaces), exact match and token F1,
the best over the gold answers, averaged over every question. ``evaluate``'s ``squad`` metric is
the same script, but loading it needs the hub, so its four functions are restated here.
Scores are fractions (0-1) like every stackcomp metric; the official script prints percents.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stackcomp.errors import DataError

SQUAD_DIR = "squad_v1.1"
HUB_ID = "rajpurkar/squad"
#: file names looked for in a SQuAD folder, first found wins
TRAIN_FILES = ("train-v1.1.json", "train.json", "train.jsonl")
DEV_FILES = ("dev-v1.1.json", "dev.json", "validation.json", "dev.jsonl", "validation.jsonl")
#: without a train file the dev file is split by article: the last fifth of the articles (10 of
#: the official file's 48) is evaluated on, the rest (38) trained on
EVAL_ARTICLE_FRACTION = 10 / 48
#: overlap, in tokens, between consecutive windows of a long context (run_qa's ``doc_stride``);
#: capped at half of ``max_length`` so short windows still advance
DOC_STRIDE = 128
#: candidates kept per feature for the start and for the end of an answer (run_qa's ``n_best_size``)
N_BEST = 20
#: longest answer predicted, in tokens (run_qa's ``max_answer_length``)
MAX_ANSWER_LENGTH = 30


# ----------------------------------------------------------------------------- reading


def read_squad_file(path: str | Path) -> list[dict[str, Any]]:
    """Every question of a SQuAD JSON file, or of a JSON lines file in the hub's layout, in file order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if path.suffix == ".jsonl":
        return _read_json_lines(path, text)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); expected the official SQuAD "
                        "layout {\"data\": [{\"title\", \"paragraphs\": [...]}]} or a .jsonl file") from None
    return _read_official(path, raw)


def _read_official(path: Path, raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise DataError(f"{path}: expected the official SQuAD layout, an object with a \"data\" list of articles")
    rows: list[dict[str, Any]] = []
    for a, article in enumerate(raw["data"]):
        where = f"{path}: data[{a}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(f"{where}: an article needs a \"paragraphs\" list")
        title = str(article.get("title", a))
        for p, paragraph in enumerate(article["paragraphs"]):
            here = f"{where}.paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str) \
                    or not isinstance(paragraph.get("qas"), list):
                raise DataError(f"{here}: a paragraph needs a \"context\" string and a \"qas\" list")
            for q, qa in enumerate(paragraph["qas"]):
                rows.append(_row(f"{here}.qas[{q}]", qa, paragraph["context"], title, a,
                                 answers=_official_answers(f"{here}.qas[{q}]", qa)))
    if not rows:
        raise DataError(f"{path}: no questions")
    return rows


def _official_answers(where: str, qa: Any) -> dict[str, list]:
    answers = qa.get("answers") if isinstance(qa, dict) else None
    if not isinstance(answers, list) or not all(isinstance(x, dict) and "text" in x and "answer_start" in x
                                                for x in answers):
        raise DataError(f"{where}: \"answers\" must be a list of {{\"text\", \"answer_start\"}}")
    return {"text": [x["text"] for x in answers], "answer_start": [x["answer_start"] for x in answers]}


def _row(where: str, qa: Any, context: str, title: str, article: int, answers: Any) -> dict[str, Any]:
    """One checked example; an answer must be where its ``answer_start`` says in the context."""
    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or "id" not in qa:
        raise DataError(f"{where}: a question needs \"id\" and a \"question\" string")
    if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) \
            or not isinstance(answers.get("answer_start"), list) \
            or len(answers["text"]) != len(answers["answer_start"]):
        raise DataError(f"{where}: \"answers\" must hold equally long \"text\" and \"answer_start\" lists")
    for text, start in zip(answers["text"], answers["answer_start"]):
        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool) or start < 0 \
                or start + len(text) > len(context):
            raise DataError(f"{where}: answer {text!r} at {start!r} is not inside the context "
                            f"({len(context)} characters)")
    return {"id": str(qa["id"]), "title": title, "context": context, "question": qa["question"],
            "answers": {"text": list(answers["text"]), "answer_start": list(answers["answer_start"])},
            "article": article}


def _read_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    articles: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("context"), str):
            raise DataError(f"{where}: expected an object with id, context, question, answers "
                            "(answers: {\"text\": [...], \"answer_start\": [...]})")
        title = str(obj.get("title", ""))
        article = articles.setdefault(title, len(articles))
        rows.append(_row(where, obj, obj["context"], title, article, obj.get("answers")))
    if not rows:
        raise DataError(f"{path}: no questions")
    return rows


def load_hub_split(split: str) -> list[dict[str, Any]]:
    """``train`` or ``dev`` (the hub's ``validation``) of ``rajpurkar/squad`` as example rows."""
    import datasets

    hub_split = "validation" if split == "dev" else split
    try:
        ds = datasets.load_dataset(HUB_ID, split=hub_split)
    except Exception as e:  # noqa: BLE001 - offline, not cached, network: the same for the user
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"qa/squad {split}: could not load {HUB_ID} (split {hub_split!r}) from the hub: "
                        f"{type(e).__name__}: {cause[:300]}. To use local files, set STACKCOMP_DATA_DIR (or "
                        f"data.data_dir in the recipe) to a folder holding {SQUAD_DIR}/dev-v1.1.json") from None
    articles: dict[str, int] = {}
    rows = []
    for i, ex in enumerate(ds):
        article = articles.setdefault(ex["title"], len(articles))
        rows.append(_row(f"{HUB_ID} {hub_split}[{i}]", ex, ex["context"], ex["title"], article, ex["answers"]))
    return rows


def split_by_article(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train, dev, note): the first articles train, the last :data:`EVAL_ARTICLE_FRACTION` of them
    (at least one) evaluate, so no article's questions are on both sides."""
    order = list(dict.fromkeys(r["article"] for r in rows))
    if len(order) < 2:
        raise DataError(f"splitting by article needs at least two articles, the file has {len(order)}; "
                        "give a train file too")
    n_eval = max(1, round(len(order) * EVAL_ARTICLE_FRACTION))
    eval_articles = set(order[-n_eval:])
    train = [r for r in rows if r["article"] not in eval_articles]
    dev = [r for r in rows if r["article"] in eval_articles]
    note = (f"article split of the dev file (no train file): train = first {len(order) - n_eval} articles "
            f"({len(train)} questions), eval = last {n_eval} articles ({len(dev)} questions)")
    return train, dev, note


# ----------------------------------------------------------------------------- features


def doc_stride(max_length: int) -> int:
    """Tokens shared by consecutive windows: :data:`DOC_STRIDE`, at most half of ``max_length``."""
    return max(1, min(DOC_STRIDE, max_length // 2))


@dataclass
class Features:
    """Tokenized windows of a split's examples, one row per window."""

    inputs: dict[str, list[list[int]]]  # model inputs (input_ids, attention_mask, [token_type_ids])
    example_index: np.ndarray  # the example each window comes from
    lengths: np.ndarray  # tokens per window
    offsets: list[list[tuple[int, int] | None]] = field(default_factory=list)  # eval: context offsets, None elsewhere
    start_positions: np.ndarray | None = None  # train: answer start token (CLS index when not in the window)
    end_positions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.example_index)

    def row(self, i: int, *, with_labels: bool = True) -> dict[str, Any]:
        out = {k: v[i] for k, v in self.inputs.items()}
        if with_labels and self.start_positions is not None:
            out["start_positions"] = int(self.start_positions[i])
            out["end_positions"] = int(self.end_positions[i])
        return out


def build_features(examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, *,
                   train: bool, chunk: int = 1000) -> Features:
    """Windows of every example: with answer positions (``train``) or with offsets (evaluation)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"extractive QA needs a fast tokenizer (offsets mapping); {type(tokenizer).__name__} "
                        "is not one")
    wanted = {"input_ids", *getattr(tokenizer, "model_input_names", ())}
    stride = doc_stride(max_length)
    inputs: dict[str, list[list[int]]] = {}
    example_index: list[int] = []
    offsets_out: list[list[tuple[int, int] | None]] = []
    starts: list[int] = []
    ends: list[int] = []
    for begin in range(0, len(examples), chunk):
        part = examples[begin:begin + chunk]
        try:
            enc = tokenizer([e["question"].lstrip() for e in part], [e["context"] for e in part],
                            truncation="only_second", max_length=max_length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception: a question too long
            raise DataError(f"cannot cut SQuAD contexts into windows of max_length {max_length} (stride {stride}): "
                            f"{type(e).__name__}: {str(e)[:200]}; raise data.max_length (384 is usual)") from None
        for k, v in enc.items():
            if k in wanted:
                inputs.setdefault(k, []).extend(v)
        for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
            example = part[sample]
            sequence = enc.sequence_ids(i)
            offsets = enc["offset_mapping"][i]
            example_index.append(begin + sample)
            if train:
                start, end = answer_tokens(example, sequence, offsets, enc["input_ids"][i], tokenizer)
                starts.append(start)
                ends.append(end)
            else:
                offsets_out.append([tuple(o) if s == 1 else None for s, o in zip(sequence, offsets)])
    lengths = np.array([len(ids) for ids in inputs.get("input_ids", [])], dtype=np.int64)
    return Features(inputs=inputs, example_index=np.array(example_index, dtype=np.int64), lengths=lengths,
                    offsets=offsets_out,
                    start_positions=np.array(starts, dtype=np.int64) if train else None,
                    end_positions=np.array(ends, dtype=np.int64) if train else None)


def answer_tokens(example: dict[str, Any], sequence: Sequence[int | None], offsets: Sequence[Sequence[int]],
                  input_ids: Sequence[int], tokenizer: Any) -> tuple[int, int]:
    """(start, end) tokens of the example's first answer in one window, or the CLS token twice
    when the answer is not wholly inside the window (as run_qa labels it)."""
    cls_id = getattr(tokenizer, "cls_token_id", None)
    cls = list(input_ids).index(cls_id) if cls_id is not None and cls_id in input_ids else 0
    answers = example["answers"]
    context = [k for k, s in enumerate(sequence) if s == 1]
    if not answers["text"] or not context:
        return cls, cls
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls, cls
    start = first
    while start < last and offsets[start + 1][0] <= start_char:
        start += 1
    end = last
    while end > start and offsets[end - 1][1] >= end_char:
        end -= 1
    return start, end


# ----------------------------------------------------------------------------- post-processing


def best_answers(examples: Sequence[dict[str, Any]], features: Features, start_logits: np.ndarray,
                 end_logits: np.ndarray, feature_ids: Iterable[int], *, n_best: int = N_BEST,
                 max_answer_length: int = MAX_ANSWER_LENGTH) -> dict[str, str]:
    """The predicted answer text of each example: over all its windows, the span with the highest
    start + end logit among the ``n_best`` starts and ends, start <= end, at most
    ``max_answer_length`` tokens, inside the context (positions outside it, padding included,
    are never candidates). ``start_logits[r]`` belongs to window ``feature_ids[r]``; an example
    none of whose windows has a valid span gets the empty answer."""
    best: dict[int, tuple[float, str]] = {}
    for row, f in enumerate(feature_ids):
        offsets = features.offsets[f]
        valid = np.zeros(start_logits.shape[1], dtype=bool)
        inside = [k for k, o in enumerate(offsets[:len(valid)]) if o is not None]
        valid[inside] = True
        if not valid.any():
            continue
        k = min(n_best, int(valid.sum()))
        starts = _top(start_logits[row], valid, k)
        ends = _top(end_logits[row], valid, k)
        span = ends[None, :] - starts[:, None]
        scores = start_logits[row][starts][:, None] + end_logits[row][ends][None, :]
        scores = np.where((span >= 0) & (span < max_answer_length), scores, -np.inf)
        i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
        if not np.isfinite(scores[i, j]):
            continue
        example = int(features.example_index[f])
        if example not in best or scores[i, j] > best[example][0]:
            context = examples[example]["context"]
            text = context[offsets[starts[i]][0]:offsets[ends[j]][1]]
            best[example] = (float(scores[i, j]), text)
    return {e["id"]: best[i][1] if i in best else "" for i, e in enumerate(examples)}


def _top(logits: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest valid logits, highest first."""
    masked = np.where(valid, logits.astype(np.float64), -np.inf)
    return np.argsort(-masked, kind="stable")[:k]


# ----------------------------------------------------------------------------- the official score


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (evaluate-v1.1.py)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-overlap F1 of two answers after normalization (evaluate-v1.1.py)."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def squad_scores(predictions: dict[str, str], examples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` as fractions: the best over each question's gold answers, averaged
    over every question (one without a prediction scores 0, as in the official script)."""
    if not examples:
        raise DataError("no questions to score")
    em = f1 = 0.0
    for e in examples:
        golds = e["answers"]["text"]
        if e["id"] not in predictions or not golds:
            continue
        pred = predictions[e["id"]]
        em += max(float(exact_match_score(pred, g)) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    n = len(examples)
    return {"exact_match": em / n, "f1": f1 / n}


def article_count(rows: Sequence[dict[str, Any]]) -> int:
    return len({r["article"] for r in rows})


__all__ = ["DEV_FILES", "DOC_STRIDE", "EVAL_ARTICLE_FRACTION", "HUB_ID", "MAX_ANSWER_LENGTH", "N_BEST", "SQUAD_DIR",
           "TRAIN_FILES", "Features", "answer_tokens", "article_count", "best_answers", "build_features", "doc_stride",
           "exact_match_score", "f1_score", "load_hub_split", "normalize_answer", "read_squad_file", "split_by_article",
           "squad_scores"]
