"""Students: cut from a model (BERT, DistilBERT, ALBERT), fresh from a config, loaded from a folder."""

import pytest
import torch
from transformers import AutoTokenizer

from stackcomp.artifacts import export_model, load_model
from stackcomp.distill.students import cut_student, default_keep, student_from_config, student_from_pretrained
from stackcomp.errors import ModelError, RecipeError
from tests.conftest import make_tiny_model


def _deep(kind: str, layers: int = 4):
    from transformers import AutoModelForSequenceClassification

    from tests.conftest import _tiny_config

    cfg = _tiny_config(kind)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def _inputs(n=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_default_keep_is_every_other_layer():
    assert default_keep(6) == [0, 2, 4]
    assert default_keep(12) == [0, 2, 4, 6, 8, 10]
    assert default_keep(6, 3) == [0, 2, 4]
    assert default_keep(12, 4) == [0, 3, 6, 9]
    with pytest.raises(RecipeError, match="1..6"):
        default_keep(6, 7)


@pytest.mark.parametrize("kind,path", [("bert", "bert.encoder.layer"), ("distilbert", "distilbert.transformer.layer")])
def test_cut_copies_the_kept_layers_and_leaves_the_teacher_alone(kind, path):
    teacher = _deep(kind, 4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, note = cut_student(teacher, [0, 3])
    assert note["kept"] == [0, 3] and student.config.num_hidden_layers == 2
    t_layers, s_layers = teacher.get_submodule(path), student.get_submodule(path)
    assert len(s_layers) == 2 and len(t_layers) == 4
    for si, ti in ((0, 0), (1, 3)):
        for (n, a), (_, b) in zip(s_layers[si].named_parameters(), t_layers[ti].named_parameters()):
            assert torch.equal(a, b), n
            assert a.data_ptr() != b.data_ptr()  # a copy, not shared storage
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    x = _inputs()
    with torch.no_grad():
        out = student(**x, output_hidden_states=True)
        assert len(out.hidden_states) == 3  # embeddings + 2 layers; the first layer is the teacher's first
        assert torch.allclose(out.hidden_states[1], teacher(**x, output_hidden_states=True).hidden_states[1], atol=1e-6)


def test_cut_student_survives_save_and_load(tmp_path):
    student, _ = cut_student(_deep("bert", 4))
    export_model(student, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config.num_hidden_layers == 2
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(back(**x).logits, student.eval()(**x).logits, atol=1e-6)


def test_cut_albert_reduces_applications_of_the_shared_layer():
    teacher = _deep("albert", 4)
    student, note = cut_student(teacher, [0, 1, 2])
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 4
    assert "shares" in note["albert"]
    n_t = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in student.parameters()) == n_t  # shared weights: same storage, fewer passes
    x = _inputs()
    with torch.no_grad():
        hs = student(**x, output_hidden_states=True).hidden_states
        ht = teacher(**x, output_hidden_states=True).hidden_states
    assert len(hs) == 4 and len(ht) == 5
    assert torch.allclose(hs[3], ht[3], atol=1e-5)  # the same shared layer applied 3 times


def test_cut_refuses_a_narrower_width_and_bad_layers():
    teacher = _deep("bert", 4)
    with pytest.raises(ModelError, match="keeps its teacher's width"):
        cut_student(teacher, hidden_size=16)
    cut_student(teacher, hidden_size=32)  # equal width is fine
    with pytest.raises(RecipeError, match="out of range"):
        cut_student(teacher, [0, 4])
    with pytest.raises(RecipeError, match="increasing"):
        cut_student(teacher, [2, 1])
    with pytest.raises(RecipeError, match="num_layers is 3"):
        cut_student(teacher, [0, 1], count=3)


def test_student_from_config_inherits_vocab_and_labels():
    ref = make_tiny_model("bert", num_labels=3)
    spec = {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 24, "intermediate_size": 40,
            "num_attention_heads": 3}
    student, note = student_from_config(spec, ref, seed=1)
    assert note == {"kind": "config", "model_type": "bert", "layers": 1, "hidden_size": 24}
    assert student.config.vocab_size == ref.config.vocab_size
    assert student.config.max_position_embeddings == ref.config.max_position_embeddings
    assert student.config.num_labels == 3
    assert student(**_inputs()).logits.shape == (2, 3)
    again, _ = student_from_config(spec, ref, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), again.parameters()))  # seeded


