"""When stackcomp's quantizer is registered with transformers: on ``import stackcomp``, cheaply.

Importing transformers' quantizer registry costs seconds, so :func:`install` does not: it
registers at once if ``transformers.quantizers.auto`` is already imported, else right after it
is (an import hook that removes itself). Every ``from_pretrained`` imports that module first.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

__all__ = ["install"]

log = logging.getLogger("stackcomp.hf")

_AUTO = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from stackcomp.hf_quantizer import register

        register()
    except Exception as e:  # noqa: BLE001 - never break transformers' import: loading then fails on the guard
        log.warning("stackcomp could not register its transformers quantizer (%s: %s); "
                    "stackcomp exports will not load through from_pretrained", type(e).__name__, e)


class _RegisteringLoader(importlib.abc.Loader):
    """The module's own loader, registering once the module has run."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def __getattr__(self, name):  # get_source, get_filename... as the file loader answers them
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _register()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers the quantizer right after ``transformers.quantizers.auto`` is executed."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Register stackcomp's quantizer with transformers now if its registry is imported, else when it is."""
    if _AUTO in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
