"""``accelerate launch --num_processes 2 stackcomp run``: both processes train, only the main
process writes artifacts and prints (stackcomp.distributed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_writes_once_and_prints_one_document(tmp_path, tiny_model_dirs, tiny_glue):
    recipe = {"name": "mp", "model": str(tiny_model_dirs["bert"]), "task": "glue/sst2",
              "data": {"max_train_samples": 32, "max_eval_samples": 16, "max_length": 32},
              "stages": {"ft": {"pass": "finetune", "params": {"train": {"max_steps": 4, "batch_size": 8}}},
                         "q": {"pass": "int8", "after": "ft", "params": {"backend": "torch"}}}}
    path = tmp_path / "mp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    follower_tmp = tmp_path / "tmp"
    follower_tmp.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", STACKCOMP_DATA_DIR=str(tiny_glue), TMPDIR=str(follower_tmp))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "stackcomp.cli", "run", str(path),
              "-o", str(tmp_path / "run"), "--json"]
    proc = subprocess.run(launch, env=env, timeout=400, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # exactly one JSON document: a second would not parse
    assert not summary["failed"]
    run = tmp_path / "run"
    lock = json.loads((run / "lock.json").read_text())
    assert lock["processes"] == 2
    ft = json.loads((run / "artifacts" / lock["stage_keys"]["ft"] / "metrics.json").read_text())
    assert ft["train_processes"] == 2 and ft["train_steps"] == 4
    # the follower trained in a private folder it removed; the store holds one artifact per stage
    assert not any(p.name.startswith("stackcomp-follower") for p in follower_tmp.iterdir())
    keys = {p.name for p in (run / "artifacts").iterdir()}
    assert keys == set(lock["stage_keys"].values())
