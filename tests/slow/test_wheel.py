"""The wheel ships the compiled kernels: built as CI would (``python -m build --wheel
--no-isolation``), installed into a fresh venv whose PATH holds no compiler or ninja, it runs a
packed model with the prebuilt kernel of this CPU: the first forward in under 2 s, the same logits.

Slow (``--runslow``): the build compiles every ISA variant (about 2 min on 2 idle cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stackcomp.artifacts import export_model
from stackcomp.kernels import isa
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.ds_factorize import DSFactorizePass
from stackcomp.passes.pack import PackPass

from conftest import make_tiny_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FIRST_FORWARD_S = 2.0

RUN_PACKED = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import torch, stackcomp
    from stackcomp.kernels import ds_cpu
    t1 = time.perf_counter()
    model = stackcomp.load(sys.argv[1])
    ids, want = torch.load(sys.argv[2], weights_only=True)
    t2 = time.perf_counter()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    t3 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    t4 = time.perf_counter()
    ext = ds_cpu.get_extension()
    print(json.dumps({"stackcomp": stackcomp.__file__, "kernel": ext.__file__ if ext else ds_cpu.build_error(),
                      "variant": ds_cpu.variant(), "equal": bool(torch.equal(got, want)),
                      "max_abs_diff": float((got - want).abs().max()), "import_s": t1 - t0, "load_s": t2 - t1,
                      "first_forward_s": t3 - t2, "second_forward_s": t4 - t3}))
""")


def _source_copy(dest: Path) -> Path:
    """The working tree's files that git tracks or would track (no build outputs), copied."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _packed_tiny(tmp_path: Path) -> Path:
    model = make_tiny_model("bert")
    ctx = PassContext(stage="ds", work_dir=tmp_path)
    ds = DSFactorizePass({"block": 16, "atoms": 16, "nnz": 4, "iters": 2, "train": {"epochs": 0}})
    ctx.analysis = as_analysis(ds.analyze(model, ctx))
    model = ds.finetune(ds.transform(model, ctx), ctx)
    pack = PackPass({"target": "cpu"})
    ctx = PassContext(stage="pack", work_dir=tmp_path)
    ctx.analysis = as_analysis(pack.analyze(model, ctx))
    model = pack.transform(model, ctx)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save((ids, model(input_ids=ids).logits), tmp_path / "expected.pt")
    return export_model(model, tmp_path / "packed")


def test_wheel_runs_a_packed_model_with_no_compiler(tmp_path):
    src = _source_copy(tmp_path / "src")
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, timeout=3600, env=env)
    wheel = next((tmp_path / "dist").glob("stackcomp-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # torch and the other dependencies come from the system site; stackcomp itself from the wheel
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, timeout=600)

    folder = _packed_tiny(tmp_path)
    (tmp_path / "run.py").write_text(RUN_PACKED)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("STACKCOMP_", "TORCH_EXTENSIONS"))}
    run_env.update(PATH=str(venv / "bin"), HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "jit"))
    assert shutil.which("c++", path=run_env["PATH"]) is None and shutil.which("ninja", path=run_env["PATH"]) is None
    out = subprocess.run([str(py), str(tmp_path / "run.py"), str(folder), str(tmp_path / "expected.pt")],
                         capture_output=True, text=True, timeout=300, env=run_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(r, indent=1))
    site = str(venv)
    assert r["stackcomp"].startswith(site), f"stackcomp came from {r['stackcomp']}, not the wheel"
    assert r["kernel"].startswith(site) and f"_ds_cpu_{isa.detected()}" in r["kernel"], r["kernel"]
    assert r["variant"] == isa.detected()
    assert not (tmp_path / "jit").exists(), "something was compiled at inference"
    assert "compil" not in out.stderr, out.stderr
    assert r["equal"], f"logits differ by {r['max_abs_diff']}"
    assert r["first_forward_s"] < FIRST_FORWARD_S, r
