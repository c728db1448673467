"""A test pass Ray workers can import by module (``PYTHONPATH`` = tests/): it scales the classifier
weight, sleeps so that branches visibly overlap, and can be held so a test can kill its worker.

When ``STACKCOMP_TEST_CONTROL`` names a folder (set for the cluster's nodes only), each stage
writes its worker's pid to ``<folder>/<stage>.pid`` and waits while ``<folder>/hold-<stage>``
exists: the test kills that worker, then removes the file, and Ray's retry goes through.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from stackcomp.passes.base import Pass, PassParams, register_pass

CONTROL_ENV = "STACKCOMP_TEST_CONTROL"


class SlowScaleParams(PassParams):
    factor: float = 2.0
    sleep: float = 0.0


class SlowScalePass(Pass):
    """Test pass: sleeps, then scales the classifier weight."""

    name = "_ray_slow_scale"
    Params = SlowScaleParams

    def transform(self, model, ctx):
        control = os.environ.get(CONTROL_ENV)
        if control:
            (Path(control) / f"{ctx.stage}.pid").write_text(str(os.getpid()))
            hold = Path(control) / f"hold-{ctx.stage}"
            while hold.exists():
                time.sleep(0.05)
        if self.params.sleep > 0:  # in ten steps, reported as a bar (the driver's view shows them)
            with ctx.progress.bar("sleep", total=10) as bar:
                for _ in range(10):
                    time.sleep(self.params.sleep / 10)
                    bar.advance()
        else:
            time.sleep(self.params.sleep)  # negative: raises (the failing-branch test)
        with torch.no_grad():
            model.classifier.weight.mul_(self.params.factor)
        ctx.metrics["classifier_norm"] = float(model.classifier.weight.detach().norm())
        return model


register_pass(SlowScalePass)
