"""docs/plugins.md stays true: its code blocks, assembled as written, make a package that installs
with pip, is listed by `stackcomp passes list`, trains with its callback, and whose layer goes
through int8 and pack in the page's own recipe (run on a tiny model and tiny data)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
FENCE = re.compile(r"```(?:python|toml|yaml)\n# file: (?P<path>\S+)\n(?P<body>.*?)```", re.S)


def guide_files() -> dict[str, str]:
    """The page's code blocks by the file each names; blocks naming one file are joined in order."""
    files: dict[str, str] = {}
    for m in FENCE.finditer(GUIDE.read_text()):
        files[m["path"]] = files.get(m["path"], "") + m["body"] + "\n"
    return files


def test_the_guide_names_every_file_of_the_package():
    assert set(guide_files()) == {"pyproject.toml", "stackcomp_block_diag/__init__.py", "recipe.yaml"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("guide")
    pkg = root / "stackcomp-block-diag"
    for rel, text in guide_files().items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    site = root / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(pkg)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return pkg, site


def _cli(site: Path, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "stackcomp.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


def test_the_guide_plugin_installs_and_is_listed(installed):
    pkg, site = installed
    listed = _cli(site, "passes", "list", cwd=pkg)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "block_diag" in listed.stdout and "unusable" not in listed.stdout


def test_the_guide_recipe_trains_with_the_callback_and_packs(installed, tiny_model_dirs, tiny_glue, tmp_path):
    pkg, site = installed
    run = tmp_path / "run"
    r = _cli(site, "run", str(pkg / "recipe.yaml"), f"model={tiny_model_dirs['bert']}", "data.max_length=32",
             "stages.bd.params.train.max_steps=3", "stages.bd.params.train.batch_size=8", "-o", str(run), "--json",
             cwd=pkg, env={"STACKCOMP_DATA_DIR": str(tiny_glue)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert {"bd", "q", "pack", "pack.eval"} <= set(stages)
    art = Path(summary["artifacts_dir"])
    report = json.loads((art / stages["bd"]["key"] / "report.json").read_text())
    assert len(report["block_norms"]) == 3  # the callback ran after each optimizer step

    def layer_types(stage: str) -> list[str]:
        manifest = json.loads((art / stages[stage]["key"] / "model" / "stackcomp_manifest.json").read_text())
        return [entry["type"] for entry in manifest["layers"].values()]

    assert layer_types("bd") == ["BlockDiagLinear"] * 12
    assert layer_types("q") == ["Int8BlockDiagLinear"] * 12
    assert layer_types("pack") == ["PackedBlockDiagLinear"] * 12
    ev = stages["pack.eval"]["metrics"]
    assert "accuracy" in ev and ev["linear_bytes"] < ev["linear_dense_bytes"] / 2
