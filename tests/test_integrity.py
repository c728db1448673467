"""Integrity that cannot be bypassed: an artifact holds exactly what its CHECKSUMS.json lists, and
the files its kind requires; a dropped entry, an extra file, a symbolic link or another stage's
artifact under a key is corrupt. ``stackcomp.load`` and report/compare check the same way.

tests/test_corrupt_artifacts.py covers files changed behind an intact CHECKSUMS.json.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _scale_pass import make_scale_pass
from typer.testing import CliRunner

import stackcomp
from stackcomp.artifacts import ArtifactStore, verify_folder
from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.errors import ArtifactError
from stackcomp.passes.base import Pass, register_pass
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict
from stackcomp.report import compare
from stackcomp.rundir import (
    EXPORT_KIND,
    REQUIRED_FILES,
    STAGE_WITH_MODEL,
    STAGE_WITHOUT_MODEL,
)

CALLS: list[str] = []
make_scale_pass("_integrity_scale", CALLS)


@register_pass
class _IntegrityLook(Pass):
    """Test pass: measures, keeps its parent's model (its artifact has model_from, no model/)."""

    name = "_integrity_look"
    changes_model = False

    def transform(self, model, ctx):
        CALLS.append(ctx.stage)
        ctx.metrics["looked"] = 1.0
        return model


STAGES = {"a": {"pass": "_integrity_scale", "params": {"factor": 2.0}},
          "b": {"pass": "_integrity_scale", "after": "a", "params": {"factor": 3.0}},
          "look": {"pass": "_integrity_look", "after": "b"}}


def _plan(model_dir, export_dir=None):
    stages = dict(STAGES)
    if export_dir is not None:
        stages["out"] = {"pass": "export", "after": "b", "params": {"path": str(export_dir)}}
    return build_plan(recipe_from_dict({"name": "integrity", "model": str(model_dir), "stages": stages}))


@pytest.fixture(scope="module")
def golden(tmp_path_factory, tiny_model_dirs):
    """One complete run (with an export folder), copied by each test."""
    root = tmp_path_factory.mktemp("golden")
    plan = _plan(tiny_model_dirs["bert"], root / "exported")
    Engine(plan, root / "run").run()
    return root, plan


@pytest.fixture
def run(golden, tmp_path):
    """(run dir, plan, store, export dir): a fresh copy of the golden run."""
    src, plan = golden
    shutil.copytree(src / "run", tmp_path / "run")
    shutil.copytree(src / "exported", tmp_path / "exported")
    CALLS.clear()
    return tmp_path / "run", plan, ArtifactStore(tmp_path / "run"), tmp_path / "exported"


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _sums(folder):
    return json.loads((folder / "CHECKSUMS.json").read_text())


def _drop_entry(folder, rel):
    sums = _sums(folder)
    del sums[rel]
    (folder / "CHECKSUMS.json").write_text(json.dumps(sums))


def _tokenizer_file(folder):
    return next(rel for rel in _sums(folder) if rel.startswith("model/tokenizer"))


def _rerun(run, plan, caplog):
    e = Engine(build_plan(plan.recipe), run)
    with caplog.at_level("WARNING", logger="stackcomp"):
        e.run()
    return e


# ----------------------------------------------------------------------------- what a kind holds


def test_the_golden_artifacts_are_intact_and_hold_their_kinds_files(run):
    _, plan, store, exported = run
    for name in ("a", "b", "look", "out"):
        assert store.verify(plan.stages[name].key) is None, name
    a, look = _sums(store.path(plan.stages["a"].key)), _sums(store.path(plan.stages["look"].key))
    assert set(REQUIRED_FILES[STAGE_WITH_MODEL]) <= set(a)
    assert "model/tokenizer.json" in a  # tokenizer files are listed too, though no kind requires them
    assert set(look) == set(REQUIRED_FILES[STAGE_WITHOUT_MODEL])
    assert set(REQUIRED_FILES[EXPORT_KIND]) <= set(_sums(exported))
    assert verify_folder(exported, EXPORT_KIND) is None


# ----------------------------------------------------------------------------- the engine: corrupt, recomputed


@pytest.mark.parametrize("rel", ["model/model.safetensors", "metrics.json", "report.json", "tokenizer"])
def test_dropped_entry_and_changed_file_is_corrupt_and_recomputed(run, caplog, rel):
    run_dir, plan, store, _ = run
    folder = store.path(plan.stages["a"].key)
    rel = _tokenizer_file(folder) if rel == "tokenizer" else rel
    _drop_entry(folder, rel)
    (folder / rel).write_bytes((folder / rel).read_bytes() + b" ")
    status = Engine(plan, run_dir).status()
    assert status["a"].startswith("corrupt") and rel in status["a"], status
    e = _rerun(run_dir, plan, caplog)
    assert e.stage_runs == ["a"] and CALLS == ["a"]
    assert "stage 'a'" in caplog.text and rel in caplog.text
    assert store.verify(plan.stages["a"].key) is None and rel in _sums(folder)


