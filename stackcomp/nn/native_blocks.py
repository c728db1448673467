"""Each encoder block's inference as one C++ call ("native blocks"), for single sentences on CPU.

Why: once a block's arithmetic is int8 kernels (a fused QKV projection, the varlen attention, a
fused residual LayerNorm, a fused FFN), a single sentence's forward is mostly Python: about fifteen
module calls per block, each with its hooks, checks and small tensor views, around five C++ calls
that take microseconds. On a 2-core CPU the module glue took three quarters of a pruned int8
MiniLM's time per sentence. A native block (``EncoderBlock`` of the C++ extension) holds the
block's kernel operands and runs the five calls in C++ (the GIL released), as PyTorch's own
``nn.TransformerEncoderLayer`` fast path and BetterTransformer did for their layers.

What qualifies (:func:`block_parts`): a post-norm block in BERT's layout as ``pack``'s fusions leave
it -- ``attention.self.query`` a :class:`~stackcomp.nn.fused_qkv.FusedInt8QKV` and
``attention.output.dense`` an ``Int8Linear``, both on the ``kernel`` backend, ``attention.output``
and ``output`` :class:`~stackcomp.nn.fused_norm.FusedResidualNorm`, ``output.dense`` a
:class:`~stackcomp.nn.fused.FusedInt8FFN` -- which BERT, RoBERTa, ELECTRA, XLM-R and MiniLM blocks
become, or DistilBERT's ``TransformerBlock`` with the same fused layers (its norms plain
``nn.LayerNorm``, computed as torch does). Another layout joins by appending a function to
:data:`BLOCK_LAYOUTS` that returns its :class:`BlockParts` (or why not).

The blocks run on the unpadded layout (:mod:`stackcomp.nn.unpadded`): applying native blocks applies
unpadding, and a block steps aside -- runs its own modules -- wherever the unpadded model does
(training, gradients, tracing and export, calls that want per-layer states or attention weights) and
for any mask other than "no padding" or the packed sequences' padding mask.

Where transformers' ``BertModel`` (MiniLM and other BERT checkpoints), ``RobertaModel`` or
``XLMRobertaModel`` holds only such blocks, its forward runs as one C++ call too (``EncoderModel``:
the embeddings with the embeddings module's own ops, then every block), and the pooler as its
module: a single sentence then costs one Python call for the whole encoder. Another base model
joins through :data:`MODEL_LAYOUTS`.

The kernels and their order are the modules' own, so on a padded batch (both paths pack the real
tokens) the answers are the module path's exactly; without padding the module path runs SDPA and the
native one the varlen kernel, which agree to float rounding. ``pack`` (``native_blocks: true``) checks
both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from stackcomp.kernels import ds_cpu
from stackcomp.kernels.attention import cu_seqlens_from_mask
from stackcomp.kernels.ffn import ACTS, AMX_MIN_TOKENS, PATHS
from stackcomp.nn import unpadded
from stackcomp.nn.base import register_model_link
from stackcomp.nn.fused import FusedFFNInput, FusedInt8FFN
from stackcomp.nn.fused_norm import FusedResidualNorm
from stackcomp.nn.fused_qkv import FusedInt8QKV, FusedQKVPart
from stackcomp.nn.quantized import Int8Linear, KernelInt8

__all__ = ["BLOCK_LAYOUTS", "CONFIG_FLAG", "MODEL_LAYOUTS", "BlockParts", "ModelParts", "apply_native_blocks",
           "bert_block_parts", "bert_model_parts", "block_parts", "distilbert_block_parts", "link_native_blocks",
           "model_parts", "native_blocks_report", "native_model_report", "remove_native_blocks", "remove_native_model",
           "roberta_model_parts"]

#: the config attribute that marks a model saved with native blocks
CONFIG_FLAG = "stackcomp_native_blocks"
_CPU = torch.device("cpu")
#: a block's arguments that make it a decoder step (cross-attention, a cache): it then runs its modules
_CROSS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "past_key_value")


@dataclass(frozen=True)
class BlockParts:
    """What a native block is built from: the block's own modules, and its attention's shape. The block
    computes ``mid = norm1(attention_dense(attention(qkv(h))) + h)``, ``out = norm2(ffn(mid) + mid)``."""

    qkv: FusedInt8QKV
    attention_dense: Int8Linear  # on the kernel backend
    norm1: nn.LayerNorm
    ffn: FusedInt8FFN
    norm2: nn.LayerNorm
    heads: int
    head_dim: int
    scale: float
    torch_norms: bool = False  # the module adds and calls nn.LayerNorm (else FusedResidualNorm's kernel)


def _attention_shape(qkv: FusedInt8QKV, head_dim: int, dense: nn.Module) -> tuple[int, int] | str:
    """(heads, head_dim) of a fused projection whose query, key and value each hold whole heads, or why not."""
    features = qkv.query_features
    if head_dim < 1 or features % head_dim or not (features == qkv.key_features == qkv.value_features):
        return (f"query/key/value features {qkv.query_features}/{qkv.key_features}/{qkv.value_features} are not "
                f"equal multiples of the head size {head_dim}")
    if dense.in_features != features:
        return f"the attention's output dense takes {dense.in_features} features, the heads give {features}"
    return features // head_dim, head_dim


def _assemble(attention: nn.Module, layers: dict[str, nn.Module], norm1: nn.LayerNorm, ffn: FusedInt8FFN,
              norm2: nn.LayerNorm, torch_norms: bool = False) -> BlockParts | str:
    """A layout's found layers as :class:`BlockParts` (``layers``: the QKV projection and the attention's
    output dense by their names in the block), once they run the kernel backend and hold whole heads."""
    (qkv_name, qkv), (dense_name, dense) = layers.items()
    for name, layer in layers.items():
        if layer.backend != "kernel":
            return f"{name} runs the {layer.backend!r} int8 backend; native blocks take the 'kernel' one"
    shape = _attention_shape(qkv, int(getattr(attention, "attention_head_size", 0) or 0), dense)
    if isinstance(shape, str):
        return shape
    scale = getattr(attention, "scaling", None)
    return BlockParts(qkv, dense, norm1, ffn, norm2, *shape, float(scale) if scale is not None else shape[1] ** -0.5,
                      torch_norms)


def _fused_ffn_input(*modules: nn.Module | None) -> bool:
    return all(isinstance(m, (FusedFFNInput, nn.Identity)) for m in modules)


def bert_block_parts(block: nn.Module) -> BlockParts | str:
    """BERT's layout (RoBERTa, ELECTRA, XLM-R, MiniLM share it), as pack's fusions leave it; else why not."""
    attention = getattr(block, "attention", None)
    self_attn, attn_out = getattr(attention, "self", None), getattr(attention, "output", None)
    intermediate, output = getattr(block, "intermediate", None), getattr(block, "output", None)
    if None in (self_attn, attn_out, intermediate, output):
        return "not BERT's layout (attention.self, attention.output, intermediate, output)"
    if getattr(block, "crossattention", None) is not None or getattr(block, "is_decoder", False):
        return "a decoder block (cross-attention or causal)"
    qkv = getattr(self_attn, "query", None)
    if not isinstance(qkv, FusedInt8QKV) or not all(isinstance(getattr(self_attn, n, None), FusedQKVPart)
                                                    for n in ("key", "value")):
        return "query, key and value are not one FusedInt8QKV (pack fuse_qkv: true)"
    if not (isinstance(attn_out, FusedResidualNorm) and isinstance(output, FusedResidualNorm)):
        return "its outputs are not FusedResidualNorm (pack fuse_norm: true)"
    if type(attn_out.dense) is not Int8Linear:
        return f"attention.output.dense is {type(attn_out.dense).__name__}, not an Int8Linear"
    if not isinstance(output.dense, FusedInt8FFN) or not _fused_ffn_input(
            getattr(intermediate, "dense", None), getattr(intermediate, "intermediate_act_fn", None)):
        return "the FFN is not a FusedInt8FFN (pack fuse_ffn: true)"
    return _assemble(self_attn, {"attention.self.query": qkv, "attention.output.dense": attn_out.dense},
                     attn_out.LayerNorm, output.dense, output.LayerNorm)


def distilbert_block_parts(block: nn.Module) -> BlockParts | str:
    """DistilBERT's ``TransformerBlock`` (its norms plain ``nn.LayerNorm`` after an add), as pack's fusions
    leave it; else why not."""
    attention, ffn = getattr(block, "attention", None), getattr(block, "ffn", None)
    norm1, norm2 = getattr(block, "sa_layer_norm", None), getattr(block, "output_layer_norm", None)
    if None in (attention, ffn, norm1, norm2) or not hasattr(attention, "q_lin"):
        return "not DistilBERT's layout (attention.q_lin, sa_layer_norm, ffn, output_layer_norm)"
    qkv = attention.q_lin
    if not isinstance(qkv, FusedInt8QKV) or not all(isinstance(getattr(attention, n, None), FusedQKVPart)
                                                    for n in ("k_lin", "v_lin")):
        return "q_lin, k_lin and v_lin are not one FusedInt8QKV (pack fuse_qkv: true)"
    if type(getattr(attention, "out_lin", None)) is not Int8Linear:
        return f"attention.out_lin is {type(getattr(attention, 'out_lin', None)).__name__}, not an Int8Linear"
    if not isinstance(getattr(ffn, "lin2", None), FusedInt8FFN) or not _fused_ffn_input(
            getattr(ffn, "lin1", None), getattr(ffn, "activation", None)):
        return "the FFN is not a FusedInt8FFN (pack fuse_ffn: true)"
    if not all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None for n in (norm1, norm2)):
        return "its norms are not affine nn.LayerNorm"
    return _assemble(attention, {"attention.q_lin": qkv, "attention.out_lin": attention.out_lin}, norm1, ffn.lin2,
                     norm2, torch_norms=True)


#: functions ``block -> BlockParts | str`` (why not), tried in order; a plugin appends its model's layout
BLOCK_LAYOUTS: list[Callable[[nn.Module], BlockParts | str]] = [bert_block_parts, distilbert_block_parts]


def _recognized(layouts: list[Callable], module: nn.Module, kind: type) -> Any:
    """What the first of ``layouts`` that recognizes ``module`` finds (a ``kind``), or why none does (their
    reasons joined)."""
    reasons = []
    for layout in layouts:
        found = layout(module)
        if isinstance(found, kind):
            return found
        reasons.append(found)
    return "; ".join(reasons)


def block_parts(block: nn.Module) -> BlockParts | str:
    """The parts of ``block`` by the first of :data:`BLOCK_LAYOUTS` that recognizes it, or why none does."""
    return _recognized(BLOCK_LAYOUTS, block, BlockParts)


# ----------------------------------------------------------------------------- building the C++ block


def _route_operands(route: Any, n: int) -> tuple[list, list, int, int]:
    """(short-call operands, long-call operands, their kernel paths) of a KernelRoute: n tensors each."""
    small, small_path = route.pick(1)
    large, large_path = route.pick(AMX_MIN_TOKENS)
    return list(small[:n]), list(large[:n]), PATHS[small_path], PATHS[large_path]


def _routes(parts: BlockParts) -> tuple[Any, Any, Any] | str:
    """The three kernel routes the modules themselves run (made and cached by them), or why not."""
    if ds_cpu.extension_with("EncoderModel", "native blocks") is None:
        return "the C++ kernel with native blocks is not loaded (" + (
            ds_cpu.build_error() or "disabled, or a build older than native blocks: rebuild it") + ")"
    routes = []
    for name, layer in (("the QKV projection", parts.qkv), ("the attention's output dense", parts.attention_dense)):
        runner, route = layer.prepared(_CPU)
        if not isinstance(runner, KernelInt8):
            return f"{name}: the int8 kernel does not run here"
        routes.append(route)
    ffn = parts.ffn._kernel()
    if ffn is None:
        return "the fused FFN kernel does not run here"
    return routes[0], routes[1], ffn


def _build(parts: BlockParts, routes: tuple) -> Any:
    qkv, out, ffn = routes
    n1, n2 = parts.norm1, parts.norm2
    return qkv.ext.EncoderBlock(
        *_route_operands(qkv, 4), *_route_operands(out, 4), *_route_operands(ffn, 8),
        [n1.weight.detach(), n1.bias.detach(), n2.weight.detach(), n2.bias.detach()],
        [parts.qkv.out_features, parts.qkv.query_features, parts.qkv.key_features, parts.heads, parts.head_dim,
         parts.attention_dense.out_features, ffn.ops.hidden, ffn.ops.out, ACTS[parts.ffn.activation],
         AMX_MIN_TOKENS, int(parts.torch_norms)],
        [parts.scale, float(n1.eps), float(n2.eps)], _sources(parts))


#: bumped whenever a module, buffer or parameter is registered anywhere (``set_module``, ``setattr``): a
#: native block then finds its parts again before it runs
_REGISTRATIONS = [0]


def _registered(*_: Any) -> None:
    _REGISTRATIONS[0] += 1


for _hook in (torch.nn.modules.module.register_module_module_registration_hook,
              torch.nn.modules.module.register_module_buffer_registration_hook,
              torch.nn.modules.module.register_module_parameter_registration_hook):
    _hook(_registered)


def _sources(parts: BlockParts) -> list[torch.Tensor]:
    """The parts' own tensors (int8 buffers, norm parameters): the C++ block checks they stay as they were."""
    tensors = [t for m in (parts.qkv, parts.attention_dense, parts.ffn) for t in m._buffers.values() if t is not None]
    return tensors + [t for m in (parts.norm1, parts.norm2) for t in m._parameters.values() if t is not None]


