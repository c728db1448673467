"""SQuAD v1.1 on the real dev file (shared data): the offline article split, and the windows and
post-processing scoring oracle logits near perfectly. Run with --runslow."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow

DEV = SHARED_DATA / "squad_v1.1" / "dev-v1.1.json"


@pytest.fixture
def squad_env(monkeypatch):
    if not DEV.is_file():
        pytest.skip(f"SQuAD dev file not found at {DEV}")
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(SHARED_DATA))


def test_real_dev_file_splits_by_article(squad_env):
    from stackcomp.data import squad
    from stackcomp.tasks import get_task

    rows = squad.read_squad_file(DEV)
    assert len(rows) == 10_570 and squad.article_count(rows) == 48
    splits, note = get_task("qa/squad").load_splits(None)
    train, dev = splits["train"], splits["dev"]
    assert squad.article_count(train) == 38 and squad.article_count(dev) == 10
    assert len(train) + len(dev) == 10_570
    assert not {r["title"] for r in train} & {r["title"] for r in dev}
    titles = list(dict.fromkeys(r["title"] for r in rows))
    assert dev[0]["title"] == titles[38] and train[-1]["title"] == titles[37]
    assert "first 38 articles" in note and "last 10 articles" in note


def test_oracle_logits_score_near_perfect_on_the_eval_articles(squad_env, minilm_tokenizer_dir):
    """Logits that peak on each window's labelled answer tokens: what is lost is only what
    WordPiece cannot split (answers inside a word) and answers cut by windows."""
    from transformers import AutoTokenizer

    from stackcomp.tasks import get_task

    data = get_task("qa/squad").build_data(AutoTokenizer.from_pretrained(minilm_tokenizer_dir), {"max_length": 384})
    gold = data.features("dev", train=True)
    preds, labels = [], []
    for batch in data.eval_loader(256):
        logits = torch.zeros((*batch["input_ids"].shape, 2))
        for r, i in enumerate(batch["feature_index"].tolist()):
            if gold.start_positions[i] > 0:
                logits[r, gold.start_positions[i], 0] = logits[r, gold.end_positions[i], 1] = 10.0
        preds.append(logits)
        labels.append(batch["feature_index"])
    width = max(p.shape[1] for p in preds)
    preds = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[1])) for p in preds])
    scores = data.compute_metrics(preds, torch.cat(labels))
    assert scores["f1"] > 0.995 and scores["exact_match"] > 0.99, scores