@pytest.mark.parametrize("where", ["extra.txt", "model/extra.bin", "model/sub/x"])
def test_extra_unlisted_file_is_corrupt(run, caplog, where):
    run_dir, plan, store, _ = run
    folder = store.path(plan.stages["b"].key)
    (folder / where).parent.mkdir(parents=True, exist_ok=True)
    (folder / where).write_text("not written by stackcomp")
    problem = store.verify(plan.stages["b"].key)
    assert problem is not None and "not listed" in problem and where.split("/")[0] in problem
    assert _rerun(run_dir, plan, caplog).stage_runs == ["b"]
    assert not (folder / where).exists()


def test_extra_empty_folder_is_corrupt(run):
    _, plan, store, _ = run
    (store.path(plan.stages["a"].key) / "model" / "junk").mkdir()
    assert "folder model/junk is not listed" in store.verify(plan.stages["a"].key)


def test_model_folder_in_a_stage_that_kept_its_parents_model_is_corrupt(run):
    _, plan, store, _ = run
    src, dst = store.path(plan.stages["b"].key), store.path(plan.stages["look"].key)
    shutil.copytree(src / "model", dst / "model")
    sums = _sums(dst)
    sums.update({k: v for k, v in _sums(src).items() if k.startswith("model/")})
    (dst / "CHECKSUMS.json").write_text(json.dumps(sums))
    assert "model/ is listed" in store.verify(plan.stages["look"].key)


def test_artifact_folder_replaced_by_a_symlink_to_an_intact_copy_is_corrupt(run, caplog, tmp_path):
    run_dir, plan, store, _ = run
    key = plan.stages["a"].key
    copy = tmp_path / "elsewhere"
    shutil.copytree(store.path(key), copy)
    shutil.rmtree(store.path(key))
    store.path(key).symlink_to(copy, target_is_directory=True)
    assert verify_folder(copy, "stage", key=key) is None  # the copy itself is intact
    assert "symbolic link" in Engine(plan, run_dir).status()["a"]
    assert _rerun(run_dir, plan, caplog).stage_runs == ["a"]
    assert not store.path(key).is_symlink() and store.verify(key) is None
    assert verify_folder(copy, "stage", key=key) is None  # the link's target was left alone


@pytest.mark.parametrize("rel", ["metrics.json", "model/model.safetensors", "model"])
def test_symlink_inside_an_artifact_is_corrupt(run, caplog, tmp_path, rel):
    run_dir, plan, store, _ = run
    folder = store.path(plan.stages["a"].key)
    target = tmp_path / "target"
    (shutil.copytree if (folder / rel).is_dir() else shutil.copy)(folder / rel, target)
    (shutil.rmtree if (folder / rel).is_dir() else lambda p: p.unlink())(folder / rel)
    (folder / rel).symlink_to(target)
    problem = store.verify(plan.stages["a"].key)
    assert problem is not None and "symbolic link" in problem and rel in problem
    assert _rerun(run_dir, plan, caplog).stage_runs == ["a"]


def test_intact_artifact_copied_under_another_key_is_corrupt(run, caplog):
    run_dir, plan, store, _ = run
    a, b = plan.stages["a"].key, plan.stages["b"].key
    shutil.rmtree(store.path(b))
    shutil.copytree(store.path(a), store.path(b))
    status = Engine(plan, run_dir).status()
    assert status["a"] == "cached"
    assert status["b"].startswith("corrupt") and "another stage's artifact" in status["b"] and a in status["b"]
    assert _rerun(run_dir, plan, caplog).stage_runs == ["b"]
    assert store.verify(b) is None and store.read(b, "stage.json")["key"] == b


# ----------------------------------------------------------------------------- stackcomp.load


def test_load_of_an_intact_artifact_its_model_folder_and_a_redirect(run):
    _, plan, store, _ = run
    b = stackcomp.load(store.path(plan.stages["b"].key))
    for path in (store.path(plan.stages["b"].key) / "model", store.path(plan.stages["look"].key)):
        again = stackcomp.load(path)
        assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("target", ["artifact", "model_folder", "redirect"])
def test_load_refuses_a_corrupt_weight(run, target):
    _, plan, store, _ = run
    folder = store.path(plan.stages["b"].key)
    _flip(folder / "model" / "model.safetensors")  # one bit in the tensor data: it would still load
    path = {"artifact": folder, "model_folder": folder / "model",
            "redirect": store.path(plan.stages["look"].key)}[target]
    with pytest.raises(ArtifactError, match="model/model.safetensors fails its checksum"):
        stackcomp.load(path)


