"""Real-model checks (opt-in: pytest --runslow tests/slow). Minutes each on 2 CPU cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_recipe(recipe: str, out: Path, *overrides: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("STACKCOMP_DATA_DIR", str(REPO.parent / "shared" / "data"))
    proc = subprocess.run([sys.executable, "-m", "stackcomp.cli", "run", str(REPO / recipe), "-o", str(out),
                           "--json", *overrides], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_minilm_sst2_finetune_reaches_89(tmp_path):
    summary = run_recipe("recipes/minilm_sst2_finetune.yaml", tmp_path / "run")
    ev = next(s for s in summary["stages"] if s["stage"] == "eval")["metrics"]
    ft = next(s for s in summary["stages"] if s["stage"] == "ft")["metrics"]
    assert ev["accuracy"] >= 0.89, ev
    assert ft["train_seconds"] <= 15 * 60, ft
    again = run_recipe("recipes/minilm_sst2_finetune.yaml", tmp_path / "run")
    assert again["ran"] == [] and again["seconds"] < 60
