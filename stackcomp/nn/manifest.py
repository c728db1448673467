"""Layer manifests declared once: a layer lists its fields, the rest is derived here.

A layer that subclasses :class:`DeclaredLayer` names its constructor arguments in
``manifest_fields`` (:class:`Field`); from that list come

* ``manifest()``: ``layout_version`` first, then the fields in order -- the JSON every such layer
  has written since layout 1, so older artifacts load unchanged;
* ``from_manifest(entry)``: every field checked, the empty layer built, and any mistake in an
  edited manifest raised as ``ArtifactError`` naming the layer and the field;
* ``extra_repr()``;
* an exact ``storage()``: every tensor the layer saves, at its dtype's width (what the
  safetensors file holds), with ``param_tensors`` naming those that count as parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from stackcomp.errors import ArtifactError, StackcompError
from stackcomp.factorize.budget import FP32_BYTES, linear_params, tensor_bytes
from stackcomp.nn.base import CompressedLayer, LayerStorage

__all__ = ["DTYPES", "DeclaredLayer", "Field", "REQUIRED", "bias_field", "choice", "count", "dtype_field",
           "dtype_name", "flag"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

#: marks a field without a default: a manifest lacking it is refused
REQUIRED: Any = object()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Field:
    """One manifest field: how to check and read it, and how to write it from a layer.

    ``init=False``: not a constructor argument but a property of the built layer (e.g. the index
    dtype its shapes imply); an entry that names it must agree with the layer.
    """

    name: str
    check: Callable[[Any], bool]
    expected: str
    default: Any = REQUIRED
    load: Callable[[Any], Any] = lambda v: v
    dump: Callable[[Any], Any] | None = None
    init: bool = True
    repr: bool = True

    def value(self, layer: Any) -> Any:
        return self.dump(layer) if self.dump is not None else getattr(layer, self.name)

    def read(self, entry: dict[str, Any], who: str) -> Any:
        if self.name in entry:
            v = entry[self.name]
        elif self.default is REQUIRED:
            raise ArtifactError(f"{who} lacks field {self.name!r} (has {sorted(entry)})")
        else:
            v = self.default
        if not self.check(v):
            raise ArtifactError(f"{who}: field {self.name!r} must be {self.expected}, got {v!r}")
        return self.load(v)


def count(name: str, minimum: int = 1, default: Any = REQUIRED) -> Field:
    """An integer >= ``minimum`` (a size, a rank, a count of stored values)."""
    return Field(name, lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}", default)


def flag(name: str, default: Any = REQUIRED) -> Field:
    return Field(name, lambda v: isinstance(v, bool), "true/false", default)


def bias_field(default: Any = REQUIRED) -> Field:
    """``bias``: whether the layer has one (its ``bias`` tensor is not None)."""
    return Field("bias", lambda v: isinstance(v, bool), "true/false", default, dump=lambda m: m.bias is not None)


def dtype_field(tensor: str) -> Field:
    """``dtype``: the float dtype of the layer's tensors, read off ``tensor`` (float32 if absent)."""
    return Field("dtype", lambda v: isinstance(v, str) and v in DTYPES, f"one of {sorted(DTYPES)}", "float32",
                 load=DTYPES.__getitem__, dump=lambda m: dtype_name(getattr(m, tensor).dtype), repr=False)


def choice(name: str, options: Any, default: Any = REQUIRED) -> Field:
    return Field(name, lambda v: isinstance(v, str) and v in options, f"one of {sorted(options)}", default)


class DeclaredLayer(CompressedLayer):
    """A compressed layer whose manifest, repr and storage follow from ``manifest_fields``."""

    manifest_fields: ClassVar[tuple[Field, ...]] = ()
    #: tensors counted as parameters; scales, indices and row pointers count as bytes only
    param_tensors: ClassVar[tuple[str, ...]] = ()

    def manifest(self) -> dict[str, Any]:
        return {"layout_version": self.layout_version, **{f.name: f.value(self) for f in self.manifest_fields}}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> DeclaredLayer:
        who = f"layer manifest for {cls.__name__}"
        v = entry.get("layout_version", cls.layout_version)
        if v != cls.layout_version:
            raise ArtifactError(f"{who} has layout_version {v}, this stackcomp reads {cls.layout_version}; "
                                "re-run the stage that produced it")
        kwargs = {f.name: f.read(entry, who) for f in cls.manifest_fields if f.init}
        try:
            layer = cls(**kwargs)
        except StackcompError as e:  # sizes that are fine one by one but do not fit together
            raise ArtifactError(f"{who}: {e}") from None
        for f in cls.manifest_fields:
            if not f.init and entry.get(f.name) is not None and f.read(entry, who) != f.value(layer):
                raise ArtifactError(f"{who}: field {f.name!r} is {entry[f.name]!r}, but a layer of these sizes "
                                    f"holds {f.value(layer)!r}")
        return layer

    def dense_params(self) -> int:
        """Parameters of the module it replaces (an ``nn.Linear`` with this layer's bias)."""
        return linear_params(self.out_features, self.in_features, self.bias is not None)

    def storage(self) -> LayerStorage:
        params = sum(t.numel() for t in (getattr(self, n) for n in self.param_tensors) if t is not None)
        nbytes = tensor_bytes(*self.state_dict(keep_vars=True).values())
        dense = self.dense_params()
        return LayerStorage(params=params, bytes=nbytes, dense_params=dense, dense_bytes=float(dense * FP32_BYTES))

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={f.value(self)}" for f in self.manifest_fields if f.repr)