def test_load_refuses_a_redirect_to_another_stages_artifact(run):
    _, plan, store, _ = run
    a, b = plan.stages["a"].key, plan.stages["b"].key
    shutil.rmtree(store.path(b))
    shutil.copytree(store.path(a), store.path(b))  # intact, but a's model
    with pytest.raises(ArtifactError, match="another stage's artifact"):
        stackcomp.load(store.path(plan.stages["look"].key))


def test_load_refuses_a_changed_tokenizer_unless_verify_false(run):
    _, plan, store, _ = run
    folder = store.path(plan.stages["a"].key)
    rel = _tokenizer_file(folder)
    (folder / rel).write_bytes((folder / rel).read_bytes() + b"extra\n")
    with pytest.raises(ArtifactError, match=f"{rel} has"):
        stackcomp.load(folder)
    model = stackcomp.load(folder, verify=False)  # the explicit opt-out
    assert isinstance(model, torch.nn.Module)


def test_load_refuses_a_dropped_entry_and_an_extra_file(run):
    _, plan, store, _ = run
    folder = store.path(plan.stages["a"].key)
    _drop_entry(folder, "model/config.json")
    with pytest.raises(ArtifactError, match="does not list model/config.json"):
        stackcomp.load(folder / "model")
    folder = store.path(plan.stages["b"].key)
    (folder / "model" / "evil.py").write_text("print('hi')")
    with pytest.raises(ArtifactError, match="model/evil.py is not listed"):
        stackcomp.load(folder)


def test_load_refuses_a_symlinked_artifact(run, tmp_path):
    _, plan, store, _ = run
    link = tmp_path / "link"
    link.symlink_to(store.path(plan.stages["a"].key), target_is_directory=True)
    with pytest.raises(ArtifactError, match="symbolic link"):
        stackcomp.load(link)


def test_export_folder_holds_checksums_and_load_verifies_it(run):
    _, plan, store, exported = run
    model = stackcomp.load(exported)
    ref = stackcomp.load(store.path(plan.stages["b"].key))
    assert all(torch.equal(x, y) for x, y in zip(ref.state_dict().values(), model.state_dict().values()))
    _flip(exported / "model.safetensors")
    with pytest.raises(ArtifactError, match="export folder .* model.safetensors fails its checksum"):
        stackcomp.load(exported)
    assert isinstance(stackcomp.load(exported, verify=False), torch.nn.Module)


def test_export_folder_with_an_extra_or_unlisted_file_is_refused(run):
    _, _, _, exported = run
    (exported / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="notes.txt is not listed"):
        stackcomp.load(exported)


def test_folder_without_checksums_is_refused_saying_how_to_opt_out(run):
    _, _, _, exported = run
    (exported / "CHECKSUMS.json").unlink()  # an export made before exports held checksums
    with pytest.raises(ArtifactError, match=r"no CHECKSUMS.json.*verify=False"):
        stackcomp.load(exported)
    assert isinstance(stackcomp.load(exported, verify=False), torch.nn.Module)


def test_save_writes_a_folder_load_verifies(tmp_path):
    from tests.conftest import make_tiny_model

    model = make_tiny_model("bert")
    folder = stackcomp.save(model, tmp_path / "m")
    assert verify_folder(folder, EXPORT_KIND) is None
    again = stackcomp.load(folder)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))
    stackcomp.save(model, folder)  # replaces the folder in one step
    assert verify_folder(folder, EXPORT_KIND) is None and not list(tmp_path.glob(".m*"))


# ----------------------------------------------------------------------------- report / compare


def test_compare_shows_na_with_the_reason_for_a_corrupt_weight(run):
    run_dir, plan, store, _ = run
    intact = compare([run_dir]).to_json()
    row = next(r for r in intact["rows"] if r["leaf"] == "b")
    assert row["model_bytes"] and not any("no size" in n for n in intact["notes"])
    _flip(store.path(plan.stages["b"].key) / "model" / "model.safetensors")
    data = compare([run_dir]).to_json()
    row = next(r for r in data["rows"] if r["leaf"] == "b")
    assert row["model_bytes"] is None and row["linear_bytes"] is None
    step = next(s for s in row["attribution"] if s["stage"] == "b")
    assert step["model_bytes"] is None and "fails its checksum" in step["sizes_error"]
    assert any("no size for integrity/b" in n and "model/model.safetensors fails its checksum" in n
               for n in data["notes"])


def test_compare_cli_prints_na_and_the_reason(run):
    run_dir, plan, store, _ = run
    _flip(store.path(plan.stages["b"].key) / "model" / "model.safetensors")
    r = CliRunner().invoke(app, ["compare", str(run_dir)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert "n/a" in r.stdout and "fails its checksum" in r.stdout.replace("\n", " ")
    r = CliRunner().invoke(app, ["compare", str(run_dir), "--json"])
    data = json.loads(r.stdout)
    assert next(x for x in data["rows"] if x["leaf"] == "b")["model_bytes"] is None
