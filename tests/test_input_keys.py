"""Stage keys cover the inputs: a changed data file or model file reruns exactly the stages that
read it and their descendants; task aliases share keys; missing or unknown inputs fail at plan
time with the message a run gives; file hashes are cached."""

import json
import shutil
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from stackcomp import fingerprint
from stackcomp.cli import app
from stackcomp.engine import Engine
from stackcomp.errors import DataError, ModelError
from stackcomp.passes.base import Pass, PassParams, register_pass
from stackcomp.plan import build_plan, check_inputs
from stackcomp.recipe import recipe_from_dict

runner = CliRunner()


@register_pass
class _NoDataPass(Pass):
    """Test pass: scales the classifier and never touches ``ctx.data``."""

    name = "_test_no_data"
    Params = PassParams
    reads_data = False

    def transform(self, model, ctx):
        with torch.no_grad():
            model.classifier.weight.mul_(2.0)
        return model


#: a (no data) -> b (no data); a -> ft (reads data) -> ev (reads data)
STAGES = {
    "a": {"pass": "_test_no_data"},
    "b": {"pass": "_test_no_data", "after": "a"},
    "ft": {"pass": "finetune", "after": "a", "params": {"max_steps": 2, "batch_size": 16, "lr": 1.0e-3}},
    "ev": {"pass": "evaluate", "after": "ft"},
}


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(fingerprint.HASH_CACHE_ENV, str(tmp_path / "file-hashes.json"))


def _recipe(model, task="glue/sst2", stages=STAGES, **kw):
    return recipe_from_dict({"name": "t", "model": str(model), "task": task, "data": {"max_length": 32},
                             "evaluate_leaves": False, "stages": stages, **kw})


def _run(model_dir, run_dir):
    return Engine(build_plan(_recipe(model_dir)), run_dir).run()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_flipped_dev_label_reruns_the_stages_that_read_the_data(tmp_path, tiny_model_dirs, tiny_glue, monkeypatch):
    model = _copy(tiny_model_dirs["bert"], tmp_path / "model")
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(tiny_glue))
    first = _run(model, tmp_path / "run")
    assert sorted(first["ran"]) == ["a", "b", "ev", "ft"]
    assert _run(model, tmp_path / "run")["ran"] == []

    # the same data elsewhere: content, not location, is the input
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(_copy(tiny_glue, tmp_path / "same")))
    assert _run(model, tmp_path / "run")["ran"] == []

    flipped = _copy(tiny_glue, tmp_path / "flipped")
    dev = flipped / "glue" / "SST-2" / "dev.tsv"
    header, row, *rest = dev.read_text().splitlines(keepends=True)
    sentence, label = row.rstrip("\n").rsplit("\t", 1)
    dev.write_text(header + f"{sentence}\t{1 - int(label)}\n" + "".join(rest))  # same size, one label flipped
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(flipped))
    second = _run(model, tmp_path / "run")
    assert sorted(second["ran"]) == ["ev", "ft"]  # a and b never read the data: cached


def test_changed_model_file_reruns_every_stage(tmp_path, tiny_model_dirs, data_env):
    assert sorted(_run(tiny_model_dirs["bert"], tmp_path / "run")["ran"]) == ["a", "b", "ev", "ft"]
    model = _copy(tiny_model_dirs["bert"], tmp_path / "model")
    assert _run(model, tmp_path / "run")["ran"] == []  # the same files elsewhere: the same model
    weights = model / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    data_start = 8 + int.from_bytes(blob[:8], "little")
    blob[data_start] ^= 0x01  # the lowest mantissa byte of the first weight: loads fine, is another model
    weights.write_bytes(bytes(blob))
    assert sorted(_run(model, tmp_path / "run")["ran"]) == ["a", "b", "ev", "ft"]  # all descend from the model


