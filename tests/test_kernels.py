"""DS kernels against the exact reference, on tiny shapes.

The compiled CPU kernel is the variant for this CPU that the package build compiled (setup.py;
tests/test_kernel_variants.py checks each variant); set STACKCOMP_SKIP_KERNEL_BUILD=1 to skip the
tests that need it.
The Triton kernels run in a subprocess under TRITON_INTERPRET=1 (no GPU needed).

Tolerances, relative to max|y|: fp32 paths 2e-5 against the float64 reference; int8 paths 2e-3
against the reference run on the *dequantized* packed tensors (the kernel's own rounding: int16
activations and Q15 z), and 5e-2 against the unquantized layer (the int8 packing itself).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stackcomp.kernels import (
    KernelError,
    PackedDS,
    choose_kernel,
    ds_forward_act8_reference,
    ds_forward_embedding_bag,
    ds_forward_packed,
    ds_forward_rebuild,
    ds_forward_reference,
    ds_forward_torch,
    ds_rebuild_weight,
    pack_ds,
    semi_structured_24,
    semi_structured_24_supported,
)
from stackcomp.kernels import ds_cpu
from stackcomp.kernels.ds_triton import is_24_sparse

REPO = Path(__file__).resolve().parents[1]
FP32_TOL = 2e-5
INT8_KERNEL_TOL = 2e-3
INT8_PACK_TOL = 5e-2
#: the vnni8 kernel against its oracle (same rounding; only float32 order and one fused multiply-add differ)
ACT8_ORACLE_TOL = 1e-5
#: 8-bit activations (x and z rounded per token) against the exact layer: ~1e-2 measured, max-based
ACT8_EXACT_TOL = 3e-2

# (nb, K, B, out, s): one block / several; K <= 256 (uint8 indices) and K > 256 (int16); odd B and out
SHAPES = [(1, 16, 24, 21, 3), (3, 40, 16, 32, 4), (2, 300, 8, 13, 5), (2, 24, 7, 9, 2)]
TOKENS = [1, 3, 131]


def make_ds(nb, K, B, out, s, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(nb, K, B, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    v = torch.randn(nb, out, s, generator=g)
    # distinct atoms per row (as OMP gives), any order
    idx = torch.stack([torch.stack([torch.randperm(K, generator=g)[:s] for _ in range(out)]) for _ in range(nb)])
    idx = idx.to(torch.uint8 if K <= 256 else torch.int16)
    b = torch.randn(out, generator=g) if bias else None
    return d, v, idx, b


def dense_weight_loops(d, v, idx):
    """W built with plain loops: an oracle for the reference that shares no code with it."""
    nb, K, B = d.shape
    out, s = v.shape[1], v.shape[2]
    w = torch.zeros(out, nb * B, dtype=torch.float64)
    for b in range(nb):
        for o in range(out):
            for j in range(s):
                w[o, b * B:(b + 1) * B] += v[b, o, j].double() * d[b, int(idx[b, o, j])].double()
    return w


def rel_err(y, r):
    return float((y.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30))


def int8_check(ext, p, x, y, kernel=None):
    """Assert y is the int8 CPU kernel's output for x: the vnni8 kernel (where it runs for this
    layer and token count) against its 8-bit-activation oracle, the q15 kernel against the exact
    reference on the dequantized factors."""
    T = x.numel() // x.shape[-1]
    exact = ds_forward_reference(x, *p.unpack())
    if T > ds_cpu.SMALL_MAX_TOKENS and ds_cpu.int8_kernel(p, ext, kernel) == "vnni8":
        assert rel_err(y, ds_forward_act8_reference(x, *p.unpack_int8())) < ACT8_ORACLE_TOL
        assert rel_err(y, exact) < ACT8_EXACT_TOL
    else:
        assert rel_err(y, exact) < INT8_KERNEL_TOL


# ------------------------------------------------------------------------------ reference & torch

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_dense_weight(shape, bias):
    d, v, idx, b = make_ds(*shape, bias=bias)
    x = torch.randn(5, shape[0] * shape[2], dtype=torch.float64)
    w = dense_weight_loops(d, v, idx)
    want = F.linear(x, w, None if b is None else b.double())
    got = ds_forward_reference(x, d, v, idx, b)
    assert rel_err(got, want) < 1e-12
    # leading dims are kept
    assert ds_forward_reference(x.reshape(5, 1, -1), d, v, idx, b).shape == (5, 1, shape[3])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", TOKENS)
def test_torch_paths_match_reference(shape, T):
    d, v, idx, b = make_ds(*shape)
    x = torch.randn(T, shape[0] * shape[2])
    r = ds_forward_reference(x, d, v, idx, b)
    assert rel_err(ds_forward_embedding_bag(x, d, v, idx, b), r) < FP32_TOL
    assert rel_err(ds_forward_rebuild(x, d, v, idx, b), r) < FP32_TOL
    assert rel_err(ds_forward_torch(x, d, v, idx, b), r) < FP32_TOL
    assert rel_err(ds_rebuild_weight(d, v, idx), dense_weight_loops(d, v, idx)) < 1e-6


def test_bad_canonical_tensors_raise():
    d, v, idx, b = make_ds(2, 16, 8, 10, 3)
    with pytest.raises(KernelError, match="indices must lie in"):
        ds_forward_reference(torch.randn(1, 16), d, v, torch.full_like(idx, 16), b)
    with pytest.raises(KernelError, match="features"):
        ds_forward_reference(torch.randn(1, 15), d, v, idx, b)
    with pytest.raises(KernelError, match="values must be"):
        pack_ds(d, v[:1], idx[:1], b)
    with pytest.raises(KernelError, match="bias"):
        pack_ds(d, v, idx, torch.zeros(3))
    with pytest.raises(KernelError, match="target"):
        pack_ds(d, v, idx, b, target="tpu")


# ------------------------------------------------------------------------------ packing

@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_pack_unpack_roundtrip(dtype, target):
    d, v, idx, b = make_ds(2, 300, 8, 13, 5)
    p = pack_ds(d, v, idx, b, target=target, dtype=dtype)
    assert p.tensors["indices"].dtype == torch.int16
    d2, v2, i2, b2 = p.unpack()
    assert torch.equal(i2, idx.long())
    if dtype == "fp32":
        assert torch.equal(d2, d) and torch.equal(v2, v) and torch.equal(b2, b)
    else:
        assert rel_err(d2, d) < 1 / 127 and rel_err(v2, v) < 1 / 127
        assert p.tensors["dictionary"].dtype == torch.int8 and p.tensors["values"].dtype == torch.int8
        assert p.nbytes() < pack_ds(d, v, idx, b, target=target).nbytes() / 2


def test_packed_save_load_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    d, v, idx, b = make_ds(3, 40, 16, 32, 4)
    p = pack_ds(d, v, idx, b, dtype="int8")
    save_file(p.state_dict(), tmp_path / "l.safetensors", metadata={"packed_ds": json.dumps(p.meta)})
    from safetensors import safe_open

    with safe_open(tmp_path / "l.safetensors", "pt") as f:
        meta = f.metadata()["packed_ds"]
    q = PackedDS.from_state_dict(load_file(tmp_path / "l.safetensors"), meta)
    x = torch.randn(4, 48)
    assert torch.equal(ds_forward_packed(x, q, kernel="torch"), ds_forward_packed(x, p, kernel="torch"))
    bad = dict(p.meta, version=99)
    with pytest.raises(KernelError, match="version"):
        PackedDS.from_state_dict(p.state_dict(), bad)
    broken = dict(p.state_dict(), values=p.tensors["values"][:, :1].contiguous())
    with pytest.raises(KernelError, match="'values'"):
        PackedDS.from_state_dict(broken, p.meta)


# ------------------------------------------------------------------------------ compiled CPU kernel

@pytest.fixture(scope="session")
def ext():
    if os.environ.get("STACKCOMP_SKIP_KERNEL_BUILD", "") not in ("", "0"):
        pytest.skip("STACKCOMP_SKIP_KERNEL_BUILD is set")
    e = ds_cpu.get_extension()
    assert e is not None, f"the DS CPU kernel did not build: {ds_cpu.build_error()}"
    return e


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", TOKENS + [2, 17, 64])
def test_cpu_kernel(ext, dtype, shape, bias, T):
    """fp32: against the reference on the original factors. int8: against the reference on the
    packed (dequantized) factors, and within the rounding of packing on the original ones."""
    d, v, idx, b = make_ds(*shape, bias=bias)
    p = pack_ds(d, v, idx, b, dtype=dtype)
    x = torch.randn(T, shape[0] * shape[2])
    y = ds_forward_packed(x, p, kernel="cpu")
    assert y.shape == (T, shape[3]) and y.dtype == torch.float32
    exact = rel_err(y, ds_forward_reference(x, d, v, idx, b))
    if dtype == "fp32":
        assert exact < FP32_TOL
    else:
        int8_check(ext, p, x, y)
        assert exact < INT8_PACK_TOL
        yq = ds_cpu.cpu_caller(p, int8_kernel_name="q15")(x)  # the AVX2 kernel, wherever vnni8 is the default
        assert rel_err(yq, ds_forward_reference(x, *p.unpack())) < INT8_KERNEL_TOL


@pytest.fixture
def vnni8(ext):
    if not ext.has_vnni8():
        pytest.skip("the vnni8 kernel needs AVX-512 VBMI and VNNI; this CPU or build lacks them")
    return ext


@pytest.mark.parametrize("K", [1, 63, 64, 65, 128, 129, 200, 256])
@pytest.mark.parametrize("T", [3, 4, 5, 255, 256, 257])
def test_vnni8_kernel_matches_its_oracle(vnni8, K, T):
    """Every table width (1, 2, 4 registers: K <= 64, <= 128, <= 256, index bit 7 picking the upper
    pair), token tiles and the 256-token super-chunks cut anywhere; odd B, out and s pad."""
    nb, B, out, s = 2, 13, 37, 5 if K > 4 else 1
    d, v, idx, b = make_ds(nb, K, B, out, s, seed=K)
    if K > 4:
        idx[0, :, 0] = K - 1  # the last atom is used
    p = pack_ds(d, v, idx, b, dtype="int8")
    assert ds_cpu.int8_kernel(p, vnni8) == "vnni8"
    x = torch.randn(T, nb * B, generator=torch.Generator().manual_seed(T))
    x[1] = 0.0  # a zero token: amax 0, scale 0, output = bias
    y = ds_forward_packed(x, p, kernel="cpu")
    int8_check(vnni8, p, x, y)
    assert torch.allclose(y[1], b)


def test_vnni8_extremes(vnni8):
    """Full-scale int8 everywhere (the largest integer sums), one huge token among small ones,
    a 3072-wide layer (many output vectors) and in-place reuse of the operands."""
    d, v, idx, b = make_ds(6, 128, 128, 3072, 24)
    v[:, :16] = 5.0
    v[:, 16:32] = -5.0
    p = pack_ds(d, v, idx, b, dtype="int8")
    x = torch.randn(70, 768)
    x[7] *= 1e4
    for _ in range(2):
        int8_check(vnni8, p, x, ds_forward_packed(x, p, kernel="cpu"))


def test_int8_kernel_choice(ext, monkeypatch):
    d, v, idx, b = make_ds(3, 40, 16, 32, 4)
    p = pack_ds(d, v, idx, b, dtype="int8")
    want = "vnni8" if ext.has_vnni8() else "q15"
    assert ds_cpu.int8_kernel(p, ext) == want
    monkeypatch.setenv("STACKCOMP_INT8_KERNEL", "q15")
    assert ds_cpu.int8_kernel(p, ext) == "q15"
    monkeypatch.setenv("STACKCOMP_INT8_KERNEL", "fast")
    with pytest.raises(KernelError, match="STACKCOMP_INT8_KERNEL"):
        ds_cpu.int8_kernel(p, ext)
    big = pack_ds(*make_ds(1, 300, 8, 16, 3), dtype="int8")
    assert ds_cpu.int8_kernel(big, ext, "auto") == "q15"   # K > 256: the q15 kernel
    with pytest.raises(KernelError, match="at most 256 atoms"):
        ds_cpu.int8_kernel(big, ext, "vnni8")
    with pytest.raises(KernelError, match="int8 packed layer"):
        pack_ds(d, v, idx, b).unpack_int8()


def test_cpu_kernel_int8_extremes(ext):
    """Rows of all-maximal values (tightest int16 headroom), zero rows, s > 64 (fp32 gather).

    With s=40 equal full-scale coefficients only 2 bits of shift are left for the values, so the
    Q15 products round at ~1e-3 of their size and the errors add up with one sign: 5e-3 here.
    """
    d, v, idx, b = make_ds(2, 300, 16, 24, 40)
    v[:, :8] = 3.0
    v[:, 8:10] = 0.0
    v[:, 10] = -3.0
    for vals in (v, torch.randn(1, 8, 260)):
        dd = d if vals is v else torch.randn(1, 300, 16)
        ii = idx if vals is v else torch.randint(0, 300, (1, 8, 260), dtype=torch.int16)
        p = pack_ds(dd, vals, ii, None, dtype="int8")
        x = torch.randn(70, dd.shape[0] * 16) * 100
        tol = 5e-3 if vals is v else FP32_TOL * 10  # fp32 gather: only the int16 activations round
        assert rel_err(ds_forward_packed(x, p, kernel="cpu"), ds_forward_reference(x, *p.unpack())) < tol
    assert ds_cpu.q15_values(p) is None


def test_cpu_kernel_other_dtypes_and_lead_dims(ext):
    d, v, idx, b = make_ds(3, 40, 16, 32, 4)
    p = pack_ds(d, v, idx, b)
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    y = ds_forward_packed(x, p)
    assert y.shape == (2, 5, 32) and y.dtype == torch.bfloat16
    assert rel_err(y.float(), ds_forward_reference(x.float(), d, v, idx, b)) < 1e-2
    assert choose_kernel("cpu") == "cpu"
    with pytest.raises(KernelError, match="group"):
        ds_cpu.ds_forward_cpu(torch.randn(1, 48), pack_ds(d, v, idx, b, target="cuda"))


def test_cpu_kernel_edge_cases(ext):
    d, v, idx, b = make_ds(3, 40, 16, 32, 4)
    p = pack_ds(d, v, idx, b, dtype="int8")
    assert ds_forward_packed(torch.randn(0, 48), p).shape == (0, 32)
    x = torch.randn(4, 48, requires_grad=True)
    y = ds_forward_packed(x, p)  # needs a gradient: the differentiable torch path
    y.sum().backward()
    assert x.grad is not None and rel_err(y.detach(), ds_forward_reference(x.detach(), *p.unpack())) < FP32_TOL
    with pytest.raises(KernelError, match="no backward"):
        ds_forward_packed(x, p, kernel="cpu")
    xs = torch.randn(6, 96)[:, ::2]  # not contiguous
    int8_check(ext, p, xs, ds_forward_packed(xs, p))


def test_cpu_build_is_cached(ext):
    """A second process finds the built module: no rebuild."""
    code = ("import time; from stackcomp.kernels import ds_cpu; t = time.time(); e = ds_cpu.get_extension(); "
            "print(e is not None, e.__name__ if e else ds_cpu.build_error(), round(time.time() - t, 2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ), cwd=REPO)
    ok, name, secs = out.stdout.split()
    assert ok == "True" and name == ext.__name__
    assert float(secs) < 15, f"loading the cached kernel took {secs} s (rebuilt?)"


def test_failed_build_falls_back(monkeypatch, caplog, tmp_path):
    """In a tree without prebuilt kernels, a JIT build that fails logs once, get_extension()
    returns None, and layers run on torch."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(ds_cpu, "import_built", lambda variant: (None, "not installed"))  # a never-built tree
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no finished build to load: it must build

    calls = []

    def broken_load(*a, **k):
        calls.append(1)
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.delenv("STACKCOMP_KERNELS", raising=False)
    ds_cpu.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="stackcomp.kernels"):
            assert ds_cpu.get_extension() is None
            assert ds_cpu.get_extension() is None
        assert len(calls) == 1
        assert sum("could not be built" in r.message for r in caplog.records) == 1
        assert sum("no prebuilt CPU kernel" in r.message for r in caplog.records) == 1
        assert "simulated compiler failure" in ds_cpu.build_error()
        assert choose_kernel("cpu") == "torch"
        d, v, idx, b = make_ds(3, 40, 16, 32, 4)
        p = pack_ds(d, v, idx, b)
        x = torch.randn(3, 48)
        assert rel_err(ds_forward_packed(x, p), ds_forward_reference(x, d, v, idx, b)) < FP32_TOL
        with pytest.raises(KernelError, match="not available"):
            ds_cpu.ds_forward_cpu(x, p)
    finally:
        ds_cpu.reset()


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("STACKCOMP_KERNELS", "torch")
    ds_cpu.reset()
    try:
        assert ds_cpu.get_extension() is None
        assert choose_kernel("cpu") == "torch"
        d, v, idx, b = make_ds(3, 40, 16, 32, 4)
        x = torch.randn(3, 48)
        assert rel_err(ds_forward_packed(x, pack_ds(d, v, idx, b)), ds_forward_reference(x, d, v, idx, b)) < FP32_TOL
    finally:
        ds_cpu.reset()


