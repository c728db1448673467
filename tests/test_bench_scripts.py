"""Every benchmark script answers --help from a fresh checkout: none shadows a package that a
dependency imports (bench/kernels.py once hid the `kernels` package transformers uses) and none
does work at import time."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))  # _x.py: helpers they import
MODULES = sorted(p.name for p in BENCH.glob("*.py"))


def test_no_script_shadows_an_installed_module():
    import importlib.util

    for name in MODULES:
        module = name[:-3]
        spec = importlib.util.find_spec(module) if module not in sys.modules else None
        assert spec is None or Path(spec.origin or "").parent == BENCH, f"bench/{name} shadows {spec.origin}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs(script):
    env = {k: v for k, v in os.environ.items() if k != "STACKCOMP_DATA_DIR"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=120, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
