"""Runs launched as several processes (``accelerate launch --num_processes N stackcomp run ...``).

Every process runs the same command. The main process (rank 0) is the run: it writes the run
directory, the lock and every artifact, evaluates, and prints. The other processes *follow*:
the main process announces each stage before running it, and a follower joins the stages that
train (a pass whose params hold a ``train:`` config that trains), where accelerate shards the
batches over all processes (DDP). A follower reads its input model from the store, which the
main process committed before announcing the next stage, and writes nothing: what it computes
in a stage is the same model the main process saves. At the end the main process hands its
summary to every follower, so ``stackcomp.run`` returns the same result on all of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

#: what the main process sends when no stage is left
DONE = "__stackcomp_done__"


def process_count() -> int:
    """How many processes this run was launched as (``WORLD_SIZE``, set by accelerate/torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def process_index() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    return process_index() == 0


def _state():
    """accelerate's process state (initialises the process group: gloo on a CPU-only machine)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


def broadcast(obj: Any = None) -> Any:
    """The main process's ``obj`` on every process (what the others pass is ignored)."""
    from accelerate.utils import broadcast_object_list

    _state()
    return broadcast_object_list([obj], from_process=0)[0]


def stage_trains(stage: Any) -> bool:
    """Whether a stage's pass trains: one of its params (or nested params) is a training config
    that trains. Those are the stages every process joins."""
    from stackcomp.train.loop import TrainConfig

    def trains(params: Any) -> bool:
        if isinstance(params, TrainConfig):
            return params.trains
        if isinstance(params, BaseModel):
            return any(trains(getattr(params, name)) for name in type(params).model_fields)
        return False

    return trains(stage.params)


class FollowerStore:
    """The run's artifact store as a follower sees it: it reads parents from the store and
    writes into a private temporary folder that is thrown away (the main process commits)."""

    def __init__(self, store: Any):
        self._store = store
        self.root = store.root

    def path(self, key: str) -> Path:
        return self._store.path(key)

    def is_complete(self, key: str) -> bool:
        return self._store.is_complete(key)

    def begin(self, key: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"stackcomp-follower-{process_index()}-{key[:8]}-"))

    def commit(self, key: str, tmp: Path) -> Path:
        shutil.rmtree(tmp, ignore_errors=True)
        return self._store.path(key)

    def __getattr__(self, name: str) -> Any:  # verify, read helpers: the real store's
        return getattr(self._store, name)
