"""Build stackcomp with its C++ CPU kernel compiled once per ISA variant (stackcomp/kernels/isa.py).

Everything else about the package is in pyproject.toml. The kernel is compiled against the torch
of the build environment, so torch must be installed first and the build must not be isolated
(an isolated build would download another torch): ``pip install --no-build-isolation .``,
``python -m build --wheel --no-isolation`` (install.sh does the former). ``MAX_JOBS`` bounds the
variants compiled at once (default: the CPU count).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
KERNELS = "stackcomp/kernels"


def _isa():
    """stackcomp/kernels/isa.py, loaded by path (stackcomp itself is not importable while it builds)."""
    spec = importlib.util.spec_from_file_location("_stackcomp_build_isa", HERE / KERNELS / "isa.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit("stackcomp: building its C++ kernels needs torch in the build environment. Install torch first "
             "(./install.sh does), then build without isolation: pip install --no-build-isolation .")


class BuildKernelVariants(BuildExtension):
    """BuildExtension with one build folder per extension (every variant compiles the same source,
    so they would share object files and ninja's build file) and the variants compiled in parallel."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))

    def build_extension(self, ext) -> None:
        own = copy.copy(self)  # a shallow copy: parallel builds each get their own build_temp
        own.build_temp = os.path.join(self.build_temp, ext.name.rsplit(".", 1)[-1])
        super(BuildKernelVariants, own).build_extension(ext)


isa = _isa()
source = f"{KERNELS}/ds_cpu.cpp"
headers = [f"{KERNELS}/ds_cpu_kernels.h", f"{KERNELS}/ds_cpu_vnni8.h", f"{KERNELS}/ds_cpu_ffn.h", f"{KERNELS}/ds_cpu_norm.h",
           f"{KERNELS}/ds_cpu_attention.h", f"{KERNELS}/ds_cpu_embedding.h"]
extensions = [
    CppExtension(isa.module_name(v.name), [source], depends=headers,
                 extra_compile_args=[*isa.COMMON_CFLAGS, *v.cflags], extra_link_args=list(isa.LDFLAGS))
    for v in isa.built_variants()
]

setup(ext_modules=extensions, cmdclass={"build_ext": BuildKernelVariants})
