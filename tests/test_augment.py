"""Distillation data augmentation: masking and n-gram copies, and how the losses treat them."""

import datasets
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

from stackcomp.data import AugmentOptions, TaskData
from stackcomp.data.augment import augment_dataset, perturb
from stackcomp.distill import losses as L
from stackcomp.distill.kd import KDLoss, KDWeights
from stackcomp.errors import DataError
from stackcomp.passes.distill import DistillParams
from tests.conftest import make_tiny_model

SENTENCES = ["a gorgeous , witty , seductive movie .", "it is not a bad film at all , really",
             "the plot is nothing but boilerplate clichés from start to finish", "dull"]


@pytest.fixture(scope="module")
def tok(minilm_tokenizer_dir):
    return AutoTokenizer.from_pretrained(minilm_tokenizer_dir)


def _set(tok, pair=False):
    enc = tok(SENTENCES, SENTENCES[::-1]) if pair else tok(SENTENCES)
    cols = {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    return datasets.Dataset.from_dict({**cols, "labels": [1, 1, 0, 0]})


def _copies(ds):
    return [r for r in ds if r["augmented"] == 1]


def _content(ids, tok):
    return [t for t in ids if t not in set(tok.all_special_ids)]


def test_ngram_copies_are_spans_of_their_original(tok):
    ds = _set(tok)
    opts = AugmentOptions(copies=5, mask_prob=0.0, ngram_prob=1.0, ngram_max=3, seed=1)
    aug, lengths = augment_dataset(ds, tok, opts, pair=False)
    assert aug[: len(ds)]["input_ids"] == ds["input_ids"] and aug[: len(ds)]["augmented"] == [0] * len(ds)
    assert lengths.tolist() == [len(r) for r in aug["input_ids"]]
    copies = _copies(aug)
    assert copies  # "dull" is one token: its copies equal it and are dropped; the others change
    originals = [_content(ids, tok) for ids in ds["input_ids"]]
    for c in copies:
        ids = c["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        span = ids[1:-1]
        assert 1 <= len(span) <= 3 and len(c["attention_mask"]) == len(c["token_type_ids"]) == len(ids)
        assert any(span == o[i:i + len(span)] for o in originals for i in range(len(o)))
    assert len(copies) < 5 * len(ds)  # identical copies were dropped


def test_masking_rate_and_specials(tok):
    row = {k: v[2] for k, v in tok(SENTENCES).items()}
    rng, special = np.random.default_rng(0), set(tok.all_special_ids)
    opts = AugmentOptions(mask_prob=0.3, ngram_prob=0.0)
    masked = total = 0
    for _ in range(400):
        ids = perturb(row, opts, rng, mask_id=tok.mask_token_id, special=special, pair=False)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id  # never masked
        assert all(a == b or a == tok.mask_token_id for a, b in zip(ids, row["input_ids"]))
        masked += sum(t == tok.mask_token_id for t in ids)
        total += len(ids) - 2
    assert masked / total == pytest.approx(0.3, abs=0.03)


def test_pairs_keep_length_and_segments(tok):
    ds = _set(tok, pair=True)
    aug, _ = augment_dataset(ds, tok, AugmentOptions(copies=3, mask_prob=0.5, ngram_prob=1.0, seed=2), pair=True)
    by_original = {tuple(r["token_type_ids"]): r for r in ds}
    for c in _copies(aug):
        o = by_original[tuple(c["token_type_ids"])]
        assert len(c["input_ids"]) == len(o["input_ids"])  # no n-gram cut through a pair
        assert all(a == b or a == tok.mask_token_id for a, b in zip(c["input_ids"], o["input_ids"]))


def test_seeded_and_nothing_added_without_perturbation(tok):
    ds = _set(tok)
    a, _ = augment_dataset(ds, tok, AugmentOptions(seed=5), pair=False)
    b, _ = augment_dataset(ds, tok, AugmentOptions(seed=5), pair=False)
    c, _ = augment_dataset(ds, tok, AugmentOptions(seed=6), pair=False)
    assert a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]
    none, _ = augment_dataset(ds, tok, AugmentOptions(mask_prob=0.0, ngram_prob=0.0), pair=False)
    assert len(none) == len(ds)


def test_no_mask_token_is_a_clear_error(tok):
    class NoMask:
        mask_token_id = None
        all_special_ids = tok.all_special_ids
        name_or_path = "gpt-ish"

    with pytest.raises(DataError, match="gpt-ish.*no mask token.*mask_prob: 0"):
        augment_dataset(_set(tok), NoMask(), AugmentOptions(mask_prob=0.1), pair=False)


def test_train_loader_serves_marked_copies(tok, tiny_glue):
    data = TaskData("glue/sst2", tok, {"data_dir": str(tiny_glue), "max_length": 32})
    plain = sum(len(b["labels"]) for b in data.train_loader(16))
    seen = {"orig": 0, "copy": 0}
    for b in data.train_loader(16, augment=AugmentOptions(copies=2, seed=0)):
        assert b["augmented"].shape == b["labels"].shape
        seen["orig"] += int((b["augmented"] == 0).sum())
        seen["copy"] += int((b["augmented"] == 1).sum())
    assert seen["orig"] == plain and plain < seen["copy"] <= 2 * plain


def test_hard_loss_skips_copies_and_soft_loss_sees_them():
    teacher, student = make_tiny_model("bert", seed=0), make_tiny_model("bert", seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (6, 9), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0, 1, 0]),
         "augmented": torch.tensor([0, 1, 0, 1, 1, 0])}
    gold = b["augmented"] == 0
    x = {"input_ids": ids, "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        s, t = student(**x).logits, teacher(**x).logits
    hard = KDLoss(teacher, student, KDWeights(soft=0.0, hard=1.0))
    assert hard(student, b).item() == pytest.approx(L.hard_loss(s[gold], b["labels"][gold]).item(), rel=1e-5)
    both = KDLoss(teacher, student, KDWeights(soft=0.5, hard=0.5), temperature=2.0)
    expect = 0.5 * L.soft_kl(s, t, 2.0) + 0.5 * L.hard_loss(s[gold], b["labels"][gold])
    assert both(student, b).item() == pytest.approx(expect.item(), rel=1e-5)
    only_copies = {**b, "augmented": torch.ones(6, dtype=torch.long)}  # no gold row: no hard term at all
    assert both(student, only_copies).item() == pytest.approx((0.5 * L.soft_kl(s, t, 2.0)).item(), rel=1e-5)


def test_augment_needs_a_teacher_loss():
    with pytest.raises(ValidationError, match="augment.*teacher loss"):
        DistillParams(teacher="ft", weights={"soft": 0.0, "hard": 1.0}, augment={"copies": 1})
    assert DistillParams(teacher="ft", weights={"soft": 0.5, "hard": 0.5}, augment={"copies": 1}).augment.copies == 1
