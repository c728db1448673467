"""What a compressed model's ``config.json`` says to transformers.

A compressed export is a Hugging Face folder whose ``config.json`` carries

* ``quantization_config``: ``quant_method: "stackcomp"``, the layer manifest's format version,
  the saved model class and the layer manifest itself (``layers``: name -> type and sizes), which
  :class:`stackcomp.hf_quantizer.StackcompHfQuantizer` rebuilds the compressed layers from;
* ``transformers_weights``: the name of a weights file that does not exist
  (:data:`GUARD_WEIGHTS`), written into the file by :func:`guard_folder` after each save (by
  stackcomp, and by ``save_pretrained`` of a model stackcomp or its quantizer loaded).
  transformers 5 only warns about an unknown ``quant_method`` and would then load the int8 or
  factorized tensors into dense layers (mis-scaled, or missing and randomly initialised); with this name it fails with ``FileNotFoundError`` naming the file instead.
  stackcomp's quantizer clears the name before transformers looks for the weights, so with
  ``import stackcomp`` done ``from_pretrained`` finds ``model.safetensors`` as usual.

A dense model (no compressed layer) gets neither: anyone loads it. Importing this module is cheap
(no transformers); :mod:`stackcomp.hf_register` says when the quantizer is registered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FORMAT_VERSION", "GUARD_WEIGHTS", "QUANT_METHOD", "guard_folder", "hook_save_pretrained",
           "manifest_layers", "mark_config", "quantization_layers"]

QUANT_METHOD = "stackcomp"
#: the layer manifest's schema (``artifacts.MANIFEST_SCHEMA``): what ``layers`` entries follow
FORMAT_VERSION = 1
#: the weights file plain transformers is sent to look for, and does not find
GUARD_WEIGHTS = "import-stackcomp-to-load-this-model.safetensors"


def manifest_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every compressed layer of ``model`` by module name: its type and manifest (sizes, dtypes)."""
    from stackcomp.nn.base import CompressedLayer

    return {name: {"type": type(m).__name__, **m.manifest()}
            for name, m in model.named_modules() if isinstance(m, CompressedLayer)}


def mark_config(config: Any, model: nn.Module, layers: dict[str, dict[str, Any]] | None = None) -> Any:
    """Set ``config``'s ``architectures``, ``dtype`` and ``quantization_config`` for ``model`` as it is now (a
    dense model: no quantization config). Returns ``config``. The guard is written into the file by
    :func:`guard_folder`: transformers drops ``transformers_weights`` from a config it saves."""
    layers = manifest_layers(model) if layers is None else layers
    config.architectures = [type(model).__name__]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:  # as save_pretrained records it: the dtype from_pretrained(dtype="auto") loads in
        config.dtype = str(dtype).removeprefix("torch.")
    if layers:
        from stackcomp.version import __version__

        config.quantization_config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                      "model_class": type(model).__name__, "stackcomp_version": __version__,
                                      "layers": layers}
    elif hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if hasattr(config, "transformers_weights"):
        delattr(config, "transformers_weights")
    return config


def guard_folder(folder: str | Path) -> None:
    """Name :data:`GUARD_WEIGHTS` in ``folder/config.json`` if it holds stackcomp's quantization_config."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    qc = config.get("quantization_config")
    guarded = isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD
    if guarded == (config.get("transformers_weights") == GUARD_WEIGHTS):
        return
    if guarded:
        config["transformers_weights"] = GUARD_WEIGHTS
    else:
        config.pop("transformers_weights", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class _GuardedSave:
    """``model.save_pretrained`` that writes the guard after transformers saved. An object holding
    the model, not a closure: a deep copy or a pickle of the model carries it, bound to the copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        out = type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        guard_folder(save_directory)
        return out


def hook_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the guard too, so the folder it writes is refused by
    transformers without stackcomp as the export was."""
    model.save_pretrained = _GuardedSave(model)


def quantization_layers(config: Any) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """(model class, layers) from a config whose ``quantization_config`` is stackcomp's, else None."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return None
    from stackcomp.errors import ArtifactError

    if qc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"quantization_config has stackcomp format_version {qc.get('format_version')!r}; "
                            f"this stackcomp reads {FORMAT_VERSION}")
    layers, model_class = qc.get("layers"), qc.get("model_class")
    if not isinstance(layers, dict) or not isinstance(model_class, str):
        raise ArtifactError("quantization_config (stackcomp) lacks its layer manifest (layers) or model_class")
    return model_class, layers
