"""A test pass that trains (its params hold a training config) and fails in every process:
what a multi-process stage on the Ray executor reports when its processes fail. Workers import
it by module (``PYTHONPATH`` = tests/)."""

from __future__ import annotations

import os

from pydantic import Field

from stackcomp.passes.base import Pass, PassParams
from stackcomp.train import TrainConfig


class FailingTrainParams(PassParams):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=1))


class FailingTrainPass(Pass):
    """Raises before training, naming the process it ran in."""

    name = "_mp_failing_train"
    Params = FailingTrainParams

    def transform(self, model, ctx):
        raise RuntimeError(f"boom in process {os.environ.get('RANK', '0')}")
