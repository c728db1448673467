"""The real CoNLL-2003 files through the ``ner`` kind (opt-in: pytest --runslow tests/slow).

Counts come from the data README (sentences, tokens per split) and from the CoNLL-2003 paper
(Tjong Kim Sang and De Meulder, 2003, table 2: English entities per split).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from stackcomp.tasks import get_task
from stackcomp.tasks.ner import IGNORE

pytestmark = pytest.mark.slow

DATA = Path(os.environ.get("STACKCOMP_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
SPLITS = ("train", "dev", "test")
#: English entities (chunks) per split, CoNLL-2003 paper table 2
PAPER_ENTITIES = {
    "train": {"LOC": 7140, "MISC": 3438, "ORG": 6321, "PER": 6600},
    "dev": {"LOC": 1837, "MISC": 922, "ORG": 1341, "PER": 1842},
    "test": {"LOC": 1668, "MISC": 702, "ORG": 1661, "PER": 1617},
}


@pytest.fixture(scope="module")
def readme_counts() -> dict[str, tuple[int, int]]:
    """(sentences, tokens) per split, from the data README's conll2003 row."""
    readme = DATA / "README.md"
    if not (DATA / "conll2003" / "dev.txt").is_file() or not readme.is_file():
        pytest.skip(f"CoNLL-2003 data not found under {DATA}")
    row = next(line for line in readme.read_text().splitlines() if line.startswith("| `conll2003/`"))
    numbers = re.search(r"([\d,]+) / ([\d,]+) / ([\d,]+) sentences; ([\d,]+) / ([\d,]+) / ([\d,]+) tokens", row)
    values = [int(n.replace(",", "")) for n in numbers.groups()]
    return {split: (values[i], values[i + 3]) for i, split in enumerate(SPLITS)}


@pytest.mark.parametrize("split", SPLITS)
def test_real_split_loads_with_the_published_counts(split, readme_counts):
    from collections import Counter

    from seqeval.metrics.sequence_labeling import get_entities

    task = get_task("ner/conll2003")
    ds = task.load_split(split, DATA)
    assert (len(ds), sum(len(t) for t in ds["tokens"])) == readme_counts[split]
    names = task.label_names
    tags = [[names[i] for i in row] for row in ds["ner_tags"]]
    assert dict(Counter(kind for kind, _, _ in get_entities(tags))) == PAPER_ENTITIES[split]
    # IOB2: every entity opens with B-, so counting chunks and counting B- tags agree
    assert sum(PAPER_ENTITIES[split].values()) == sum(t.startswith("B-") for row in tags for t in row)


def test_real_dev_tokenizes_every_word_once_and_gold_scores_one(readme_counts, minilm_tokenizer_dir):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    data = get_task("ner/conll2003").build_data(tokenizer, {"max_length": 128, "data_dir": str(DATA)})
    ds = data.dataset("dev")
    labeled = sum(sum(t != IGNORE for t in row) for row in ds["labels"])
    # each word has one label position, except the words cut at max_length (counted)
    assert labeled + data.truncated["dev"]["words"] == readme_counts["dev"][1]
    assert data.truncated["dev"]["sentences"] < 0.01 * readme_counts["dev"][0]
    gold = [torch.tensor(row) for row in ds["labels"]]
    labels = torch.nn.utils.rnn.pad_sequence(gold, batch_first=True, padding_value=IGNORE)
    perfect = data.compute_metrics(labels.clamp(min=0), labels)
    assert perfect == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0}
