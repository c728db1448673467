"""Conversions keyed by layer type: how ``int8`` and ``pack`` find a layer's next form, and how
size reports find its bytes.

One mechanism, a registry (in the spirit of torchao's ``register_quantize_module_handler``), so a
plugin can add a conversion for a class it does not own (``nn.Linear``) as well as for its own::

    from stackcomp.nn.conversions import Keep, register_conversion

    @register_conversion("int8", BlockDiagonalLinear)
    def _int8(layer, config):          # config: Int8Config for "int8", PackConfig for "pack"
        return Int8BlockDiagonalLinear.from_layer(layer, config.backend)

A conversion is ``fn(module, config)`` returning

* a new module: the converted layer (the pass swaps it in and reports it);
* :class:`Keep` ``(reason)``: leave this layer as it is, and say why in the pass's report;
* ``None``: nothing to do for this layer (e.g. already packed; a dense linear without 2:4 zeros).

Lookup walks the module's MRO, so subclasses inherit their base's conversion; a later
registration for the same (kind, type) replaces the earlier one. The passes select layers by
"has a conversion of my kind": ``int8`` lists a targeted compressed layer without one as
skipped, ``pack`` lists it as kept. The built-in conversions register themselves the same way
(``nn.Linear``/``DSLinear``/``LowRankLinear``/``nn.Embedding`` for ``"int8"`` in
``stackcomp.nn.quantized``, ``DSLinear``/``Int8DSLinear``/``nn.Linear`` (2:4) for ``"pack"`` in
``stackcomp.nn.packed``). Kinds are free strings; ``"int8"`` and ``"pack"`` are the built-in
passes'.

Sizes: :func:`layer_storage` finds a module's exact :class:`LayerStorage` by the same MRO walk
over :func:`register_storage` (``nn.Linear`` and ``CompressedLayer``, whose ``storage()`` method
answers, are registered here), so a plugin layer counts at the bytes it declares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from stackcomp.nn.base import CompressedLayer, LayerStorage, dense_storage

__all__ = ["CONVERSION_KINDS", "Conversion", "Int8Config", "Keep", "PackConfig", "convert", "convertible_types",
           "find_conversion", "layer_storage", "register_conversion", "register_storage", "unregister_conversion"]

log = logging.getLogger("stackcomp.conversions")

#: the kinds the built-in passes look up
CONVERSION_KINDS = ("int8", "pack")


@dataclass(frozen=True)
class Int8Config:
    """What an ``"int8"`` conversion is told. ``embedding_*`` only concern embedding tables."""

    backend: str = "torch"
    embedding_format: str = "int8"
    embedding_group_size: int = 64
    embedding_fit: str = "minmax"


@dataclass(frozen=True)
class PackConfig:
    """What a ``"pack"`` conversion is told: the kernel layout (``cpu``/``cuda``), the DS value
    dtype (``auto`` keeps each layer's), the kernel ``pack`` chose for the layout, and whether
    2:4-sparse linears may become 2:4 kernels."""

    layout: str = "cpu"
    dtype: str = "auto"
    kernel: str = "auto"
    sparse24: bool = True


@dataclass(frozen=True)
class Keep:
    """A conversion's answer "leave this layer as it is": ``reason`` goes to the report under ``key``."""

    reason: str
    key: str = "kept"


Conversion = Callable[[nn.Module, Any], "nn.Module | Keep | None"]
_F = TypeVar("_F", bound=Callable)

_CONVERSIONS: dict[str, dict[type, Conversion]] = {}
_STORAGE: dict[type, Callable[[nn.Module], LayerStorage]] = {}


def _check(kind: str, layer_type: Any) -> None:
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"conversion kind must be a non-empty string, got {kind!r}")
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"conversions are keyed by an nn.Module subclass, got {layer_type!r}")


def register_conversion(kind: str, layer_type: type[nn.Module]) -> Callable[[_F], _F]:
    """Decorator: ``fn(module, config)`` converts ``layer_type`` (and its subclasses) for ``kind``."""
    _check(kind, layer_type)

    def deco(fn: _F) -> _F:
        table = _CONVERSIONS.setdefault(kind, {})
        if layer_type in table and table[layer_type] is not fn:
            log.info("%s conversion for %s replaced by %s.%s", kind, layer_type.__name__,
                     getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", fn))
        table[layer_type] = fn
        return fn

    return deco


def unregister_conversion(kind: str, layer_type: type[nn.Module]) -> Conversion | None:
    """Remove the conversion registered for exactly ``layer_type`` (not its bases); return it."""
    return _CONVERSIONS.get(kind, {}).pop(layer_type, None)


def _builtins() -> None:
    import stackcomp.nn  # noqa: F401  (importing the package registers the built-in layers and conversions)


def _lookup(table: dict[type, Any], cls: type) -> Any:
    for base in cls.__mro__:
        if base in table:
            return table[base]
    return None


def find_conversion(kind: str, layer: nn.Module | type) -> Conversion | None:
    """The ``kind`` conversion for a module (or class): its own type's, else the nearest base's."""
    _builtins()
    return _lookup(_CONVERSIONS.get(kind, {}), layer if isinstance(layer, type) else type(layer))


def convertible_types(kind: str) -> tuple[type, ...]:
    """Every type with a ``kind`` conversion registered (for ``isinstance`` selection)."""
    _builtins()
    return tuple(_CONVERSIONS.get(kind, {}))


def convert(kind: str, module: nn.Module, config: Any) -> nn.Module | Keep | None:
    """Run ``module``'s ``kind`` conversion; a module without one is kept (:class:`Keep`)."""
    fn = find_conversion(kind, module)
    if fn is None:
        return Keep(f"no {kind} form")
    return fn(module, config)


def register_storage(layer_type: type[nn.Module]) -> Callable[[_F], _F]:
    """Decorator: ``fn(module) -> LayerStorage`` gives the exact bytes of ``layer_type`` modules."""
    _check("storage", layer_type)

    def deco(fn: _F) -> _F:
        _STORAGE[layer_type] = fn
        return fn

    return deco


def layer_storage(module: nn.Module) -> LayerStorage | None:
    """Exact storage of a layer (by the registry, nearest type first), or None if none is known."""
    _builtins()
    fn = _lookup(_STORAGE, type(module))
    return None if fn is None else fn(module)


register_storage(nn.Linear)(dense_storage)


@register_storage(CompressedLayer)
def _compressed_storage(layer: CompressedLayer) -> LayerStorage:
    return layer.storage()
