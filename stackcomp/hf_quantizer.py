"""stackcomp's quantization config and ``HfQuantizer`` for transformers' ``from_pretrained``.

``AutoModelFor*.from_pretrained(export)`` with ``import stackcomp`` done: transformers builds the
dense model (on the meta device), :class:`StackcompHfQuantizer` swaps in the compressed layers
named by ``quantization_config.layers`` (each built empty from its manifest entry, as
``stackcomp.load`` does), checks that the weights file holds every tensor of every compressed
layer at its dtype and shape, and transformers then loads the weights into them. Anything
missing or different raises: the model is never loaded with absent or re-cast compressed tensors.

Imports transformers: :mod:`stackcomp.hf_integration` imports this module only once transformers'
quantizer registry is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from stackcomp.errors import ArtifactError
from stackcomp.hf_integration import (
    FORMAT_VERSION,
    GUARD_WEIGHTS,
    QUANT_METHOD,
    hook_save_pretrained,
)

__all__ = ["StackcompConfig", "StackcompHfQuantizer", "register"]

#: safetensors' dtype names
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}


class StackcompConfig(QuantizationConfigMixin):
    """``quantization_config`` of a stackcomp export: the saved model class and its layer manifest."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, format_version: int | None = None,
                 model_class: str | None = None, stackcomp_version: str | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.model_class = model_class
        self.stackcomp_version = stackcomp_version
        self.layers = layers
        self.post_init()

    def post_init(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ArtifactError(f"quantization_config has stackcomp format_version {self.format_version!r}; this "
                                f"stackcomp reads {FORMAT_VERSION}: load it with the stackcomp that wrote it "
                                f"({self.stackcomp_version or 'unknown version'})")
        if not isinstance(self.layers, dict) or not self.layers or not isinstance(self.model_class, str):
            raise ArtifactError("quantization_config (stackcomp) lacks its layer manifest (layers) or model_class")


class StackcompHfQuantizer(HfQuantizer):
    """Rebuilds stackcomp's compressed layers before transformers loads the weights into them."""

    #: loads models stackcomp compressed; it does not compress a model on load
    requires_calibration = True

    def __init__(self, quantization_config: StackcompConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        #: model-side state-dict name -> (dtype, shape) of every compressed tensor
        self._expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def update_attn_implementation(self, config):
        # the one hook that sees the model config before transformers resolves the weights file:
        # drop the guard so it finds model.safetensors
        if getattr(config, "transformers_weights", None) == GUARD_WEIGHTS:
            del config.transformers_weights
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from stackcomp.nn.base import layer_class
        from stackcomp.targets import set_module

        qc = self.quantization_config
        same_class = type(model).__name__ == qc.model_class
        headers = _headers(checkpoint_files or [])
        weights = [f for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        if len(weights) == 1:  # heads and FFN neurons removed by prune_structured, as stackcomp.load does
            from stackcomp.nn.pruning import restore_pruned_shapes

            restore_pruned_shapes(model, weights[0], qc.layers)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # layers built as stackcomp.load builds them, whatever dtype= says
        try:
            for saved_name, entry in qc.layers.items():
                name = _model_name(model, saved_name)
                if name is None:
                    if same_class:
                        raise ArtifactError(f"stackcomp layer {saved_name!r} of the manifest is not a module of "
                                            f"{type(model).__name__}")
                    continue  # a head the requested class does not have (e.g. AutoModel on a classifier)
                entry = dict(entry)
                layer = layer_class(entry.pop("type")).from_manifest(entry)
                # a layer holding another manifest layer (a fused block output's int8 dense) is built with a
                # plain placeholder there: that one's own entry, set after it, checks its tensors
                nested = [f"{n}." for n in qc.layers if n.startswith(f"{saved_name}.")]
                for tname, t in layer.state_dict(keep_vars=True).items():
                    key = f"{saved_name}.{tname}"
                    if any(key.startswith(n) for n in nested):
                        continue
                    _check_stored(key, t, headers)
                    self._expected[f"{name}.{tname}"] = (t.dtype, tuple(t.shape))
                set_module(model, name, layer)
        finally:
            torch.set_default_dtype(default)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        state = model.state_dict(keep_vars=True)
        for name, (dtype, shape) in self._expected.items():
            t = state.get(name)
            if t is None or t.is_meta:
                raise ArtifactError(f"stackcomp layer tensor {name} was not loaded")
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ArtifactError(f"stackcomp layer tensor {name} loaded as {t.dtype} {tuple(t.shape)}, "
                                    f"the layer holds {dtype} {shape}")
        from stackcomp.nn.base import link_layers

        link_layers(model)  # parts that read from a sibling (fused QKV) find it
        hook_save_pretrained(model)  # its save_pretrained writes the guard again
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _model_name(model: torch.nn.Module, saved: str) -> str | None:
    """``saved`` (a module name in the exported class) in ``model``, across the base-model prefix."""
    names = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [saved]
    if prefix:
        candidates += [saved.removeprefix(f"{prefix}."), f"{prefix}.{saved}"]
    return next((c for c in candidates if c in names), None)


def _headers(files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out = {}
    for path in files:
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                names = f.keys()  # a safe_open handle is not iterable itself
                for k in names:
                    s = f.get_slice(k)
                    out[k] = (s.get_dtype(), tuple(s.get_shape()))
    return out


def _check_stored(key: str, t: torch.Tensor, headers: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    if key not in headers:
        raise ArtifactError(f"the weights file lacks {key}, a tensor of a stackcomp compressed layer: "
                            "the export is incomplete; not loaded")
    dtype, shape = headers[key]
    if dtype != _ST_DTYPES.get(t.dtype) or shape != tuple(t.shape):
        raise ArtifactError(f"the weights file holds {key} as {dtype} {list(shape)}, its stackcomp layer needs "
                            f"{_ST_DTYPES.get(t.dtype, t.dtype)} {list(t.shape)}; not loaded")


def register() -> None:
    """Make ``quant_method: stackcomp`` known to transformers (idempotent)."""
    auto = importlib.import_module("transformers.quantizers.auto")
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(StackcompConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(StackcompHfQuantizer)