def _caches(parts: BlockParts) -> tuple:
    """The layers' own cached kernel operands: a layer moved with ``.to()`` drops them."""
    return parts.qkv._prepared, parts.attention_dense._prepared, parts.ffn._cache


@functools.lru_cache(maxsize=256)
def _whole_sequences(batch: int, length: int) -> torch.Tensor:
    """Sequence starts of a batch without padding (every block of every forward of that shape shares them)."""
    return torch.arange(0, batch * length + 1, length, dtype=torch.int64)


class _NativeForward:
    """Set as a block's ``forward``: the C++ block where it may run, else the block's own forward."""

    def __init__(self, block: nn.Module, unpadder: Any):
        self.block, self.unpadder = block, unpadder
        self._parts: tuple[int, BlockParts | None] | None = None  # (registrations, parts) when found
        self._native: tuple[int, tuple, Any] | None = None  # (extension load, layers' caches, EncoderBlock or None)

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: the C++ block is rebuilt on first use
        return {"block": self.block, "unpadder": self.unpadder, "_parts": None, "_native": None}

    def native(self) -> Any | None:
        """The C++ block for the block's current modules and weights (None: it cannot run here); found
        again after any module registration, rebuilt when a weight tensor moves or changes in place."""
        if self._parts is None or self._parts[0] != _REGISTRATIONS[0]:
            parts = block_parts(self.block)
            self._parts = (_REGISTRATIONS[0], parts if isinstance(parts, BlockParts) else None)
            self._native = None
        parts = self._parts[1]
        if parts is None:
            return None
        built, gen = self._native, ds_cpu._state["gen"]  # gen: which load of the extension
        if (built is None or built[0] != gen or not all(a is b for a, b in zip(built[1], _caches(parts), strict=True))
                or (built[2] is not None and not built[2].fresh())):
            routes = _routes(parts)
            block = None if isinstance(routes, str) else _build(parts, routes)
            self._native = built = (gen, _caches(parts), block)
        return built[2]

    @staticmethod
    def _starts(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if not hidden.numel():
            return None
        if mask is None:  # no padding: every row of the batch is one whole sequence
            return _whole_sequences(hidden.shape[0], hidden.shape[1])
        if mask.dim() != 2 or mask.dtype != torch.bool or hidden.shape[0] != 1 or mask.shape == hidden.shape[:2]:
            return None  # a 4-D mask, or a padded batch the unpadder left as it is
        cu = unpadded._cu_seqlens(mask)
        return cu if int(cu[-1]) == hidden.shape[1] else None

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> Any:
        block = self.block
        if not (block.training or any(a is not None for a in args) or any(kwargs.get(k) is not None for k in _CROSS)
                or kwargs.get("output_attentions") or self.unpadder.block_outputs_wanted() or unpadded._tracing()
                or not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3
                or hidden_states.dtype != torch.float32 or hidden_states.device.type != "cpu"
                or (hidden_states.requires_grad and torch.is_grad_enabled())):
            starts = self._starts(hidden_states, attention_mask)
            native = self.native() if starts is not None else None
            if native is not None:
                x = hidden_states.reshape(-1, hidden_states.shape[-1]).contiguous()
                return native.forward(x, starts).view(hidden_states.shape)
        return type(block).forward(block, hidden_states, attention_mask, *args, **kwargs)


# ----------------------------------------------------------------------------- the whole base model


@dataclass(frozen=True)
class ModelParts:
    """What a native base model is built from: its embeddings' tables and norm, its blocks (every one
    native), its pooler (run as a module; None: none), and how its forward's output is made."""

    word: nn.Module
    position: nn.Module
    token_type: nn.Module
    norm: nn.LayerNorm
    blocks: tuple[nn.Module, ...]
    pooler: nn.Module | None
    output: Callable[..., Any]  # (last_hidden_state=..., pooler_output=...) -> the base model's output
    positions: Callable[[torch.Tensor], torch.Tensor] | None = None  # input_ids -> position ids; None: 0, 1, ...


def _table(m: nn.Module) -> tuple[list[torch.Tensor], int, bool] | None:
    """(weight, scale, offset, remap; width; 4-bit) of an embedding the C++ model can look up, else None."""
    from stackcomp.nn.quantized import Int4Embedding
    from stackcomp.nn.remapped import RemappedEmbedding

    none = torch.empty(0)
    remap = m._buffers.get("remap")
    remap = none if remap is None else remap
    if isinstance(m, Int4Embedding):
        return [m.weight, m.weight_scale, m.weight_offset, remap], m.embedding_dim, True
    if type(m) in (nn.Embedding, RemappedEmbedding) and m.max_norm is None and m.weight.dtype == torch.float32:
        return [m.weight.detach(), none, none, remap], m.embedding_dim, False
    return None


def _encoder_parts(base: nn.Module, positions: Callable[[torch.Tensor], torch.Tensor] | None) -> ModelParts | str:
    """A BERT-like base model's parts (its embeddings' arithmetic checked by the caller), else why not."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    if base.config.is_decoder:
        return "a decoder"
    e = base.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if _table(getattr(e, name)) is None:
            return f"embeddings.{name} is {type(getattr(e, name)).__name__}: not a float32 or 4-bit table"
    blocks = tuple(base.encoder.layer)
    for i, block in enumerate(blocks):
        why = block_parts(block)
        if isinstance(why, str):
            return f"encoder.layer.{i}: {why}"
    return ModelParts(e.word_embeddings, e.position_embeddings, e.token_type_embeddings, e.LayerNorm, blocks,
                      base.pooler, BaseModelOutputWithPoolingAndCrossAttentions, positions)


def bert_model_parts(base: nn.Module) -> ModelParts | str:
    """transformers' ``BertModel`` (MiniLM and other BERT checkpoints), every block native; else why not."""
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertModel

    if not isinstance(base, BertModel) or type(base.embeddings) is not BertEmbeddings:
        return "not transformers' BertModel with its own embeddings"
    return _encoder_parts(base, None)


def roberta_model_parts(base: nn.Module) -> ModelParts | str:
    """transformers' ``RobertaModel`` / ``XLMRobertaModel``: BERT's arithmetic with positions counted over
    the real tokens from ``padding_idx + 1`` (their embeddings' own function makes them); else why not."""
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings, RobertaModel
    from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEmbeddings, XLMRobertaModel

    e = getattr(base, "embeddings", None)
    if not any(isinstance(base, model) and type(e) is emb
               for model, emb in ((RobertaModel, RobertaEmbeddings), (XLMRobertaModel, XLMRobertaEmbeddings))):
        return "not transformers' RobertaModel or XLMRobertaModel with its own embeddings"
    return _encoder_parts(base, lambda ids: e.create_position_ids_from_input_ids(ids, e.padding_idx, 0))


#: functions ``base model -> ModelParts | str`` (why not), tried in order; where none recognizes a model its
#: blocks still run natively one by one
MODEL_LAYOUTS: list[Callable[[nn.Module], ModelParts | str]] = [bert_model_parts, roberta_model_parts]


def model_parts(base: nn.Module) -> ModelParts | str:
    """The parts of ``base`` by the first of :data:`MODEL_LAYOUTS` that recognizes it, or why none does."""
    return _recognized(MODEL_LAYOUTS, base, ModelParts)


@functools.lru_cache(maxsize=256)
def _positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length, dtype=torch.int64).repeat(batch)


