"""The compiled CPU kernel for packed DS layers: the prebuilt module for this CPU, a JIT build in
development trees, and a safe fallback.

The C++ source (``ds_cpu.cpp``) is compiled when the package is built (setup.py), once per ISA
variant (:mod:`stackcomp.kernels.isa`: ``avx512vnni``, ``avx2``, ``generic``), each its own module
``stackcomp.kernels._ds_cpu_<variant>``. :func:`get_extension` imports the best variant this CPU
runs (``STACKCOMP_CPU_ISA`` caps it); if that one is not installed or does not load, the next one
down, with a warning. Nothing compiles at inference.

Only where no variant is installed (a source tree that was never built) the kernel is built here
with ``torch.utils.cpp_extension.load`` (gcc + ninja, 25-40 s once, cached in
``TORCH_EXTENSIONS_DIR``), with a warning. Its name holds a hash of the source, the flags and
torch's version, so a shared cache never loads a stale binary. If the build fails, one warning
is logged and :func:`get_extension` returns ``None`` from then on: callers use the torch path.

JIT builds survive kills and do not depend on the ``ninja`` on PATH (:func:`load_extension`): a
build holds a ``filelock`` lock (the OS releases it when its holder dies), so a build killed
half-way leaves no lock that blocks the next one; torch's own lock file (``lock``, which a killed
build leaves behind and torch then waits on forever) is removed under that lock, with a warning.
A finished build is marked by a stamp file and loaded directly from then on, without running
ninja: ninja 1.11 and 1.13 write incompatible ``.ninja_log`` versions and each discards the
other's log and rebuilds everything, so switching the ninja on PATH used to cost a full rebuild.

Environment (read at the first call; :func:`reset` makes the next call read it again):
  ``STACKCOMP_KERNELS=torch``      never load or build the kernel; always use the torch path;
  ``STACKCOMP_CPU_ISA=<variant>``  run at most this variant (avx512vnni, avx2, generic);
  ``STACKCOMP_KERNEL_BUILD_WAIT``  seconds to wait for another process building the kernel
                                   (JIT builds only; default 1800); then this process uses the torch path.

The kernels themselves live in ``ds_cpu_kernels.h`` (fp32, the q15 int8 kernel and the few-token
loop) and ``ds_cpu_vnni8.h`` (the int8 kernel with 8-bit activations, AVX-512 VBMI + VNNI), with no
torch types (a standalone harness can include them); ``ds_cpu.cpp`` is the torch binding.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from stackcomp.kernels import isa
from stackcomp.kernels.packed import CPU_GROUP, PackedDS
from stackcomp.kernels.reference import KernelError
from stackcomp.rundir import atomic_write_text

log = logging.getLogger("stackcomp.kernels")

SOURCE = Path(__file__).with_name("ds_cpu.cpp")
HEADERS = tuple(Path(__file__).with_name(h) for h in ("ds_cpu_kernels.h", "ds_cpu_vnni8.h", "ds_cpu_ffn.h",
                                                      "ds_cpu_norm.h", "ds_cpu_attention.h",
                                                      "ds_cpu_embedding.h"))
#: at most this many tokens take the bandwidth-bound loop (output rows as SIMD lanes)
SMALL_MAX_TOKENS = 2
#: int8 layers with more nonzeros per row and block than this gather in fp32 (see q15_values)
Q15_MAX_NNZ = 64
#: int8 kernels for more than SMALL_MAX_TOKENS tokens: "vnni8" (8-bit activations, AVX-512 VBMI +
#: VNNI; ds_cpu_vnni8.h) where the build has it and the layer fits (K <= 256), else "q15" (16-bit
#: activations; ds_cpu_kernels.h). STACKCOMP_INT8_KERNEL=q15 forces the latter (A/B runs, accuracy).
INT8_KERNELS = ("auto", "vnni8", "q15")

#: in a build directory: torch's lock file (FileBaton), ours (filelock), and the mark of a finished build
TORCH_BATON = "lock"
BUILD_LOCK = "stackcomp_build.lock"
BUILT_STAMP = "stackcomp_built"
BUILD_WAIT_S = 1800.0

_lock = threading.Lock()
#: gen counts resets, so callers that cached a kernel (PackedDS.cache) know to look again;
#: variant: the ISA variant of ext (None: no kernel)
_state: dict[str, Any] = {"ext": None, "tried": False, "error": None, "gen": 0, "variant": None}
#: (packed with, runs here) pairs already warned about
_warned: set[tuple[str, str | None]] = set()
#: callers of extension_with already warned that their kernel is missing
_missing: set[str] = set()


def build_flags(variant: str) -> list[str]:
    """Compiler flags of ``variant`` (the same as setup.py's), for a JIT build."""
    v = next(v for v in isa.VARIANTS if v.name == variant)
    return [*isa.COMMON_CFLAGS, *(v.cflags if isa.is_x86() else ())]


def extension_name(source: Path = SOURCE, flags: list[str] | None = None) -> str:
    """Name of a JIT-built module: changes when the source, the flags or torch change."""
    h = hashlib.sha256()
    h.update(source.read_bytes())
    for header in HEADERS:
        h.update(header.read_bytes())
    h.update(" ".join(flags if flags is not None else build_flags(isa.chosen())).encode())
    h.update(torch.__version__.encode())
    return f"stackcomp_ds_cpu_{h.hexdigest()[:12]}"


def disabled() -> bool:
    return os.environ.get("STACKCOMP_KERNELS", "").lower() == "torch"


def import_built(variant: str) -> tuple[ModuleType | None, str | None]:
    """The prebuilt module of ``variant``, or (None, why it cannot be used)."""
    name = isa.module_name(variant)
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as e:
        if e.name == name:
            return None, "not installed"
        return None, f"{type(e).__name__}: {e}"
    except ImportError as e:  # e.g. built against another torch
        return None, f"{type(e).__name__}: {e}"


def get_extension(verbose: bool = False):
    """The kernel module for this CPU (prebuilt; JIT-built only where none is installed); ``None``
    if disabled or unavailable. A bad ``STACKCOMP_CPU_ISA`` raises KernelError.

    The outcome (and the environment) is read once; :func:`reset` makes the next call look again.
    """
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if _state["tried"]:
            return _state["ext"]
        if disabled():
            _state.update(ext=None, tried=True, error="disabled by STACKCOMP_KERNELS=torch")
            return None
        want = isa.chosen()
        missing: list[tuple[str, str | None]] = []
        for variant in isa.down_from(want):
            ext, why = import_built(variant)
            if ext is not None:
                if missing:
                    log.warning("stackcomp: the %s build of the CPU kernel cannot be used (%s); running the %s "
                                "build instead", want, missing[0][1], variant)
                _state.update(ext=ext, variant=variant, tried=True)
                return ext
            missing.append((variant, why))
        log.warning("stackcomp: this install has no prebuilt CPU kernel (%s), as in a source tree that was never "
                    "built; compiling the %s variant now (`pip install --no-build-isolation -e .` builds them "
                    "once)", "; ".join(f"{v}: {why}" for v, why in missing), want)
        try:
            flags = build_flags(want)
            ext = load_extension(extension_name(SOURCE, flags), [SOURCE], flags, list(isa.LDFLAGS), verbose=verbose)
            _state.update(ext=ext, variant=want)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
            _state.update(ext=None, variant=None, error=f"{type(e).__name__}: {e}")
            log.warning("stackcomp: the DS CPU kernel could not be built (%s); falling back to the torch path. "
                        "Set STACKCOMP_KERNELS=torch to skip the build.", str(e).splitlines()[0] if str(e) else e)
        _state["tried"] = True
        return _state["ext"]


def variant() -> str | None:
    """The ISA variant of the kernel that runs here (loading it); None: the torch path."""
    get_extension()
    return _state["variant"]


def check_packed_variant(packed_with: str, who: str = "this model") -> None:
    """Warn (once per pair) when a model packed where the ``packed_with`` kernel ran is loaded where
    a lesser variant (or none) runs: it still runs, on the next variant down, more slowly, and its
    int8 layers may round differently (vnni8 rounds activations to 8 bits, q15 to 16)."""
    if disabled():
        return
    running = variant()
    known = packed_with in isa.NAMES
    if running is not None and (not known or isa.rank(running) <= isa.rank(packed_with)):
        return
    if (packed_with, running) in _warned:
        return
    _warned.add((packed_with, running))
    here = f"the {running} build" if running is not None else f"the torch path ({build_error() or 'no kernel'})"
    log.warning("stackcomp: %s was packed with the %s CPU kernel; this CPU (or install) runs %s instead: "
                "slower, and int8 layers may round differently. Re-run the pack stage here to record it.",
                who, packed_with, here)


def load_extension(name: str, sources: list[Path], cflags: list[str], ldflags: list[str], *,
                   verbose: bool = False, wait_s: float | None = None) -> ModuleType:
    """The extension ``name``, loaded from its finished build, else built with torch's JIT builder
    under a build lock. ``name`` must change whenever what is built changes (see extension_name).

    The lock is a ``filelock`` lock in the build directory: the OS drops it when its holder dies,
    so a killed build never blocks the next. Waiting for a live builder is logged and bounded by
    ``wait_s`` (``STACKCOMP_KERNEL_BUILD_WAIT``); past it KernelError is raised.
    """
    from filelock import FileLock, Timeout
    from torch.utils import cpp_extension

    # torch's own choice of folder (TORCH_EXTENSIONS_DIR, or its per-python/accelerator default)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose))
    library = build_dir / f"{name}{getattr(cpp_extension, 'LIB_EXT', '.so')}"
    module = _load_finished(name, library)
    if module is not None:
        return module
    if wait_s is None:
        wait_s = float(os.environ.get("STACKCOMP_KERNEL_BUILD_WAIT", "") or BUILD_WAIT_S)
    lock = FileLock(str(build_dir / BUILD_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another process that is building the kernel %s in %s (up to %.0f s)",
                    name, build_dir, wait_s)
        try:
            lock.acquire(timeout=wait_s)
        except Timeout:
            raise KernelError(f"another process held the kernel build lock {build_dir / BUILD_LOCK} for more than "
                              f"{wait_s:.0f} s") from None
    try:
        module = _load_finished(name, library)  # built by the process we waited for
        if module is not None:
            return module
        baton = build_dir / TORCH_BATON
        if baton.exists():  # every builder holds our lock: this one's holder died mid-build
            log.warning("removed a stale build lock %s left by an interrupted kernel build", baton)
            baton.unlink(missing_ok=True)
        module = cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=cflags,
                                    extra_ldflags=ldflags, build_directory=str(build_dir), verbose=verbose)
        atomic_write_text(build_dir / BUILT_STAMP, name)
        return module
    finally:
        lock.release()


def _load_finished(name: str, library: Path) -> ModuleType | None:
    """The module of a build this code finished (stamp present), imported without running ninja."""
    build_dir = library.parent
    try:
        if (build_dir / BUILT_STAMP).read_text() != name or not library.is_file():
            return None
    except OSError:
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:  # a damaged library: build it again
        log.warning("the built kernel %s cannot be loaded (%s); building it again", library, e)
        (build_dir / BUILT_STAMP).unlink(missing_ok=True)
        return None
    return module


def extension_with(function: str, who: str):
    """The kernel module where it has ``function`` (kernels added later than some builds), else None;
    ``who`` then logs once why it computes with torch ops instead."""
    ext = get_extension()
    if ext is not None and hasattr(ext, function):
        return ext
    if who not in _missing:
        _missing.add(who)
        why = build_error() or (f"the loaded extension predates {function}: rebuild it" if ext is not None
                                else "no kernel")
        log.warning("%s: the C++ kernel cannot run (%s); computing with torch ops", who, why)
    return None


def build_error() -> str | None:
    """Why the last build failed (None if it did not fail or was not tried)."""
    return _state["error"]


def reset() -> None:
    """Forget the build outcome (tests; after changing the environment)."""
    with _lock:
        _state.update(ext=None, tried=False, error=None, gen=_state["gen"] + 1, variant=None)
        _warned.clear()
        _missing.clear()


def available() -> bool:
    return get_extension() is not None


def q15_values(packed: PackedDS) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int16 gather operands of an int8 layer: w = v8 << shift, flush = vscale * 2^(15 - shift).

    shift (per output row and block) is the largest with sum_j |w| <= 32767 - s, so the kernel's
    int16 sum of one row of one block cannot overflow (see ``gather_q15`` in ds_cpu_kernels.h).
    Its rounding error grows like s / 2^15 of a row's sum (about 1e-3 at s = 32), so above
    ``Q15_MAX_NNZ`` nonzeros, or when even shift 0 does not fit, this returns ``None`` and the
    kernel gathers in fp32 instead (exact, about 1.5x slower).
    """
    v8 = packed.tensors["values"]                                    # (nb, OG, s, 8) int8
    nb, og, s, g = v8.shape
    if s > Q15_MAX_NNZ:
        return None
    lim = 32767 - s
    sabs = v8.to(torch.int32).abs().sum(dim=2)                        # (nb, OG, 8)
    if int(sabs.max()) > lim:
        return None
    sh = torch.zeros_like(sabs)
    for k in range(1, 16):
        sh = torch.where((sabs > 0) & ((sabs << k) <= lim), torch.full_like(sh, k), sh)
    w16 = (v8.to(torch.int32) << sh.unsqueeze(2)).to(torch.int16).contiguous()
    flush = packed.tensors["values_scale"].view(1, og, g) * torch.exp2((15 - sh).float())
    return w16, flush.reshape(nb, og * g).contiguous()


def vnni8_operands(packed: PackedDS) -> tuple:
    """The vnni8 kernel's tensors for an int8 layer (layouts in ds_cpu_vnni8.h), made once per layer.

    Nonzeros are padded to a multiple of 4 per row and block (value 0), rows to a multiple of 16.
    """
    ops = packed.cache.get("vnni8_operands")
    if ops is not None:
        return ops
    m = packed.meta
    nb, K, B, s, out = (int(m[k]) for k in ("n_blocks", "atoms", "block", "nnz", "out_features"))
    if K > 256:
        raise KernelError(f"the vnni8 kernel takes at most 256 atoms per block, this layer has {K}")
    KV, B4, L, OV = -(-K // 16), -(-B // 4), -(-s // 4), -(-out // 16)
    d, dscale, v, vscale, i, bias = packed.unpack_int8()                   # canonical: v, i (nb, out, s)
    dp = torch.zeros(nb, KV * 16, B4 * 4, dtype=torch.int8)
    dp[:, :K, :B] = d
    dcor = (128 * dp.to(torch.int32).sum(-1)).to(torch.int32)               # (nb, KV*16)
    dsc = torch.zeros(nb, KV * 16)
    dsc[:, :K] = dscale
    dpk = dp.view(nb, KV, 16, B4, 4).permute(0, 1, 3, 2, 4).contiguous()  # (nb, KV, B4, 16, 4)
    vp = torch.zeros(nb, OV * 16, L * 4, dtype=torch.int8)
    ip = torch.zeros(nb, OV * 16, L * 4, dtype=torch.uint8)
    vp[:, :out, :s] = v
    ip[:, :out, :s] = i
    vval = vp.view(nb, OV, 16, L, 4).permute(0, 3, 1, 2, 4).contiguous()   # (nb, L, OV, 16, 4)
    vidx = ip.view(nb, OV, 16, L, 4).permute(0, 3, 1, 2, 4).contiguous()
    vcor = (128 * vp.to(torch.int32).sum(dim=(0, 2))).to(torch.int32)      # (OV*16)
    vsc = torch.zeros(OV * 16)
    vsc[:out] = vscale
    ops = (dpk, dcor, dsc, vidx, vval, vcor, vsc, bias, out, K, B)
    packed.cache["vnni8_operands"] = ops
    return ops


def build_int8_kernel(ext, want: str | None = None) -> str:
    """The int8 kernel this build runs for layers that fit it: "vnni8" or "q15".

    ``want`` None reads STACKCOMP_INT8_KERNEL (default "auto": vnni8 where the build has it).
    """
    want = (want or os.environ.get("STACKCOMP_INT8_KERNEL", "") or "auto").lower()
    if want not in INT8_KERNELS:
        raise KernelError(f"int8 kernel (STACKCOMP_INT8_KERNEL) must be one of {INT8_KERNELS}, got {want!r}")
    has = getattr(ext, "has_vnni8", None)
    if want == "vnni8" and not (has is not None and has()):
        raise KernelError("int8 kernel vnni8 was asked for, but this build cannot run it (needs AVX-512 VBMI and "
                          "VNNI)")
    return "vnni8" if want != "q15" and has is not None and has() else "q15"


def int8_kernel(packed: PackedDS, ext, want: str | None = None) -> str:
    """Which int8 kernel runs this layer above SMALL_MAX_TOKENS tokens: "vnni8" or "q15"
    (:func:`build_int8_kernel`, and vnni8 only for int8 layers of at most 256 atoms)."""
    want = (want or os.environ.get("STACKCOMP_INT8_KERNEL", "") or "auto").lower()
    kernel = build_int8_kernel(ext, want)
    fits = packed.dtype == "int8" and int(packed.meta["atoms"]) <= 256
    if want == "vnni8" and not fits:
        raise KernelError("int8 kernel vnni8 was asked for, but this layer cannot run it (needs an int8 layer "
                          "with at most 256 atoms)")
    return "vnni8" if kernel == "vnni8" and fits else "q15"


def _operands(packed: PackedDS, q15: bool = True) -> tuple:
    """The kernel's tensor arguments, made once per packed layer (int8: + the Q15 operands, which
    only the q15 kernel reads: ``q15=False`` leaves them out for layers that run vnni8)."""
    key = "cpu_operands" if q15 else "cpu_operands_small"
    ops = packed.cache.get(key)
    if ops is None:
        t = packed.tensors
        if packed.dtype == "int8":
            q = q15_values(packed) if q15 else None
            w16, flush = q if q is not None else (_EMPTY, _EMPTY)
            ops = (t["dictionary"], t["dictionary_scale"].contiguous(), t["values"], t["values_scale"], w16, flush,
                   t["indices"], t.get("bias"))
        else:
            ops = (t["dictionary"], _EMPTY, t["values"], _EMPTY, _EMPTY, _EMPTY, t["indices"], t.get("bias"))
        packed.cache[key] = ops
    return ops


def cpu_caller(packed: PackedDS, ext=None, small_max: int = SMALL_MAX_TOKENS,
               int8_kernel_name: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function x -> y running the compiled kernel on this layer, with the per-call Python work
    cut to a minimum (the operands are made once). x: (..., in) on CPU, any float dtype.
    ``int8_kernel_name``: see :func:`int8_kernel` (int8 layers only)."""
    ext = ext if ext is not None else get_extension()
    if ext is None:
        raise KernelError("the DS CPU kernel is not available (build failed or disabled); use the torch path")
    if packed.group != CPU_GROUP or packed.device.type != "cpu":
        raise KernelError(f"packed DS layer has group {packed.group} on {packed.device}; the CPU kernel needs group "
                          f"{CPU_GROUP} on cpu: pack it with target='cpu'")
    vnni8 = packed.dtype == "int8" and int8_kernel(packed, ext, int8_kernel_name) == "vnni8"
    fwd, ops, out, inf = ext.ds_forward, _operands(packed, q15=not vnni8), packed.out_features, packed.in_features
    f32 = torch.float32
    if vnni8:  # the q15 kernel's few-token loop below small_max tokens, vnni8 above
        fwd8, ops8 = ext.ds_forward_vnni8, vnni8_operands(packed)

        def run(x2: torch.Tensor) -> torch.Tensor:
            return fwd(x2, *ops, out, small_max) if x2.shape[0] <= small_max else fwd8(x2, *ops8)
    else:
        def run(x2: torch.Tensor) -> torch.Tensor:
            return fwd(x2, *ops, out, small_max)

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != inf:
            raise KernelError(f"input has {x.shape[-1]} features, the packed DS layer expects {inf}")
        if x.dim() == 2 and x.dtype == f32 and x.is_contiguous():
            return run(x)
        lead = x.shape[:-1]
        y = run(x.reshape(-1, inf).to(f32).contiguous())
        return y.reshape(*lead, out).to(x.dtype)

    return call


def ds_forward_cpu(x: torch.Tensor, packed: PackedDS, ext=None, small_max: int = SMALL_MAX_TOKENS) -> torch.Tensor:
    """Run the compiled kernel on a CPU-packed layer; x (..., in) -> (..., out) in x's dtype (fp32 inside)."""
    return cpu_caller(packed, ext, small_max)(x)


_EMPTY = torch.empty(0)
