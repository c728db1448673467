"""Which build of the C++ CPU kernel a CPU runs: the ISA variants, their compiler flags, the CPU check.

The kernel (ds_cpu.cpp) is compiled when the package is built, once per variant, each into its own
extension module (``stackcomp.kernels._ds_cpu_<variant>``); at run time ``ds_cpu`` imports the best
variant this CPU can execute. ``setup.py`` loads this file by path before stackcomp is importable,
so it imports only the standard library at module level.

``STACKCOMP_CPU_ISA=<variant>`` caps the choice (a variant at most this good): to test the fallback
on a better CPU, or to pin one variant across a fleet. It never raises the choice above what the
CPU reports: a variant the CPU cannot run would die with an illegal instruction.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

ENV = "STACKCOMP_CPU_ISA"
#: every variant's flags; -fopenmp lets at::parallel_for (inlined from ATen headers) use threads;
#: -g0 overrides the -g of Python's own CFLAGS (setuptools builds), which makes each module 10x larger
COMMON_CFLAGS = ("-O3", "-g0", "-fopenmp", "-ffp-contract=fast")
LDFLAGS = ("-fopenmp",)


@dataclass(frozen=True)
class Variant:
    name: str
    #: /proc/cpuinfo flags the CPU must report to run it
    cpu_flags: tuple[str, ...]
    #: compiler flags on x86-64, beyond COMMON_CFLAGS
    cflags: tuple[str, ...]


#: x86-64-v3 (Haswell, Zen 1 and later): what every AVX2 CPU has, as /proc/cpuinfo and gcc name it
_V3_FLAGS = ("avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe")
_V3_CFLAGS = ("-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe")

#: best first; each runs on every CPU that runs the ones before it
VARIANTS: tuple[Variant, ...] = (
    # the int8 kernel with 8-bit activations (ds_cpu_vnni8.h) and the VNNI q15 gather
    Variant("avx512vnni", (*_V3_FLAGS, "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512vbmi"),
            (*_V3_CFLAGS, "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi")),
    # the q15 int8 kernel (AVX2 intrinsics), 256-bit fp32 code
    Variant("avx2", _V3_FLAGS, _V3_CFLAGS),
    # any x86-64 (SSE2) or other CPU: fp32 by GCC vector extensions, int8 by the few-token loop
    Variant("generic", (), ()),
)
NAMES = tuple(v.name for v in VARIANTS)


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def built_variants() -> tuple[Variant, ...]:
    """What setup.py compiles here: every variant on x86-64, the generic one elsewhere."""
    return VARIANTS if is_x86() else (VARIANTS[-1],)


def module_name(variant: str) -> str:
    return f"stackcomp.kernels._ds_cpu_{variant}"


def cpu_flags() -> set[str] | None:
    """The flags line of /proc/cpuinfo (None where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def detected() -> str:
    """The best variant this CPU runs, from its flags (torch's capability where /proc is missing:
    its "AVX512" does not say VNNI/VBMI, so it means avx2 here)."""
    if not is_x86():
        return "generic"
    flags = cpu_flags()
    if flags is None:
        import torch

        return "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "generic"
    return next(v.name for v in VARIANTS if set(v.cpu_flags) <= flags)


def rank(variant: str) -> int:
    """0 for the best variant; larger is more portable."""
    return NAMES.index(variant)


def chosen() -> str:
    """The variant to run: :func:`detected`, capped by ``STACKCOMP_CPU_ISA``."""
    best = detected()
    cap = os.environ.get(ENV, "").strip().lower()
    if not cap:
        return best
    if cap not in NAMES:
        from stackcomp.kernels.reference import KernelError

        raise KernelError(f"{ENV} must be one of {', '.join(NAMES)}, got {cap!r}")
    return NAMES[max(rank(cap), rank(best))]


def down_from(variant: str) -> tuple[str, ...]:
    """``variant`` and the more portable ones after it, in the order to try them."""
    return NAMES[rank(variant):]