@functools.lru_cache(maxsize=256)
def _zeros(tokens: int) -> torch.Tensor:
    return torch.zeros(tokens, dtype=torch.int64)


def _accepted(name: str, value: Any) -> bool:
    """Whether a base-model keyword leaves the native path's answer as it is (anything else: the modules run)."""
    if name == "return_dict":
        return value is None or value is True
    return value is None or value is False


class _Built(NamedTuple):
    """What a native base model was built from, and when: any change of these builds it again."""

    registrations: int
    gen: int
    parts: ModelParts | str
    blocks: list[BlockParts]
    caches: tuple
    model: Any  # EncoderModel, or None where it cannot run


def _model_caches(blocks: list[BlockParts]) -> tuple:
    return tuple(c for parts in blocks for c in _caches(parts))


def _block_native(block: nn.Module) -> Any | None:
    """The block's C++ block (its own native forward's, where it has one)."""
    forward = block.__dict__.get("forward")
    return (forward if isinstance(forward, _NativeForward) else _NativeForward(block, None)).native()


class _NativeModel:
    """Set as the base model's ``forward``: embeddings and every block in one C++ call, the pooler as its
    module; the model's own forward wherever a native block would step aside, or for inputs it does
    not take (``inputs_embeds``, a cache, cross-attention, per-layer outputs, ``return_dict=False``)."""

    def __init__(self, base: nn.Module):
        self.base = base
        self._built: _Built | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"base": self.base, "_built": None}

    def native(self) -> tuple[ModelParts, Any] | None:
        """(parts, the C++ model) for the model's current modules and weights, or None where it cannot run;
        found again after a module registration, rebuilt when a tensor moves or changes in place."""
        built, gen = self._built, ds_cpu._state["gen"]
        if built is not None and built.registrations == _REGISTRATIONS[0] and built.gen == gen:
            if built.model is None:
                return None
            same = all(a is b for a, b in zip(built.caches, _model_caches(built.blocks), strict=True))
            if same and built.model.fresh():
                return built.parts, built.model
        parts = model_parts(self.base)
        blocks, model = [], None
        if isinstance(parts, ModelParts):
            blocks = [block_parts(b) for b in parts.blocks]
            natives = [_block_native(b) for b in parts.blocks]
            if all(n is not None for n in natives):
                tables = [_table(m) for m in (parts.word, parts.position, parts.token_type)]
                norm = [parts.norm.weight.detach(), parts.norm.bias.detach()]
                sources = [t for table in tables for t in table[0] if t.numel()] + norm
                model = ds_cpu.get_extension().EncoderModel(
                    [t[0] for t in tables], [t[1] for t in tables], [t[2] for t in tables], norm,
                    float(parts.norm.eps), natives, sources)
        self._built = _Built(_REGISTRATIONS[0], gen, parts, blocks, _model_caches(blocks), model)
        return None if model is None else (parts, model)

    def __call__(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> Any:
        base = self.base
        config = base.config
        found = None
        if not (base.training or args or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
                or not input_ids.numel() or input_ids.device.type != "cpu" or config.output_hidden_states
                or config.output_attentions
                or config.return_dict is False or unpadded._tracing() or torch.is_grad_enabled()
                or not all(_accepted(k, v) for k, v in kwargs.items())):
            found = self.native()
        if found is None:
            return type(base).forward(base, input_ids, attention_mask, token_type_ids, position_ids, *args, **kwargs)
        parts, model = found
        b, n = input_ids.shape
        ids = input_ids.reshape(-1)
        keep = None
        real = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                return type(base).forward(base, input_ids, attention_mask, token_type_ids, position_ids, *args,
                                          **kwargs)
            real = attention_mask.bool()
            if not bool(real.all()):
                keep = real.reshape(-1).nonzero().squeeze(1)
        if position_ids is not None:
            positions = position_ids.expand(b, n).reshape(-1)
        else:
            positions = _positions(b, n) if parts.positions is None else parts.positions(input_ids).reshape(-1)
        types = _zeros(b * n) if token_type_ids is None else token_type_ids.expand(b, n).reshape(-1)
        if keep is None:
            starts = _whole_sequences(b, n)
        else:
            ids, positions, types = ids[keep], positions[keep], types[keep]
            starts = cu_seqlens_from_mask(real)
        h = model.forward(ids.long(), types.long(), positions.long(), starts)
        if keep is None:
            full = h.view(b, n, h.shape[-1])
        else:
            full = h.new_zeros(b * n, h.shape[-1]).index_copy_(0, keep, h).view(b, n, h.shape[-1])
        pooled = parts.pooler(full) if parts.pooler is not None else None
        return parts.output(last_hidden_state=full, pooler_output=pooled)


# ----------------------------------------------------------------------------- applying


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from stackcomp.targets import block_stacks

    return [(f"{name}.{i}", block) for name, stack in block_stacks(model) for i, block in enumerate(stack)]


def native_blocks_report(model: nn.Module) -> dict[str, str | None]:
    """Each block by name: None where it can run natively here, else why not."""
    report: dict[str, str | None] = {}
    for name, block in _blocks(model):
        parts = block_parts(block)
        if isinstance(parts, BlockParts):
            routes = _routes(parts)
            parts = routes if isinstance(routes, str) else None
        report[name] = parts
    return report


def native_model_report(model: nn.Module) -> str | None:
    """None where the whole base model (embeddings and blocks) runs as one C++ call here, else why not
    (its blocks may still run natively one by one)."""
    base = getattr(model, "base_model", model)
    parts = model_parts(base)
    if isinstance(parts, str):
        return parts
    for block in parts.blocks:
        routes = _routes(block_parts(block))
        if isinstance(routes, str):
            return routes
    return None


def apply_native_blocks(model: nn.Module) -> list[str]:
    """Run every qualifying block of ``model`` natively (idempotent; unpadding is applied first).
    Returns the names of the blocks that do; raises ValueError where the model cannot run unpadded."""
    unpadded.apply_unpadding(model)
    unpadder = unpadded.unpadder_of(model)
    native = []
    for name, block in _blocks(model):
        if isinstance(block.__dict__.get("forward"), _NativeForward):
            native.append(name)
        elif isinstance(block_parts(block), BlockParts):
            block.forward = _NativeForward(block, unpadder)
            native.append(name)
    base = getattr(model, "base_model", model)
    if (native and not isinstance(base.__dict__.get("forward"), _NativeModel)
            and isinstance(model_parts(base), ModelParts)):
        base.forward = _NativeModel(base)
    setattr(model.config, CONFIG_FLAG, True)
    return native


def remove_native_model(model: nn.Module) -> nn.Module:
    """The base model's forward back to its own (its blocks stay native one by one)."""
    base = getattr(model, "base_model", model)
    if isinstance(base.__dict__.get("forward"), _NativeModel):
        del base.__dict__["forward"]
    return model


def remove_native_blocks(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_native_blocks` (the blocks run their modules again; unpadding stays)."""
    for _, block in _blocks(model):
        if isinstance(block.__dict__.get("forward"), _NativeForward):
            del block.__dict__["forward"]
    remove_native_model(model)
    if hasattr(getattr(model, "config", None), CONFIG_FLAG):
        delattr(model.config, CONFIG_FLAG)
    return model


@register_model_link
def link_native_blocks(model: nn.Module) -> None:
    """Apply native blocks to a model loaded with the :data:`CONFIG_FLAG` in its config (else nothing)."""
    if getattr(getattr(model, "config", None), CONFIG_FLAG, False):
        apply_native_blocks(model)
