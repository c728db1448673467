"""A training stage that asks the Ray executor for two processes (``resources: {num_cpus: 2,
processes: 2}``) trains as two accelerate processes inside its one Ray task, on a one-node
cluster of two CPUs started here (gloo): the same key and weights as the same recipe run locally
under ``accelerate launch --num_processes 2``, recorded as two processes; a stage whose
processes fail is a failed stage with rank 0's error, its log holding the processes' output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stackcomp.engine import Engine
from stackcomp.errors import RecipeError, StackcompError
from stackcomp.plan import build_plan
from stackcomp.recipe import recipe_from_dict
from stackcomp.rundir import CHECKSUMS

try:
    import ray
except ImportError:
    ray = None

TESTS = Path(__file__).resolve().parent
FAILING = "_mp_passes:FailingTrainPass"


def _recipe(model_dir: Path) -> dict:
    return {"name": "mp", "model": str(model_dir), "task": "glue/sst2",
            "data": {"max_train_samples": 32, "max_eval_samples": 16, "max_length": 32},
            "stages": {"ft": {"pass": "finetune", "params": {"train": {"max_steps": 4, "batch_size": 8}}}}}


def _weights(run_dir: Path, key: str) -> dict[str, str]:
    sums = json.loads((run_dir / "artifacts" / key / CHECKSUMS).read_text())
    return {f: v for f, v in sums.items() if f.startswith("model/")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(ray is None, reason="the Ray executor needs ray: pip install 'stackcomp[cluster]'")
def test_a_two_process_stage_on_ray_trains_as_accelerate_launch_does(tmp_path, tiny_model_dirs, tiny_glue,
                                                                      monkeypatch):
    from stackcomp.ray_executor import local_cluster

    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "STACKCOMP_DATA_DIR": str(tiny_glue)}.items():
        monkeypatch.setenv(k, v)
    recipe = _recipe(tiny_model_dirs["bert"])
    path = tmp_path / "mp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "stackcomp.cli", "run", str(path),
              "-o", str(tmp_path / "local"), "--json"]
    # the local run goes on while the cluster starts and runs (they mostly wait on process starts)
    local = subprocess.Popen(launch, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    recipe["stages"]["ft"]["resources"] = {"num_cpus": 2, "processes": 2}
    # one CPU: it runs beside ft.eval once ft is done (two processes of one thread each)
    recipe["stages"]["bad"] = {"pass": FAILING, "resources": {"num_cpus": 1, "processes": 2}}
    recipe["allow_plugins"] = [FAILING]
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cm = local_cluster(nodes=1, cpus_per_node=2, env=env, timeout=60)
    try:
        address = cm.__enter__()
    except StackcompError as e:  # a sandbox that cannot host a cluster
        pytest.skip(f"a local Ray cluster could not start here: {str(e).splitlines()[0]}")
    try:
        recipe["executor"] = {"kind": "ray", "address": address}
        summary = Engine(build_plan(recipe_from_dict(recipe)), tmp_path / "ray").run()
    finally:
        cm.__exit__(None, None, None)
        out, err = local.communicate(timeout=400)
    assert local.returncode == 0, out[-2000:] + err[-3000:]
    local_ft = next(s for s in json.loads(out)["stages"] if s["stage"] == "ft")

    ft = next(s for s in summary["stages"] if s["stage"] == "ft")
    assert ft["key"] == local_ft["key"]  # resources are not in the key
    assert _weights(tmp_path / "ray", ft["key"]) == _weights(tmp_path / "local", local_ft["key"])
    assert ft["metrics"]["train_processes"] == 2 == local_ft["metrics"]["train_processes"]
    assert ft["metrics"]["train_steps"] == 4
    assert ft["node"]  # it ran on the cluster
    # the follower wrote nothing: one artifact per finished stage
    assert {p.name for p in (tmp_path / "ray" / "artifacts").iterdir()} == {s["key"] for s in summary["stages"]}

    assert [(f["stage"], f["error"]) for f in summary["failed"]] == [("bad", "RuntimeError: boom in process 0")]
    log = (tmp_path / "ray" / "logs" / "bad.log").read_text()
    assert "RuntimeError: boom in process 0" in log  # rank 0's traceback
    assert "output of the stage's processes" in log and "ChildFailedError" in log  # then the launcher's output


def test_processes_are_not_in_the_key_and_only_training_stages_get_them(tiny_model_dirs):
    from stackcomp.ray_stage import stage_processes

    raw = _recipe(tiny_model_dirs["bert"])
    raw["stages"]["q"] = {"pass": "int8", "after": "ft", "params": {"backend": "torch"}}
    plain = build_plan(recipe_from_dict(raw))
    raw["stages"]["ft"]["resources"] = {"num_cpus": 4, "processes": 3}
    raw["stages"]["q"]["resources"] = {"processes": 2}
    placed = build_plan(recipe_from_dict(raw))
    assert {n: s.key for n, s in placed.stages.items()} == {n: s.key for n, s in plain.stages.items()}
    assert stage_processes(placed, placed.stages["ft"]) == 3
    assert stage_processes(placed, placed.stages["q"]) == 1  # int8 does not train: one process
    raw["stages"]["ft"]["resources"] = {"num_gpus": 4}
    gpus = build_plan(recipe_from_dict(raw))
    assert stage_processes(gpus, gpus.stages["ft"]) == 4  # one per GPU
    raw["stages"]["ft"]["params"]["train"]["max_steps"] = None
    raw["stages"]["ft"]["params"]["train"]["epochs"] = 0  # skips its training: nothing to shard
    skipped = build_plan(recipe_from_dict(raw))
    assert stage_processes(skipped, skipped.stages["ft"]) == 1
    raw["stages"]["ft"]["resources"] = {"num_gpus": 2, "processes": 4}
    with pytest.raises(RecipeError, match="processes"):
        recipe_from_dict(raw)
