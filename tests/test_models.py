"""Model loading: a head the checkpoint lacks is drawn the same way in every run."""

from __future__ import annotations

import torch

from stackcomp.data import get_task
from stackcomp.models import load_base_model
from tests.conftest import _tiny_config


def _headless_dir(tmp_path, minilm_tokenizer_dir):
    from transformers import AutoTokenizer, BertModel

    BertModel(_tiny_config("bert")).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_tokenizer_dir).save_pretrained(tmp_path)
    return str(tmp_path)


def test_new_head_is_seeded(tmp_path, minilm_tokenizer_dir):
    path = _headless_dir(tmp_path, minilm_tokenizer_dir)
    task = get_task("glue/sst2")
    a, _ = load_base_model(path, task, seed=7)
    torch.rand(3)  # global RNG state moves between loads, as it does in a real run
    b, _ = load_base_model(path, task, seed=7)
    c, _ = load_base_model(path, task, seed=8)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_seeded_load_leaves_global_rng_alone(tmp_path, minilm_tokenizer_dir):
    path = _headless_dir(tmp_path, minilm_tokenizer_dir)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_base_model(path, get_task("glue/sst2"), seed=7)
    assert torch.equal(torch.rand(4), expected)