HARNESS = r"""
#include <cstdio>
#include <cstdint>
#include <vector>
template <class F> void serial_for(int64_t b, int64_t e, int64_t, const F& f) { f(b, e); }
#define DS_PARALLEL_FOR serial_for
#define DS_NUM_THREADS() 1
#include "ds_cpu_kernels.h"
using namespace dskern;
template <class T> std::vector<T> rd(FILE* f, size_t n) {
  std::vector<T> v(n);
  if (fread(v.data(), sizeof(T), n, f) != n) throw 1;
  return v;
}
int main(int argc, char** argv) {
  FILE* f = fopen(argv[1], "rb");
  auto h = rd<int64_t>(f, 10);  // T in out nb K B S OG q small_max
  Geo g{h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]};
  auto x = rd<float>(f, g.T * g.in);
  auto bias = rd<float>(f, g.out);
  auto idx = rd<int16_t>(f, g.nb * g.OG * g.S * 8);
  std::vector<float> y(g.T * g.out);
  if (h[8] == 0) {
    auto d = rd<float>(f, g.nb * g.K * g.B); auto v = rd<float>(f, g.nb * g.OG * g.S * 8);
    run_f32<int16_t>(g, x.data(), d.data(), v.data(), idx.data(), bias.data(), y.data(), h[9]);
  } else {
    auto d = rd<int8_t>(f, g.nb * g.K * g.B); auto ds = rd<float>(f, g.nb * g.K);
    auto v = rd<int8_t>(f, g.nb * g.OG * g.S * 8); auto vs = rd<float>(f, g.OG * 8);
    run_i8<int16_t>(g, x.data(), d.data(), ds.data(), v.data(), vs.data(), nullptr, nullptr, idx.data(),
                    bias.data(), y.data(), h[9]);
  }
  fwrite(y.data(), sizeof(float), y.size(), stdout);
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_portable_code_without_avx(tmp_path):
    """The header's generic (no AVX2/FMA) code compiles and matches the reference."""
    src = tmp_path / "h.cpp"
    src.write_text(HARNESS)
    exe = tmp_path / "h"
    kdir = REPO / "stackcomp" / "kernels"
    r = subprocess.run(["g++", "-O1", "-std=c++17", "-march=x86-64", "-mno-avx2", "-mno-fma", f"-I{kdir}", str(src),
                        "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for dtype in ("fp32", "int8"):
        d, v, idx, b = make_ds(2, 40, 12, 21, 3)
        p = pack_ds(d, v, idx.to(torch.int16), b, dtype=dtype)
        for T, small in ((1, 2), (13, 2), (13, 100)):
            x = torch.randn(T, 24)
            t = p.tensors
            nb, og, s, _ = t["values"].shape
            parts = [torch.tensor([T, 24, 21, nb, 40, 12, s, og, int(dtype == "int8"), small], dtype=torch.int64),
                     x, b, t["indices"].to(torch.int16)]
            parts += [t["dictionary"], t["values"]] if dtype == "fp32" else \
                [t["dictionary"], t["dictionary_scale"], t["values"], t["values_scale"]]
            (tmp_path / "in.bin").write_bytes(b"".join(a.contiguous().numpy().tobytes() for a in parts))
            out = subprocess.run([str(exe), str(tmp_path / "in.bin")], capture_output=True, timeout=60)
            assert out.returncode == 0
            y = torch.frombuffer(bytearray(out.stdout), dtype=torch.float32).reshape(T, 21)
            assert rel_err(y, ds_forward_reference(x, *p.unpack())) < FP32_TOL


# ------------------------------------------------------------------------------ Triton (interpreter)

TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    sys.path.insert(0, {tests!r})
    from test_kernels import make_ds, rel_err, SHAPES
    from stackcomp.kernels import pack_ds, ds_forward_packed, ds_forward_reference, choose_kernel
    assert choose_kernel("cuda") == "triton"
    worst = {{}}
    for shape in SHAPES:
        for dtype in ("fp32", "int8"):
            for bias in (True, False):
                d, v, idx, b = make_ds(*shape, bias=bias)
                p = pack_ds(d, v, idx, b, target="cuda", dtype=dtype)
                for T, xdts in ((1, (torch.float32,)), (3, (torch.float32,)),
                                (19, (torch.float32, torch.float16, torch.bfloat16))):
                    for xdt in xdts:
                        x = torch.randn(T, shape[0] * shape[2]).to(xdt)
                        y = ds_forward_packed(x, p, kernel="triton")
                        assert y.dtype == xdt and y.shape == (T, shape[3])
                        e = rel_err(y.float(), ds_forward_reference(x.float(), *p.unpack()))
                        key = str(xdt)
                        worst[key] = max(worst.get(key, 0.0), e)
    print(worst)
    assert worst["torch.float32"] < 2e-5, worst
    assert worst["torch.float16"] < 5e-3, worst
    assert worst["torch.bfloat16"] < 3e-2, worst
    print("TRITON_OK")
""")


def test_triton_kernels_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", TRITON_SCRIPT.format(tests=str(Path(__file__).parent))],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert "TRITON_OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


# ------------------------------------------------------------------------------ 2:4

def test_semi_structured_24_reports_unsupported_device():
    w = torch.zeros(32, 64)
    w[:, ::4] = 1.0
    w[:, 1::4] = -1.0
    assert is_24_sparse(w) and not is_24_sparse(torch.ones(32, 64))
    ok, why = semi_structured_24_supported("cpu")
    if ok:  # pragma: no cover - only on an Ampere+ GPU
        pytest.skip("a CUDA device that supports 2:4 is present")
    assert why
    with pytest.raises(KernelError, match="not supported on this device"):
        semi_structured_24(w)
