"""What used to end in a traceback ends in one clear error: seeds out of range, a pickle that
torch's weights_only loading refuses, a full disk while the tokenizer is saved, a damaged model
folder given to ``stackcomp.load``, a recipe name that would leave ``runs/``, and two writers
committing one key at the same time."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

import stackcomp
from stackcomp.artifacts import ArtifactStore
from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.errors import ArtifactError, ModelError, RecipeError, StackcompError
from stackcomp.models import load_base_model
from stackcomp.passes.base import Pass, register_pass
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict
from stackcomp.rundir import CHECKSUMS, default_run_dir
from stackcomp.train import TrainConfig

runner = CliRunner()


@register_pass
class _Third(Pass):
    """Test pass: divides the classifier weight by three."""

    name = "_third"

    def transform(self, model, ctx):
        with torch.no_grad():
            model.classifier.weight.div_(3)
        return model


def _one_error_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
@pytest.mark.parametrize("stage", ["{pass: finetune, params: {seed: SEED}}", "{pass: int8, params: {seed: SEED}}",
                                   "{pass: ds_factorize, params: {ratio: 4, seed: SEED}}"])
def test_seed_out_of_range_is_refused_at_validate(tmp_path, seed, stage):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: s\nmodel: m\ntask: glue/sst2\nstages:\n  a: {stage.replace('SEED', str(seed))}\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 2, r.output
    line = _one_error_line(r)
    assert "seed" in line and ("greater than or equal to 0" in line or "less than 4294967296" in line), line


def test_train_config_seed_is_what_numpy_accepts():
    import numpy as np

    TrainConfig(seed=2**32 - 1)
    np.random.seed(2**32 - 1)  # the largest seed numpy (and accelerate's set_seed) accepts
    for bad in (-1, 2**32):
        with pytest.raises(ValidationError):
            TrainConfig(seed=bad)
        with pytest.raises(ValueError):
            np.random.seed(bad)


# ----------------------------------------------------------------------------- a malicious pickle


@pytest.fixture
def evil_pickle(tmp_path, tiny_model_dirs):
    """A model folder whose only weights are a pickle that runs a command when unpickled."""
    d = tmp_path / "evil"
    shutil.copytree(tiny_model_dirs["bert"], d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"bert.embeddings.word_embeddings.weight": Evil()}, d / "pytorch_model.bin")
    return d, marker


def test_malicious_pickle_is_refused_even_when_pickle_is_allowed(tmp_path, evil_pickle):
    d, marker = evil_pickle
    with pytest.raises(ModelError, match=r"pytorch_model\.bin: torch's weights_only loading refused it") as err:
        load_base_model(str(d), allow_pickle=True)
    assert "\n" not in str(err.value) and "allow_pickle: true" in str(err.value)
    p = tmp_path / "r.yaml"
    p.write_text(f"name: evil\nmodel: {d}\nallow_pickle: true\nstages: {{a: {{pass: _third}}}}\n")
    r = runner.invoke(app, ["run", str(p), "-o", str(tmp_path / "run")])
    assert r.exit_code == 1, r.output  # the first stage failed, recorded
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "weights_only" in errors[0] and "Traceback" not in r.output, r.output
    assert not marker.exists()  # the pickle's code never ran


# ----------------------------------------------------------------------------- a full disk while the tokenizer is saved


def test_disk_full_while_the_tokenizer_is_saved(tmp_path, tiny_model_dirs, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    real = PreTrainedTokenizerBase.save_pretrained

    def full(self, folder, *a, **kw):
        # what the Rust tokenizers library raises when tokenizer.json cannot be written
        raise Exception("No space left on device (os error 28)")  # noqa: TRY002

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    p = tmp_path / "r.yaml"
    p.write_text(f"name: tok\nmodel: {tiny_model_dirs['bert']}\nevaluate_leaves: false\nstages: {{a: {{pass: _third}}}}\n")
    run = tmp_path / "run"
    r = runner.invoke(app, ["run", str(p), "-o", str(run)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output  # a resource error stops the run
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]  # (after transformers' loading bars)
    line = lines[-1]
    assert [ln for ln in lines if ln.startswith("error: ")] == [line], r.stderr
    assert "stage 'a'" in line and "tokenizer.json" in line and "disk full" in line, line
    assert json.loads((run / "summary.json").read_text())["failed"][0]["stage"] == "a"
    assert not [d for d in (run / "artifacts").iterdir()]  # nothing half-written kept
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", real)
    r = runner.invoke(app, ["run", str(p), "-o", str(run), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout[r.stdout.index("{"):])["ran"] == ["a"], r.output


# ----------------------------------------------------------------------------- stackcomp.load on a damaged folder


@pytest.fixture
def saved_model(tmp_path, tiny_model_dirs):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs["bert"])
    return stackcomp.save(model, tmp_path / "saved")


@pytest.mark.parametrize("damage, needle", [
    ("truncate_weights", "model.safetensors"), ("delete_weights", "model.safetensors"),
    ("delete_config", "config.json"), ("empty_config", "config.json"),
])
@pytest.mark.parametrize("verify", [True, False])
def test_load_of_a_damaged_model_folder_names_the_file(saved_model, damage, needle, verify):
    folder = saved_model
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete_weights":
        weights.unlink()
    elif damage == "delete_config":
        config.unlink()
    else:
        config.write_text("")
    with pytest.raises(StackcompError, match=needle) as err:
        stackcomp.load(folder, verify=verify)
    assert isinstance(err.value, (ArtifactError, ModelError)) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- run names that leave runs/


@pytest.mark.parametrize("name", ["..", ".", "a/../..", "../outside", "/abs", "a\\b", "x\ty"])
def test_recipe_names_that_would_leave_runs_are_refused(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "r.yaml"
    p.write_text(f"name: {json.dumps(name)}\nmodel: m\nstages: {{a: {{pass: _third}}}}\n")
    for command in (["validate", str(p)], ["run", str(p)]):
        r = runner.invoke(app, command)
        assert r.exit_code == 2, r.output
        assert "recipe name" in _one_error_line(r)
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]  # nothing written, in runs/ or outside it


def test_default_run_dir_stays_inside_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKCOMP_RUNS", str(tmp_path / "runs"))
    for name in ("..", "."):
        with pytest.raises(RecipeError, match="cannot name a run folder"):
            default_run_dir(name)
    for name in ("a/../..", "../x", "ok.name", "ünï"):
        path = default_run_dir(name)
        assert path.parent == tmp_path / "runs" and path.name not in (".", ".."), path


# ----------------------------------------------------------------------------- two writers, one key


@pytest.fixture
def artifact(tmp_path, tiny_model_dirs):
    """A committed artifact (from a real run) and its key."""
    plan = build_plan(recipe_from_dict({"name": "c", "model": str(tiny_model_dirs["bert"]), "evaluate_leaves": False,
                                        "stages": {"a": {"pass": "_third"}}}))
    Engine(plan, tmp_path / "first").run()
    key = plan.stages["a"].key
    return ArtifactStore(tmp_path / "first").path(key), key


def _writer_copy(store: ArtifactStore, source, key):
    """A temporary folder holding what a second writer of the same stage would write."""
    tmp = store.begin(key)
    shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CHECKSUMS))
    return tmp


def test_commit_finds_an_intact_artifact_committed_first(tmp_path, artifact):
    source, key = artifact
    store = ArtifactStore(tmp_path / "shared")
    first, second = _writer_copy(store, source, key), _writer_copy(store, source, key)
    final = store.commit(key, first)
    stamp = (final / CHECKSUMS).stat().st_ino
    assert store.commit(key, second) == final  # the second writer keeps the first's artifact
    assert (final / CHECKSUMS).stat().st_ino == stamp and store.verify(key) is None
    assert not second.exists() and [p.name for p in store.root.iterdir()] == [key]


def test_commit_survives_losing_the_rename_race(tmp_path, artifact, monkeypatch):
    """The other writer renames its copy in between our check and our rename: ENOTEMPTY."""
    source, key = artifact
    store = ArtifactStore(tmp_path / "shared")
    ours, theirs = _writer_copy(store, source, key), _writer_copy(store, source, key)
    real = os.replace
    seen = []

    def racing(src, dst, *a, **kw):
        if os.fspath(src) == os.fspath(ours) and not seen:
            seen.append(1)
            ArtifactStore(tmp_path / "shared").commit(key, theirs)  # the other process wins
            try:
                real(src, dst, *a, **kw)
            except OSError as e:
                assert e.errno in (errno.ENOTEMPTY, errno.EEXIST)
                raise
            raise AssertionError("renaming onto a non-empty folder should fail")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", racing)
    final = store.commit(key, ours)
    assert seen and store.verify(key) is None and not ours.exists()
    assert [p.name for p in store.root.iterdir()] == [key] and final == store.path(key)


def test_threads_committing_one_key_never_raise(tmp_path, artifact):
    source, key = artifact
    store = ArtifactStore(tmp_path / "shared")
    for _ in range(5):
        store.discard(key)
        tmps = [_writer_copy(store, source, key) for _ in range(4)]
        barrier, errors = threading.Barrier(len(tmps)), []

        def commit(tmp, barrier=barrier, errors=errors):
            barrier.wait()
            try:
                store.commit(key, tmp)
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

        threads = [threading.Thread(target=commit, args=(t,)) for t in tmps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and store.verify(key) is None
        assert [p.name for p in store.root.iterdir()] == [key]
    assert stackcomp.load(store.path(key)) is not None


def test_commit_still_raises_a_full_disk(tmp_path, artifact, monkeypatch):
    source, key = artifact
    store = ArtifactStore(tmp_path / "shared")
    tmp = _writer_copy(store, source, key)

    def full(src, dst, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as err:
        store.commit(key, tmp)
    assert err.value.errno == errno.ENOSPC


def test_the_same_recipe_with_an_ordinary_name_validates(tmp_path, tiny_model_dirs):
    """So the refusals above are about the name and nothing else."""
    p = tmp_path / "r.yaml"
    p.write_text(f"name: fine-name_1.0\nmodel: {tiny_model_dirs['bert']}\nstages: {{a: {{pass: _third}}}}\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 0, r.output
