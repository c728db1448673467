"""The prebuilt CPU kernel variants: which one this CPU runs, the next one down when it cannot,
what pack records, and that nothing compiles at inference.

The variants are compiled by the package build (setup.py; install.sh's editable install), so
these tests need no compiler: they fail, not skip, when the built modules are missing.
``STACKCOMP_CPU_ISA`` (a cap on the variant) stands in for a lesser CPU.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stackcomp.artifacts import export_model
from stackcomp.kernels import KernelError, ds_cpu, isa
from stackcomp.kernels.reference import ds_forward_reference
from stackcomp.nn.ds_linear import DSLinear
from stackcomp.nn.packed import PackedDSLinear
from stackcomp.passes.base import PassContext, as_analysis
from stackcomp.passes.ds_factorize import DSFactorizePass
from stackcomp.passes.pack import PackPass

from conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
AVX512 = {"avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "avx512f", "avx512bw", "avx512dq", "avx512vl",
          "avx512_vnni", "avx512vbmi"}


def rel_err(y, r):
    y, r = y.detach().double(), r.detach().double()
    return float((y - r).abs().max() / r.abs().max().clamp_min(1e-30))


@pytest.fixture
def fresh_kernel(monkeypatch):
    """ds_cpu with its choice forgotten before and after (the environment is read at first use)."""
    monkeypatch.delenv("STACKCOMP_KERNELS", raising=False)
    monkeypatch.delenv(isa.ENV, raising=False)
    ds_cpu.reset()
    yield monkeypatch
    ds_cpu.reset()


def runs_here() -> tuple[str, ...]:
    """The variants this CPU can execute, best first."""
    return isa.down_from(isa.detected())


# ------------------------------------------------------------------------------ choosing a variant

def test_variant_from_cpu_flags(monkeypatch):
    if not isa.is_x86():
        pytest.skip("the ISA variants are x86-64's")
    for flags, want in ((AVX512, "avx512vnni"), (AVX512 - {"avx512vbmi"}, "avx2"), (AVX512 - {"avx512_vnni"}, "avx2"),
                        ({"avx2", "fma"}, "generic"),  # an AVX2 CPU without BMI2/F16C/...: not x86-64-v3
                        ({"sse4_2", "avx"}, "generic"), (set(), "generic")):
        monkeypatch.setattr(isa, "cpu_flags", lambda flags=flags: flags)
        assert isa.detected() == want, flags


def test_env_caps_the_variant_never_raises_it(monkeypatch):
    if not isa.is_x86():
        pytest.skip("the ISA variants are x86-64's")
    monkeypatch.setattr(isa, "cpu_flags", lambda: AVX512)
    monkeypatch.setenv(isa.ENV, "avx2")
    assert isa.chosen() == "avx2"
    monkeypatch.setenv(isa.ENV, "GENERIC")
    assert isa.chosen() == "generic"
    monkeypatch.setattr(isa, "cpu_flags", lambda: {"sse2"})
    monkeypatch.setenv(isa.ENV, "avx512vnni")  # more than the CPU has: it would die on an illegal instruction
    assert isa.chosen() == "generic"
    monkeypatch.setenv(isa.ENV, "avx1024")
    with pytest.raises(KernelError, match=f"{isa.ENV} must be one of avx512vnni, avx2, generic"):
        isa.chosen()


def test_setup_builds_every_variant_with_its_flags():
    """setup.py compiles one module per variant; the avx512 one has every flag its intrinsics need
    (a missing -mavx512dq once failed the build), and each variant's flags ask only for what its
    CPU check requires."""
    names = [v.name for v in isa.built_variants()]
    assert names == (list(isa.NAMES) if isa.is_x86() else ["generic"])
    gcc_name = {"avx512_vnni": "-mavx512vnni", "bmi1": "-mbmi", "abm": "-mlzcnt"}
    for v in isa.VARIANTS:
        assert sorted(v.cflags) == sorted(gcc_name.get(f, f"-m{f}") for f in v.cpu_flags), v.name


# ------------------------------------------------------------------------------ the built modules

@pytest.mark.parametrize("variant", isa.NAMES)
def test_built_variant_is_installed_and_computes_the_layer(fresh_kernel, variant):
    """Each variant this CPU runs imports (no compiler involved), says what it was compiled for,
    and computes fp32 and int8 layers within the kernel tolerances of tests/test_kernels.py."""
    if variant not in runs_here():
        pytest.skip(f"this CPU cannot run the {variant} build")
    ext, why = ds_cpu.import_built(variant)
    assert ext is not None, f"the {variant} kernel is not built ({why}): run ./install.sh"
    info = ext.build_info()
    assert ext.has_vnni8() == (variant == "avx512vnni")
    assert ("avx2" in info) == (variant != "generic") and ("avx512f" in info) == (variant == "avx512vnni")
    g = torch.Generator().manual_seed(0)
    layer = DSLinear.from_factors(torch.nn.functional.normalize(torch.randn(3, 40, 16, generator=g), dim=-1),
                                  torch.randn(3, 32, 4, generator=g),
                                  torch.stack([torch.stack([torch.randperm(40, generator=g)[:4] for _ in range(32)])
                                               for _ in range(3)]), torch.randn(32, generator=g))
    x = torch.randn(70, 48, generator=g)
    for dtype, tol in (("fp32", 2e-5), ("int8", 2e-3 if variant != "avx512vnni" else 3e-2)):
        p = PackedDSLinear.from_ds(layer, dtype=dtype).packed()
        y = ds_cpu.cpu_caller(p, ext)(x)
        assert rel_err(y, ds_forward_reference(x, *p.unpack())) < tol, (dtype, variant)


def test_env_forces_a_lesser_built_variant(fresh_kernel):
    lesser = runs_here()[-1]
    fresh_kernel.setenv(isa.ENV, lesser)
    ext = ds_cpu.get_extension()
    assert ds_cpu.variant() == lesser and ext.__name__ == isa.module_name(lesser)


def test_missing_variant_falls_to_the_next_one_down(fresh_kernel, caplog):
    best = isa.chosen()
    if best == "generic":
        pytest.skip("this CPU runs only the generic build: there is nothing below it")
    real = ds_cpu.import_built
    fresh_kernel.setattr(ds_cpu, "import_built", lambda v: (None, "not installed") if v == best else real(v))
    with caplog.at_level(logging.WARNING, logger="stackcomp.kernels"):
        ext = ds_cpu.get_extension()
    below = isa.down_from(best)[1]
    assert ext is not None and ds_cpu.variant() == below
    assert any(f"the {best} build of the CPU kernel cannot be used (not installed); running the {below} build"
               in r.getMessage() for r in caplog.records)


def test_nothing_compiles_at_inference(tmp_path):
    """With no compiler or ninja on PATH and an empty extension cache, a new process loads the
    prebuilt kernel of this CPU (milliseconds; a compile took 25-40 s), and says nothing about building."""
    code = textwrap.dedent("""
        import time, warnings, logging
        logging.basicConfig(level=logging.WARNING)
        from stackcomp.kernels import ds_cpu
        t = time.perf_counter()
        e = ds_cpu.get_extension()
        print(e.__name__ if e else ds_cpu.build_error(), ds_cpu.variant(), round(time.perf_counter() - t, 3))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("STACKCOMP_KERNELS", isa.ENV)}
    env.update(PATH=str(tmp_path), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))  # no gcc, no ninja
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    name, variant, secs = out.stdout.split()
    assert variant == isa.detected() and name == isa.module_name(variant), out.stdout + out.stderr
    assert "compil" not in out.stderr and "could not be built" not in out.stderr, out.stderr
    assert float(secs) < 2, f"loading the kernel took {secs} s"
    assert not (tmp_path / "ext").exists()


