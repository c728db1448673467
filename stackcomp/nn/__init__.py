"""Compressed layer modules. They load and run without the engine or any pass."""

from stackcomp.nn.base import (
    LAYER_TYPES,
    CompressedLayer,
    LayerStorage,
    dense_storage,
    layer_class,
    link_layers,
    register_layer,
    register_model_link,
)

__all__ = ["LAYER_TYPES", "CompressedLayer", "LayerStorage", "dense_storage", "layer_class", "link_layers",
           "register_layer", "register_model_link"]

# Built-in layers (and model-wide link hooks) register themselves on import.
for _mod in ("ds_linear", "lowrank", "quantized", "packed", "remapped", "fused", "fused_qkv", "fused_norm", "half",
             "unpadded", "native_blocks"):
    try:
        __import__(f"stackcomp.nn.{_mod}")
    except ModuleNotFoundError as _e:  # a layer module not written yet
        if _e.name != f"stackcomp.nn.{_mod}":
            raise
