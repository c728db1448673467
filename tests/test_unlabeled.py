"""``data.unlabeled``: text files that distillation learns from (``train.batches: unlabeled``).
Reading each format, the errors a user sees, where relative paths are looked up, and what the
files change in stage keys. The engine runs are in tests/test_task_embeddings.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from stackcomp.data import DataOptions
from stackcomp.data.unlabeled import UnlabeledSource, corpus, read_sentences, resolve_path
from stackcomp.errors import DataError

TSV = 'sentence\tlabel\nit\'s a "charming" film\t1\nflat and dull\t0\n\t1\nflat and dull\t0\n'


def source(**kw) -> UnlabeledSource:
    return UnlabeledSource.model_validate(kw)


def test_each_format_reads_its_column_dedups_and_skips_blanks(tmp_path):
    (tmp_path / "a.txt").write_text("one line\n\n  two line \none line\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text(TSV, encoding="utf-8")
    (tmp_path / "c.csv").write_text('id,text\n1,"a, quoted ""field"""\n2,plain\n', encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "why?"}) + "\n\n" + json.dumps({"question": "how?"}) + "\n",
                                      encoding="utf-8")
    assert read_sentences(source(path=str(tmp_path / "a.txt"))) == ["one line", "two line"]
    # GLUE layout: quoting off, so quote characters stay in the text
    assert read_sentences(source(path=str(tmp_path / "b.tsv"))) == ['it\'s a "charming" film', "flat and dull"]
    assert read_sentences(source(path=str(tmp_path / "c.csv"), column="text")) == ['a, quoted "field"', "plain"]
    assert read_sentences(source(path=str(tmp_path / "d.jsonl"), column="question")) == ["why?", "how?"]


def test_max_sentences_is_a_seeded_subset_in_file_order(tmp_path):
    lines = [f"sentence number {i}" for i in range(50)]
    (tmp_path / "a.txt").write_text("\n".join(lines), encoding="utf-8")
    s = source(path=str(tmp_path / "a.txt"), max_sentences=10)
    first, again, other = (read_sentences(s, seed=1), read_sentences(s, seed=1), read_sentences(s, seed=2))
    assert len(first) == 10 and first == again and first != other
    assert first == sorted(first, key=lines.index)  # file order kept


def test_bare_string_is_a_path_and_bad_sources_are_rejected_with_the_path():
    assert UnlabeledSource.model_validate("x/y.txt").path == "x/y.txt"
    with pytest.raises(ValidationError, match=r"'notes\.md': unknown format '\.md'"):
        UnlabeledSource.model_validate("notes.md")
    with pytest.raises(ValidationError, match="one sentence a line, no column"):
        UnlabeledSource.model_validate({"path": "a.txt", "column": "text"})
    with pytest.raises(ValidationError, match="max_sentences"):
        UnlabeledSource.model_validate({"path": "a.txt", "max_sentences": 0})
    opts = DataOptions.model_validate({"unlabeled": ["a.txt", {"path": "b.tsv", "column": "sentence1"}]})
    assert [s.path for s in opts.unlabeled] == ["a.txt", "b.tsv"]


def test_clear_errors_name_the_file_and_what_was_expected(tmp_path):
    (tmp_path / "b.tsv").write_text(TSV, encoding="utf-8")
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    (tmp_path / "e.jsonl").write_text('{"other": "x"}\n', encoding="utf-8")
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"b\.tsv: no column 'text' in the header \(sentence, label\)"):
        read_sentences(source(path=str(tmp_path / "b.tsv"), column="text"))
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: not JSON"):
        read_sentences(source(path=str(tmp_path / "d.jsonl")))
    with pytest.raises(DataError, match=r"e\.jsonl, line 1: no text field 'text'"):
        read_sentences(source(path=str(tmp_path / "e.jsonl")))
    with pytest.raises(DataError, match=r"blank\.txt: no sentences"):
        read_sentences(source(path=str(tmp_path / "blank.txt")))
    with pytest.raises(DataError, match=r"latin\.txt: not UTF-8"):
        read_sentences(source(path=str(tmp_path / "latin.txt")))
    with pytest.raises(DataError, match=r"file 'missing\.txt' not found \(looked in .*missing\.txt"):
        read_sentences(source(path="missing.txt"), data_dir=tmp_path)


def test_relative_paths_look_in_the_data_folder_first_then_the_working_directory(tmp_path, monkeypatch):
    data, work = tmp_path / "data", tmp_path / "work"
    for folder, text in ((data, "from data"), (work, "from work")):
        folder.mkdir()
        (folder / "both.txt").write_text(text, encoding="utf-8")
    (work / "only_work.txt").write_text("work only", encoding="utf-8")
    monkeypatch.chdir(work)
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(data))
    assert resolve_path(source(path="both.txt"), data_dir=None) == data / "both.txt"  # the env's data folder
    assert resolve_path(source(path="both.txt"), data_dir=work) == work / "both.txt"  # data.data_dir wins
    assert read_sentences(source(path="only_work.txt"), data_dir=data) == ["work only"]


