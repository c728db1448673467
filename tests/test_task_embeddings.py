"""The ``embeddings`` kind on a tiny bi-encoder and a handful of STS-B pairs written here: pooling
read from sentence-transformers files, pair batches, the metric and the losses checked against
sentence-transformers itself, embedding distillation outputs, the export folder, and the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stackcomp.errors import DataError, ModelError
from stackcomp.tasks import get_task
from stackcomp.tasks.embeddings import (
    POOLING_ATTR,
    EmbeddingsTask,
    PairLossCallback,
    encode,
    read_pooling,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
# (sentence1, sentence2, score 0-5): varied scores so the correlations mean something
PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.2),
    ("A dog runs in the park.", "A cat sleeps on the sofa.", 0.6),
    ("Two children are playing soccer.", "Kids are playing football outside.", 3.9),
    ("The stock market fell sharply today.", "A man is riding a horse.", 0.0),
    ("A plane is taking off.", "An airplane is departing.", 4.6),
    ("She is reading a book in the library.", "A woman reads quietly.", 3.1),
    ("The chef cooks pasta.", "Someone is making spaghetti in a kitchen.", 3.5),
    ("A boy is jumping into a pool.", "The weather is cold and rainy.", 0.4),
    ("A man is playing a guitar.", "A girl is singing a song.", 1.2),
    ("The president gave a speech.", "A politician addressed the crowd.", 3.3),
    ("A bird is flying over the sea.", "A seagull glides above the water.", 4.0),
    ("The car is parked outside.", "A vehicle sits in the driveway.", 2.9),
    ("People are dancing at a party.", "A man is fixing a bicycle.", 0.2),
    ("The baby is crying.", "An infant is weeping loudly.", 4.4),
    ("A woman is slicing an onion.", "A man is peeling a potato.", 1.8),
]


def write_stsb(root: Path, train: list = PAIRS, dev: list = PAIRS[:12]) -> Path:
    folder = root / "glue" / "STS-B"
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("dev", dev)):
        lines = [HEADER] + [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{s:.3f}"
                            for i, (a, b, s) in enumerate(rows)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def stsb_dir(tmp_path_factory) -> Path:
    return write_stsb(tmp_path_factory.mktemp("stsb"))


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory, minilm_tokenizer_dir) -> Path:
    """A tiny bi-encoder saved by sentence-transformers itself: BERT + mean pooling + Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoModel, AutoTokenizer

    from tests.conftest import _tiny_config

    raw = tmp_path_factory.mktemp("tiny-raw")
    torch.manual_seed(0)
    AutoModel.from_config(_tiny_config("bert")).save_pretrained(raw)
    AutoTokenizer.from_pretrained(minilm_tokenizer_dir).save_pretrained(raw)
    st = SentenceTransformer(modules=[Transformer(str(raw)), Pooling(32, pooling_mode="mean"), Normalize()],
                             device="cpu")
    out = tmp_path_factory.mktemp("tiny-st")
    st.save(str(out))
    return out


@pytest.fixture
def task() -> EmbeddingsTask:
    return get_task("embeddings/stsb")


def _data(task, folder, stsb_dir, **opts):
    from transformers import AutoTokenizer

    return task.build_data(AutoTokenizer.from_pretrained(folder), {"data_dir": str(stsb_dir), "max_length": 32, **opts})


# ----------------------------------------------------------------------------- the kind


def test_kind_is_registered_with_its_metric():
    t = get_task("embeddings/stsb")
    assert isinstance(t, EmbeddingsTask) and t.auto_class == "AutoModel"
    assert (t.main_metric, t.metrics, t.short_name, t.loss) == ("spearman", ("spearman", "pearson"), "stsb", "cosent")
    cosine = get_task("embeddings/stsb:cosine")
    assert cosine.loss == "cosine" and cosine.name != t.name  # another loss, other stage keys
    assert "embeddings/stsb" in __import__("stackcomp.tasks", fromlist=["list_tasks"]).list_tasks()
    with pytest.raises(DataError, match="embeddings/stsb"):
        get_task("embeddings/sick")
    with pytest.raises(DataError, match="unknown loss"):
        get_task("embeddings/stsb:triplet")


