"""Kill and resume, slow profile: 20 SIGKILLs at random points of a 4-stage run (while a stage
starts, trains, writes its artifact, checksums it, or right after it commits), in chains that
resume each other, each chain finished by a clean re-run that must keep every finished stage and
reproduce an uninterrupted run's metrics and weights bit for bit.

Seed: STACKCOMP_KILL_SEED (default 20240601); the kill points are printed (run with -s).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _kill_resume import EVENTS, STAGES, KillPoint, Run, child_env, comparable, kill_chain, recipe_text  # noqa: E402

KILLS = 20
TRAINING = ["ft", "ds", "ft2"]  # the stages with a training loop


def random_chain(rng: random.Random) -> list[KillPoint]:
    """1-4 kill points in run order (a later point fires in the run that resumes the earlier one)."""
    points = []
    for _ in range(rng.randint(1, 4)):
        event = rng.choice(EVENTS)
        stage = rng.choice(TRAINING if event == "training" else STAGES)
        late = rng.choice([0.0, 0.0, rng.uniform(0, 0.05)])
        delay = rng.uniform(0, 1.5) if event in ("started", "training") else late
        points.append(KillPoint(event, stage, delay))
    return sorted(points, key=lambda k: (STAGES.index(k.stage), EVENTS.index(k.event)))


@pytest.mark.slow
def test_twenty_random_kills_then_resume(tmp_path, tiny_model_dirs, tiny_glue):
    rng = random.Random(int(os.environ.get("STACKCOMP_KILL_SEED", "20240601")))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_model_dirs["bert"]))
    env = child_env(tiny_glue)
    ref_run = Run(recipe, tmp_path / "reference", env)
    ref = ref_run.run()
    assert ref.returncode == 0 and ref.summary is not None, ref.stderr[-3000:]
    reference, digests = comparable(ref.summary), ref_run.digests()

    landed: list[str] = []
    chains = 0
    while sum("half-written" in line for line in landed) < KILLS:
        assert chains < 40, f"could not land {KILLS} kills:\n" + "\n".join(landed)
        points = random_chain(rng)
        need = KILLS - sum("half-written" in line for line in landed)
        landed += kill_chain(Run(recipe, tmp_path / f"run{chains}", env), points[:need], reference, digests)
        chains += 1
    print("\n" + "\n".join(landed))
    kills = [line for line in landed if "half-written" in line]
    assert len(kills) == KILLS
    # some kills hit an artifact in the middle of being written (files in its temporary folder)
    assert any("half-written {'" in line and "[]" not in line.split("half-written", 1)[1] for line in kills), kills