def test_task_aliases_share_keys(tmp_path, monkeypatch):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "glue" / "STS-B").is_dir():
        pytest.skip(f"shared GLUE data not found at {SHARED_DATA}")
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(SHARED_DATA))
    stages = {"ft": {"pass": "finetune"}}
    keys = [{n: s.key for n, s in build_plan(_recipe("m", task=t, stages=stages)).stages.items()}
            for t in ("glue/sts-b", "glue/stsb", "STS-B", "stsb")]
    assert keys[0] == keys[1] == keys[2] == keys[3]
    assert keys[0] != {n: s.key for n, s in build_plan(_recipe("m", task="glue/rte", stages=stages)).stages.items()}


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_unknown_task_fails_at_validate_and_plan(tmp_path, command):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent("""
        name: demo
        model: minilm-l6
        task: glue/mrcp
        stages: {ft: {pass: finetune}}
    """))
    r = runner.invoke(app, [command, str(p), *(["-o", str(tmp_path / "run")] if command == "plan" else [])])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert "unknown task 'glue/mrcp'" in out and "did you mean 'glue/mrpc'?" in out and "glue/sst2" in out
    assert "Traceback" not in r.output


def _validate(tmp_path, model, task="glue/sst2"):
    p = tmp_path / "r.yaml"
    p.write_text(json.dumps({"name": "demo", "model": str(model), "task": task,
                             "stages": {"ft": {"pass": "finetune"}}}))
    return runner.invoke(app, ["validate", str(p)])


def test_missing_data_fails_at_validate_with_the_run_message(tmp_path, tiny_model_dirs, monkeypatch):
    from stackcomp.data import load_split

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(empty))
    r = _validate(tmp_path, tiny_model_dirs["bert"])
    assert r.exit_code == 2, r.output
    with pytest.raises(DataError) as run_error:  # what the run's data loading raises
        load_split("glue/sst2", "train")
    assert " ".join(str(run_error.value).split()) in " ".join(r.output.split())


def test_missing_model_fails_at_validate(tmp_path, data_env):
    from stackcomp.models import load_base_model

    r = _validate(tmp_path, tmp_path / "no-such-model")
    assert r.exit_code == 2 and "is not a local folder" in r.output and "no-such-model" in r.output

    folder = tmp_path / "not-a-model"
    folder.mkdir()
    r = _validate(tmp_path, folder)
    assert r.exit_code == 2 and f"cannot load model from folder {folder}" in " ".join(r.output.split())

    # a hub id while offline (conftest sets HF_HUB_OFFLINE=1) that is not in the local cache
    r = _validate(tmp_path, "stackcomp-test/not-cached")
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "not in the local Hugging Face cache" in out
    with pytest.raises(ModelError) as run_error:  # what the run's model loading raises
        load_base_model("stackcomp-test/not-cached")
    prefix = str(run_error.value).split(":")[0]  # "model '...' is not a local folder and could not be loaded from ..."
    assert prefix in out


def test_present_inputs_pass_the_checks(tiny_model_dirs, data_env):
    check_inputs(build_plan(_recipe(tiny_model_dirs["bert"])))


def test_unchanged_files_are_not_hashed_again(tmp_path, tiny_model_dirs, tiny_glue, monkeypatch):
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", 0)  # cache files written just now
    data = _copy(tiny_glue, tmp_path / "data")
    (data / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "a fine film .\t1\n" * 200_000)
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(data))
    hashed = []
    real = fingerprint.hash_file
    monkeypatch.setattr(fingerprint, "hash_file", lambda path: hashed.append(path.name) or real(path))
    first = build_plan(_recipe(tiny_model_dirs["bert"]))
    assert {"train.tsv", "dev.tsv", "model.safetensors", "config.json"} <= set(hashed)
    hashed.clear()
    second = build_plan(_recipe(tiny_model_dirs["bert"]))
    assert hashed == [] and second.stages["ev"].key == first.stages["ev"].key
    dev = data / "glue" / "SST-2" / "dev.tsv"
    dev.write_text(dev.read_text() + "one more .\t0\n")
    assert build_plan(_recipe(tiny_model_dirs["bert"])).stages["ev"].key != first.stages["ev"].key
    assert hashed == ["dev.tsv"]  # only the changed file


def test_uncached_hub_model_while_online_is_keyed_unresolved_and_said(tiny_glue, monkeypatch, caplog):
    monkeypatch.setenv("STACKCOMP_DATA_DIR", str(tiny_glue))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: the hub may have it, nothing is asked at plan time
    plan = build_plan(_recipe("stackcomp-test/not-cached", stages={"ft": {"pass": "finetune"}}))
    assert plan.inputs.model == {"spec": "stackcomp-test/not-cached", "revision": fingerprint.UNRESOLVED}
    with caplog.at_level("WARNING", logger="stackcomp"):
        check_inputs(plan)
    assert "'stackcomp-test/not-cached'" in caplog.text and "'unresolved'" in caplog.text