def test_corpus_puts_the_task_sentences_first_and_dedups_across_files(tmp_path):
    (tmp_path / "a.txt").write_text("shared\nfrom a\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("from b\nshared\nfrom a\n", encoding="utf-8")
    got = corpus(["task one", "shared"], [source(path="a.txt"), source(path="b.txt")], tmp_path, seed=0)
    assert got == ["task one", "shared", "from a", "from b"]


# ----------------------------------------------------------------------------- stage keys


def _keys(recipe: dict) -> dict[str, str]:
    from stackcomp.plan import build_plan
    from stackcomp.recipe import recipe_from_dict

    plan = build_plan(recipe_from_dict(recipe))
    return {name: stage.key for name, stage in plan.stages.items()}


def _recipe(folder: Path, data_dir: Path, unlabeled: list | None) -> dict:
    data = {"data_dir": str(data_dir), "max_length": 32, **({"unlabeled": unlabeled} if unlabeled is not None else {})}
    return {"name": "u", "model": str(folder), "task": "embeddings/stsb", "evaluate_leaves": False, "data": data,
            "stages": {"original": {"pass": "finetune", "params": {"epochs": 0}},
                       "kd": {"pass": "distill", "after": "original", "params": {
                           "teacher": "original", "student": {"cut": {"num_layers": 1}},
                           "weights": {"soft": 0, "hard": 0, "embedding": 1.0},
                           "train": {"max_steps": 1, "batches": "unlabeled"}}}}}


def test_keys_follow_the_files_content_not_their_place(tmp_path, tiny_model_dirs):
    from tests.test_task_embeddings import write_stsb

    folder = tiny_model_dirs["bert"]
    one, two = write_stsb(tmp_path / "one"), write_stsb(tmp_path / "two")
    for root in (one, two):
        (root / "extra.txt").write_text("an extra sentence\nanother one\n", encoding="utf-8")
    without = _keys(_recipe(folder, one, None))
    assert without == _keys(_recipe(folder, one, []))  # no files: the keys of a recipe without the field
    with_files = _keys(_recipe(folder, one, ["extra.txt"]))
    assert with_files["kd"] != without["kd"]
    assert _keys(_recipe(folder, two, ["extra.txt"])) == with_files  # same content elsewhere: same keys
    assert _keys(_recipe(folder, one, [{"path": "extra.txt", "max_sentences": 1}]))["kd"] != with_files["kd"]
    (two / "extra.txt").write_text("an extra sentence\nchanged\n", encoding="utf-8")
    assert _keys(_recipe(folder, two, ["extra.txt"]))["kd"] != with_files["kd"]


def test_a_missing_file_is_a_plan_time_error_naming_it(tmp_path, tiny_model_dirs):
    from stackcomp.plan import build_plan, check_inputs
    from stackcomp.recipe import recipe_from_dict
    from tests.test_task_embeddings import write_stsb

    root = write_stsb(tmp_path)
    plan = build_plan(recipe_from_dict(_recipe(tiny_model_dirs["bert"], root, ["nowhere.txt"])))
    with pytest.raises(DataError, match="data.unlabeled: file 'nowhere.txt' not found"):
        check_inputs(plan)
    # a column that is not there is found before the run too (the header and the first JSONL row)
    (root / "t.tsv").write_text(TSV, encoding="utf-8")
    (root / "j.jsonl").write_text('{"question": "why?"}\n', encoding="utf-8")
    for source, message in (({"path": "t.tsv", "column": "text"}, r"t\.tsv: no column 'text' in the header"),
                            ("j.jsonl", r"j\.jsonl, first row: no text field 'text'")):
        plan = build_plan(recipe_from_dict(_recipe(tiny_model_dirs["bert"], root, [source])))
        with pytest.raises(DataError, match=message):
            check_inputs(plan)


def _glue_distill(tmp_path, folder, task, unlabeled=None):
    from stackcomp import run

    data = {"max_length": 32, **({"unlabeled": unlabeled} if unlabeled else {})}
    return run({"name": "g", "model": str(folder), "task": task, "evaluate_leaves": False, "data": data,
                "stages": {"kd": {"pass": "distill", "params": {
                    "teacher": str(folder), "student": {"cut": {"num_layers": 1}},
                    "weights": {"soft": 1.0, "hard": 0},
                    "train": {"epochs": 1, "batch_size": 16, "batches": "unlabeled"}}}}}, out=tmp_path / "run")


def test_a_single_sentence_glue_task_distills_on_unlabeled_text(tmp_path, tiny_model_dirs, data_env):
    """SST-2's train sentences plus a file, soft targets only: one epoch is one pass over both."""
    from stackcomp.data.glue import get_task, load_split

    extra = tmp_path / "reviews.txt"
    extra.write_text("\n".join(f"an unlabeled review number {i}" for i in range(40)) + "\n", encoding="utf-8")
    train = set(load_split(get_task("glue/sst2"), "train", data_env)["sentence"])
    result = _glue_distill(tmp_path, tiny_model_dirs["bert"], "glue/sst2", [str(extra)])
    assert result.ok, [(s.stage, s.error) for s in result.failed]
    assert result.stage("kd").metrics["train_steps"] == -(-(len(train) + 40) // 16)


def test_pair_tasks_and_kinds_without_unlabeled_batches_say_so(tmp_path, tiny_model_dirs, data_env):
    from types import SimpleNamespace

    from stackcomp.errors import PlanError
    from stackcomp.train import TrainConfig, training_batches

    result = _glue_distill(tmp_path, tiny_model_dirs["bert"], "glue/rte")
    assert not result.ok
    assert "glue/rte takes sentence pairs" in result.stage("kd").error
    ctx = SimpleNamespace(data=object(), task=SimpleNamespace(name="ner/conll2003"), stage="kd")
    with pytest.raises(PlanError, match="task ner/conll2003 has no unlabeled batches"):
        training_batches(ctx, TrainConfig(batches="unlabeled"), augment=None, has_loss=True)