@pytest.mark.parametrize("spec", [
    {"model_type": "albert", "num_hidden_layers": 2, "hidden_size": 24, "embedding_size": 8,
     "intermediate_size": 40, "num_attention_heads": 2},
    {"model_type": "distilbert", "n_layers": 2, "dim": 24, "hidden_dim": 40, "n_heads": 2},
])
def test_student_from_config_other_architectures(spec):
    ref = make_tiny_model("bert")
    student, note = student_from_config(spec, ref)
    assert note["layers"] == 2 and note["hidden_size"] == 24
    assert student.config.vocab_size == ref.config.vocab_size
    assert student(**_inputs()).logits.shape == (2, 2)


def test_student_from_config_has_the_task_head():
    """A config-built student gets the recipe task's head: per-token tags for NER, start/end for
    QA, a bare encoder that pools as the teacher does for embeddings (not a sequence classifier)."""
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForTokenClassification

    from stackcomp.tasks import get_task
    from stackcomp.tasks.embeddings import POOLING_ATTR
    from tests.conftest import _tiny_config

    spec = {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 24, "intermediate_size": 40,
            "num_attention_heads": 3}
    labels = ["O", "B-PER", "I-PER"]
    config = _tiny_config("bert")
    config.id2label, config.label2id = dict(enumerate(labels)), {n: i for i, n in enumerate(labels)}
    tagger = AutoModelForTokenClassification.from_config(config)
    student, _ = student_from_config(spec, tagger, task=get_task("ner/conll2003"))
    assert type(student).__name__ == "BertForTokenClassification"
    assert student.config.id2label == tagger.config.id2label
    assert student(**_inputs()).logits.shape == (2, 9, 3)
    reader = AutoModelForQuestionAnswering.from_config(_tiny_config("bert"))
    student, _ = student_from_config(spec, reader, task=get_task("qa/squad"))
    assert student(**_inputs()).start_logits.shape == (2, 9)
    encoder = AutoModel.from_config(_tiny_config("bert"))
    setattr(encoder.config, POOLING_ATTR, {"mode": "cls", "normalize": True})
    student, _ = student_from_config(spec, encoder, task=get_task("embeddings/stsb"))
    assert type(student).__name__ == "BertModel"
    assert getattr(student.config, POOLING_ATTR) == {"mode": "cls", "normalize": True}


def test_student_from_config_errors_name_the_field():
    ref = make_tiny_model("bert")
    with pytest.raises(RecipeError, match="model_type"):
        student_from_config({"hidden_size": 24}, ref)
    with pytest.raises(RecipeError, match="not a Hugging Face architecture"):
        student_from_config({"model_type": "nonesuch"}, ref)
    with pytest.raises(RecipeError, match="hiden_size"):
        student_from_config({"model_type": "bert", "hiden_size": 24}, ref)
    with pytest.raises(RecipeError, match="multiple of num_attention_heads"):
        student_from_config({"model_type": "bert", "hidden_size": 25, "num_attention_heads": 2}, ref)


def test_student_from_pretrained_checks_the_tokenizer(tmp_path, tiny_model_dirs, minilm_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    student, note = student_from_pretrained(str(tiny_model_dirs["albert"]), None, tok)
    assert note["kind"] == "model" and note["layers"] == 2
    other = tmp_path / "other"
    make_tiny_model("bert").save_pretrained(other)
    tok2 = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    tok2.add_tokens(["zzzunseen"])
    tok2.save_pretrained(other)
    with pytest.raises(ModelError, match="different tokenizer"):
        student_from_pretrained(str(other), None, tok)