def test_pooling_is_read_from_sentence_transformers_files(tmp_path, st_folder, minilm_tokenizer_dir):
    # the real all-MiniLM-L6-v2 folder: legacy pooling config, a Normalize module, max_seq_length 256
    assert read_pooling(minilm_tokenizer_dir) == {"mode": "mean", "normalize": True, "max_seq_length": 256}
    assert read_pooling(st_folder)["mode"] == "mean" and read_pooling(st_folder)["normalize"] is True
    assert read_pooling(tmp_path) == {"mode": "mean", "normalize": False}  # no modules.json: mean pooling

    legacy = tmp_path / "cls"
    (legacy / "1_Pooling").mkdir(parents=True)
    (legacy / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (legacy / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    assert read_pooling(legacy) == {"mode": "cls", "normalize": False}

    dense = json.loads((legacy / "modules.json").read_text())
    dense.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (legacy / "modules.json").write_text(json.dumps(dense))
    with pytest.raises(ModelError, match="Dense"):
        read_pooling(legacy)


def test_hub_model_without_its_files_offline_assumes_mean_pooling(caplog):
    from stackcomp.tasks.embeddings import _hub_pipeline_files

    with caplog.at_level("WARNING", logger="stackcomp.tasks"):
        assert _hub_pipeline_files("stackcomp-test/no-such-model") is None
    assert "assuming mean pooling" in caplog.text


def test_load_model_keeps_the_pooling_in_the_config_through_save_and_load(tmp_path, task, st_folder):
    from stackcomp.artifacts import load_model, save_model

    model = task.load_model(str(st_folder))
    assert type(model).__name__ == "BertModel"
    assert getattr(model.config, POOLING_ATTR) == {"mode": "mean", "normalize": True}
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m", verify=False)
    assert getattr(again.config, POOLING_ATTR) == {"mode": "mean", "normalize": True}
    x = {"input_ids": torch.tensor([[101, 2023, 2003, 102, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    emb = encode(again, x)[0]
    assert emb.shape == (1, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(1))  # normalized


# ----------------------------------------------------------------------------- data


def test_pair_batches_gold_scale_and_single_sentence_batches(task, st_folder, stsb_dir):
    data = _data(task, st_folder, stsb_dir)
    a, b, gold = data.pairs("train")
    assert a[0] == PAIRS[0][0] and b[0] == PAIRS[0][1]
    assert gold == pytest.approx([s / 5 for *_, s in PAIRS])  # GLUE 0-5 -> 0-1
    batch = next(iter(data.train_loader(4, seed=0)))
    assert {"input_ids", "attention_mask", "input_ids_b", "attention_mask_b", "labels"} <= set(batch)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4,)
    assert batch["input_ids"].shape[0] == batch["input_ids_b"].shape[0] == 4

    dev = list(data.eval_loader(5))
    assert sum(len(x["labels"]) for x in dev) == 12
    gold = sorted(torch.cat([x["labels"] for x in dev]).tolist())
    assert gold == pytest.approx(sorted(s / 5 for *_, s in PAIRS[:12]))

    # unlabeled sentences: both columns, deduplicated ("A man is playing a guitar." and the onion line repeat)
    sentences = data.sentences("train")
    assert len(sentences) == len(set(sentences)) == 2 * len(PAIRS) - 2
    model = task.load_model(str(st_folder)).eval()
    for batches in (data.calibration_batches(10, 4, seed=1), data.latency_batches(8, 2)):
        for x in batches:
            assert "labels" not in x and not any(k.endswith("_b") for k in x)
            model(**x)  # model inputs only
    lat = data.latency_batches(8, 2)
    assert [len(x["input_ids"]) for x in lat] == [8, 8]
    assert sum(len(x["input_ids"]) for x in data.calibration_batches(10, 4, seed=1)) == 10
    unlabeled = list(data.unlabeled_loader(8, seed=0))
    assert sum(len(x["input_ids"]) for x in unlabeled) == len(sentences) and "labels" not in unlabeled[0]


def test_caps_are_seeded_subsets(task, st_folder, stsb_dir):
    one = _data(task, st_folder, stsb_dir, max_train_samples=5, seed=3).pairs("train")
    two = _data(task, st_folder, stsb_dir, max_train_samples=5, seed=3).pairs("train")
    other = _data(task, st_folder, stsb_dir, max_train_samples=5, seed=4).pairs("train")
    assert one == two and len(one[0]) == 5 and one != other


def test_jsonl_files_and_clear_errors(tmp_path, task, st_folder):
    folder = tmp_path / "stsb"
    folder.mkdir()
    for split in ("train", "dev"):
        (folder / f"{split}.jsonl").write_text("".join(
            json.dumps({"sentence1": a, "sentence2": b, "score": s / 5}) + "\n" for a, b, s in PAIRS))
    assert task.data_files(["train", "validation"], tmp_path) == {"train": folder / "train.jsonl",
                                                                   "dev": folder / "dev.jsonl"}
    a, b, gold = _data(task, st_folder, tmp_path).pairs("dev")
    assert (a[3], b[3], gold[3]) == (PAIRS[3][0], PAIRS[3][1], pytest.approx(PAIRS[3][2] / 5))

    (folder / "dev.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 0.5}\n{"sentence1": "a"}\n')
    with pytest.raises(DataError, match=r"dev.jsonl:2"):
        task.load_pairs("dev", tmp_path)
    (folder / "dev.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 4.5}\n')
    with pytest.raises(DataError, match=r"dev.jsonl:1: score 4.5 is outside 0-1"):
        task.load_pairs("dev", tmp_path)
    with pytest.raises(DataError, match="no file at .*STS-B.*test|has no split"):
        task.check_data(["test"], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"STS-B/train.tsv nor .*stsb/train.jsonl"):
        task.check_data(["train"], empty)


# ----------------------------------------------------------------------------- against sentence-transformers


def test_metric_is_embedding_similarity_evaluators(task, st_folder, stsb_dir):
    """Our dev Spearman/Pearson through the training loop's evaluate equal sentence-transformers'
    EmbeddingSimilarityEvaluator on a SentenceTransformer of the same folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from stackcomp.train import evaluate

    data = _data(task, st_folder, stsb_dir)
    model = task.load_model(str(st_folder)).eval()
    ours = evaluate(model, data.eval_loader(5), data.compute_metrics, predict=data.predict)
    a, b, gold = data.pairs("dev")
    st = SentenceTransformer(str(st_folder), device="cpu")
    theirs = EmbeddingSimilarityEvaluator(a, b, gold, main_similarity="cosine", write_csv=False)(st)
    assert ours["spearman"] == pytest.approx(theirs["spearman_cosine"], abs=1e-6)
    assert ours["pearson"] == pytest.approx(theirs["pearson_cosine"], abs=1e-6)
    assert -1 <= ours["spearman"] <= 1 and ours["spearman"] != pytest.approx(ours["pearson"])


def test_metric_on_planted_scores():
    from stackcomp.tasks.embeddings import similarity_metrics

    gold = torch.tensor([0.0, 0.2, 0.4, 0.6, 1.0])
    assert similarity_metrics(torch.tensor([-0.5, 0.1, 0.2, 0.3, 0.9]), gold)["spearman"] == pytest.approx(1.0)
    assert similarity_metrics(-gold, gold) == pytest.approx({"spearman": -1.0, "pearson": -1.0})


@pytest.mark.parametrize("name,loss_cls", [("embeddings/stsb", "CoSENTLoss"),
                                           ("embeddings/stsb:cosine", "CosineSimilarityLoss")])
def test_training_loss_is_sentence_transformers_loss(name, loss_cls, st_folder, stsb_dir):
    """The loss callback on our batch equals the sentence-transformers loss run on a
    SentenceTransformer of the same folder with its own tokenization."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    task = get_task(name)
    data = _data(task, st_folder, stsb_dir)
    model = task.load_model(str(st_folder)).eval()
    (callback,) = task.training_callbacks(model)
    batch = data.collate_pairs(data._pair_features("train")[0][:8])
    ours = callback.compute_loss(None, model, batch)
    assert ours.requires_grad
    st = SentenceTransformer(str(st_folder), device="cpu").eval()
    a, b, gold = data.pairs("train")
    features = [st.tokenize(a[:8]), st.tokenize(b[:8])]
    theirs = getattr(losses, loss_cls)(st)(features, torch.tensor(gold[:8]))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)


def test_kd_outputs_give_embeddings_not_logits(task, st_folder, stsb_dir):
    from stackcomp.distill.students import cut_student

    data = _data(task, st_folder, stsb_dir)
    teacher = task.load_model(str(st_folder)).eval()
    student, _ = cut_student(teacher, count=1)
    pair_batch = next(iter(data.train_loader(4, seed=0)))
    out_t = task.kd_outputs(teacher, pair_batch, output_hidden_states=True)
    out_s = task.kd_outputs(student, pair_batch)
    assert out_t["logits"] is None and out_t["embeddings"].shape == out_s["embeddings"].shape == (8, 32)
    assert out_s["loss"] is not None and out_s["loss"].requires_grad
    assert len(out_t["hidden_states"]) == 3 and out_t["hidden_states"][0].shape[:2] == pair_batch["input_ids"].shape
    assert getattr(student.config, POOLING_ATTR) == getattr(teacher.config, POOLING_ATTR)  # travels with the cut
    single = next(iter(data.unlabeled_loader(6, seed=0)))
    out = task.kd_outputs(student, single)
    assert out["embeddings"].shape == (6, 32) and out["loss"] is None  # unlabeled: nothing but embeddings
    with pytest.raises(DataError, match="pairs with gold scores"):
        PairLossCallback(task).compute_loss(None, student, single)


# ----------------------------------------------------------------------------- export


def test_export_folder_loads_in_sentence_transformers_and_stackcomp(tmp_path, task, st_folder, stsb_dir):
    """A briefly fine-tuned model, saved with the kind's export files: SentenceTransformer(path)
    encodes exactly as our pooling does, stackcomp.load rebuilds it, and the checksums cover the files."""
    from sentence_transformers import SentenceTransformer

    import stackcomp
    from stackcomp.artifacts import save_model, verify_folder, write_checksums
    from stackcomp.rundir import EXPORT_KIND
    from stackcomp.train import TrainConfig, train

    data = _data(task, st_folder, stsb_dir)
    model = task.load_model(str(st_folder))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, data.train_loader(4, seed=0), TrainConfig(max_steps=3, lr=1e-3, batch_size=4),
                   callbacks=task.training_callbacks(model))
    model = result.model.eval()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained

    folder = tmp_path / "export"
    save_model(model, folder, tokenizer=data.tokenizer)
    written = task.write_export_files(model, folder)
    assert set(written) >= {"modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                            "2_Normalize/config.json"}
    write_checksums(folder)
    assert verify_folder(folder, EXPORT_KIND) is None

    texts = data.sentences("dev")[:10]
    with torch.inference_mode():
        ours = torch.cat([task.encode(model, b) for b in data._sentence_batches(texts, 4)])
        st = SentenceTransformer(str(folder), device="cpu")
        theirs = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
        reloaded = stackcomp.load(folder)
        again = torch.cat([task.encode(reloaded, b) for b in data._sentence_batches(texts, 4)])
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours, again, atol=1e-6)
    assert read_pooling(folder)["normalize"] is True


def test_no_sentence_transformers_files_for_compressed_layers(tmp_path, task, st_folder):
    from stackcomp.artifacts import save_model
    from stackcomp.nn.base import CompressedLayer

    model = task.load_model(str(st_folder))
    assert isinstance(_int8(model), CompressedLayer)
    save_model(model, tmp_path / "q")
    assert task.write_export_files(model, tmp_path / "q") == []
    assert not (tmp_path / "q" / "modules.json").exists()


def _int8(model):
    """Swap one linear of ``model`` for an int8 layer (the int8 pass's conversion); return it."""
    from stackcomp.nn.quantized import Int8Linear
    from stackcomp.targets import set_module

    name, lin = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    q = Int8Linear.from_linear(lin)
    set_module(model, name, q)
    return q


# ----------------------------------------------------------------------------- through the engine


STEPS = {"max_steps": 3, "batch_size": 4, "eval_every": None}


def _run(tmp_path, folder, stsb_dir, stages: dict):
    from stackcomp import run

    result = run({"name": "emb", "model": str(folder), "task": "embeddings/stsb", "evaluate_leaves": False,
                  "data": {"max_length": 32, "data_dir": str(stsb_dir)}, "stages": stages}, out=tmp_path / "run")
    assert result.ok, [(s.stage, s.error) for s in result.failed]
    return result


def test_engine_evaluate_matches_sentence_transformers(tmp_path, st_folder, stsb_dir):
    """The uncompressed model's dev Spearman from the evaluate pass is sentence-transformers' number."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    result = _run(tmp_path, st_folder, stsb_dir, {
        "original": {"pass": "finetune", "params": {"epochs": 0}},  # no training: the model as loaded
        "eval": {"pass": "evaluate", "after": "original", "params": {
            "latency_batch_size": 8, "latency_batches": 1, "latency_repeats": 1}}})
    metrics = result.stage("eval").metrics
    a, b, gold = get_task("embeddings/stsb").load_pairs("dev", stsb_dir)
    theirs = EmbeddingSimilarityEvaluator(a, b, gold, main_similarity="cosine", write_csv=False)(
        SentenceTransformer(str(st_folder), device="cpu"))
    assert metrics["main_metric"] == "spearman"
    assert metrics["spearman"] == pytest.approx(theirs["spearman_cosine"], abs=1e-6)
    assert metrics["latency_ms_per_batch"] > 0


def test_engine_finetune_distill_and_compress(tmp_path, st_folder, stsb_dir):
    """finetune (CoSENT) -> evaluate, and a 1-layer student distilled on the teacher's embeddings
    -> ds_factorize -> int8 (4-bit tables) -> pack -> evaluate."""
    result = _run(tmp_path, st_folder, stsb_dir, {
        "ft": {"pass": "finetune", "params": {**STEPS, "lr": 1.0e-3}},
        "ft_eval": {"pass": "evaluate", "after": "ft", "params": {"latency": False}},
        "student": {"pass": "distill", "after": "ft", "params": {
            "teacher": "ft", "student": {"cut": {"num_layers": 1}},
            "weights": {"soft": 0, "hard": 0, "embedding": 1.0}, "train": STEPS}},
        "ds": {"pass": "ds_factorize", "after": "student",  # STF trained on the teacher's embeddings
               "params": {"block": 16, "atoms": 8, "nnz": 2, "iters": 1, "train": STEPS, "teacher": "ft",
                          "kd": {"soft": 0, "hard": 0.5, "embedding": 1.0}}},
        "int8": {"pass": "int8", "after": "ds", "params": {"backend": "torch", "embeddings": "int4"}},
        "pack": {"pass": "pack", "after": "int8", "params": {"target": "cpu"}},
        "eval": {"pass": "evaluate", "after": "pack", "params": {
            "latency_batch_size": 8, "latency_batches": 1, "latency_repeats": 1}},
    })
    assert result.stage("ft").metrics["train_steps"] == 3
    assert result.stage("student").metrics["train_steps"] == 3
    for stage in ("ft_eval", "eval"):
        m = result.stage(stage).metrics
        assert m["main_metric"] == "spearman" and -1 <= m["spearman"] <= 1
    assert result.stage("eval").metrics["model_bytes"] < result.stage("ft_eval").metrics["model_bytes"] / 2


def _eval_each(names):
    return {f"{n}_eval": {"pass": "evaluate", "after": n, "params": {"latency": False}} for n in names}


def test_engine_other_compression_passes(tmp_path, st_folder, stsb_dir):
    """lowrank, blocklr and dsf on the bi-encoder, each trained with the kind's loss and scored by Spearman."""
    train = {"train": STEPS}
    result = _run(tmp_path, st_folder, stsb_dir, {
        "original": {"pass": "finetune", "params": {"epochs": 0}},
        "svd": {"pass": "lowrank", "after": "original", "params": {"rank": 4, "calibration_samples": 8, **train}},
        "blocklr": {"pass": "blocklr", "after": "original", "params": {"ratio": 2.0, **train}},
        "dsf": {"pass": "dsf", "after": "original", "params": {"density": 0.5, "iters": 1, "calibration_samples": 8,
                                                               **train}},
        **_eval_each(("svd", "blocklr", "dsf")),
    })
    for stage in ("svd_eval", "blocklr_eval", "dsf_eval"):
        m = result.stage(stage).metrics
        assert m["main_metric"] == "spearman" and -1 <= m["spearman"] <= 1, (stage, m)


def test_engine_fisher_and_losparse(tmp_path, st_folder, stsb_dir):
    result = _run(tmp_path, st_folder, stsb_dir, {
        "original": {"pass": "finetune", "params": {"epochs": 0}},
        "fwsvd": {"pass": "lowrank", "after": "original", "params": {
            "method": "fwsvd", "rank": 4, "fisher_batches": 2, "fisher_batch_size": 4, "train": STEPS}},
        "losparse": {"pass": "losparse", "after": "original", "params": {"ratio": 2.0, "delta_t": 1, "train": STEPS}},
        **_eval_each(("fwsvd", "losparse")),
    })
    for stage in ("fwsvd_eval", "losparse_eval"):
        assert result.stage(stage).metrics["main_metric"] == "spearman"


def test_engine_config_built_student_learns_embeddings(tmp_path, st_folder, stsb_dir):
    """A fresh student built from a config (narrower than the teacher: the embedding MSE needs the
    same width, so it keeps 32) distils the teacher's embeddings and is scored by Spearman."""
    result = _run(tmp_path, st_folder, stsb_dir, {
        "original": {"pass": "finetune", "params": {"epochs": 0}},
        "fresh": {"pass": "distill", "after": "original", "params": {
            "teacher": "original", "weights": {"soft": 0, "hard": 0, "embedding": 1.0}, "train": STEPS,
            "student": {"config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "intermediate_size": 48}}}},
        **_eval_each(("fresh",)),
    })
    m = result.stage("fresh_eval").metrics
    assert m["main_metric"] == "spearman" and -1 <= m["spearman"] <= 1


def test_export_pass_writes_a_sentence_transformers_folder(tmp_path, st_folder, stsb_dir):
    """The export pass calls the kind's write_export_files: the folder loads in sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "exported"
    _run(tmp_path, st_folder, stsb_dir, {
        "original": {"pass": "finetune", "params": {"epochs": 0}},
        "exp": {"pass": "export", "after": "original", "params": {"path": str(out), "measure": False}},
    })
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    st = SentenceTransformer(str(out), device="cpu")
    import stackcomp

    ours = stackcomp.load(out)
    assert st.encode(["a small test sentence"]).shape[-1] == ours.config.hidden_size


def test_engine_distills_on_unlabeled_text(tmp_path, st_folder, stsb_dir):
    """``train.batches: unlabeled``: a student learns the teacher's embeddings from the train
    sentences plus the ``data.unlabeled`` files; one epoch is one pass over that corpus."""
    from stackcomp import run

    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join(f"An extra sentence about topic {i}." for i in range(21)) + "\n", encoding="utf-8")
    train_sentences = len({s for pair in PAIRS for s in pair[:2]})
    stages = {"original": {"pass": "finetune", "params": {"epochs": 0}},
              "kd": {"pass": "distill", "after": "original", "params": {
                  "teacher": "original", "student": {"cut": {"num_layers": 1}},
                  "weights": {"soft": 0, "hard": 0, "embedding": 1.0},
                  "train": {"epochs": 1, "batch_size": 8, "batches": "unlabeled"}}}}
    result = run({"name": "emb", "model": str(st_folder), "task": "embeddings/stsb", "evaluate_leaves": False,
                  "data": {"max_length": 32, "data_dir": str(stsb_dir), "unlabeled": [str(extra)]},
                  "stages": stages}, out=tmp_path / "run")
    assert result.ok, [(s.stage, s.error) for s in result.failed]
    assert result.stage("kd").metrics["train_steps"] == -(-(train_sentences + 21) // 8)
    lock = json.loads((tmp_path / "run" / "lock.json").read_text())
    assert [Path(f["path"]).name for f in lock["data"]["unlabeled"]] == ["extra.txt"]


def test_unlabeled_batches_without_a_teacher_loss_fail_clearly(tmp_path, st_folder, stsb_dir):
    from stackcomp import run

    result = run({"name": "emb", "model": str(st_folder), "task": "embeddings/stsb", "evaluate_leaves": False,
                  "data": {"max_length": 32, "data_dir": str(stsb_dir)},
                  "stages": {"ft": {"pass": "finetune", "params": {"max_steps": 1, "batches": "unlabeled"}}}},
                 out=tmp_path / "run")
    assert not result.ok
    assert "train.batches: unlabeled: there are no labels to learn from" in result.stage("ft").error


def test_fused_ffn_parity_compares_the_bi_encoders_embeddings(tmp_path, st_folder, stsb_dir):
    """pack's fuse_ffn check on a bi-encoder compares pooled embeddings (padding left out), not
    raw token states, and the fused model is scored like any other."""
    from stackcomp.kernels import ds_cpu

    if ds_cpu.get_extension() is None:
        pytest.skip("the C++ CPU kernel is not available here")
    result = _run(tmp_path, st_folder, stsb_dir, {
        "original": {"pass": "finetune", "params": {"epochs": 0}},
        "int8": {"pass": "int8", "after": "original", "params": {"backend": "torch"}},
        "fused": {"pass": "pack", "after": "int8", "params": {"target": "cpu", "fuse_ffn": True}},
        **_eval_each(("fused",))})
    report = json.loads((result.artifacts_dir / result.stage("fused").key / "report.json").read_text())
    parity = report["fuse_ffn_parity"]
    assert parity["compared"] == "embeddings" and parity["ffn_fused"] == 2
    assert parity["error_fused"] <= parity["error_unfused"] + parity["tolerance"]
    assert result.stage("fused_eval").metrics["main_metric"] == "spearman"