# ------------------------------------------------------------------------------ pack records it

def _packed_tiny(tmp_path):
    model = make_tiny_model("bert")
    ctx = PassContext(stage="ds", work_dir=tmp_path)
    ds = DSFactorizePass({"block": 16, "atoms": 16, "nnz": 4, "iters": 2, "train": {"epochs": 0}})
    ctx.analysis = as_analysis(ds.analyze(model, ctx))
    model = ds.finetune(ds.transform(model, ctx), ctx)
    pack = PackPass({"target": "cpu"})
    ctx = PassContext(stage="pack", work_dir=tmp_path)
    ctx.analysis = as_analysis(pack.analyze(model, ctx))
    return pack.transform(model, ctx), ctx.analysis.report


def test_pack_records_the_variant_and_a_lesser_cpu_warns(fresh_kernel, tmp_path, caplog):
    import stackcomp

    model, report = _packed_tiny(tmp_path)
    here = isa.detected()
    assert report["cpu_variant"] == here and f"its {here} build" in report["ds_kernel_reason"]
    assert all(r["cpu_variant"] == here for r in report["layers"].values() if r["to"] == "PackedDSLinear")
    folder = export_model(model, tmp_path / "packed")
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits

    with caplog.at_level(logging.WARNING, logger="stackcomp.kernels"):
        same = stackcomp.load(folder)
    assert not [r for r in caplog.records if "was packed with" in r.getMessage()]
    assert all(m.cpu_variant == here for m in same.modules() if isinstance(m, PackedDSLinear))
    with torch.no_grad():
        assert torch.equal(same(input_ids=ids).logits, want)

    lesser = runs_here()[-1]
    if lesser == here:
        pytest.skip("this CPU runs only the generic build: no lesser variant to load on")
    fresh_kernel.setenv(isa.ENV, lesser)
    ds_cpu.reset()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stackcomp.kernels"):
        other = stackcomp.load(folder)
    warned = [r.getMessage() for r in caplog.records if "was packed with" in r.getMessage()]
    assert len(warned) == 1, warned  # once, not once per layer
    assert f"packed with the {here} CPU kernel; this CPU (or install) runs the {lesser} build" in warned[0]
    with torch.no_grad():
        got = other(input_ids=ids).logits
    assert ds_cpu.variant() == lesser
    assert rel_err(got, want) < 1e-4  # fp32 layers: the same sums, another instruction set
