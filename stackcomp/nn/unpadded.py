"""Running an encoder on a padded batch's real tokens only ("unpadding"), for CPU inference.

Why: a batch is as wide as its longest sequence, so a batch of 32 SST-2 sentences is half padding,
and every linear of every block runs on the pad positions too; attention, which grows with the
square of the width, spends 70% of its work on them. Unpadded, the encoder's blocks see one packed
``(1, real tokens, hidden)`` sequence: the linears, norms and fused FFNs (all token by token) do only
real work, and attention runs each sequence at its own length (:mod:`stackcomp.kernels.attention`).
The answers are the same up to float rounding; pad positions of the encoder's output are zeros
(every head ignores them: poolers read real tokens, NER and QA mask them).

How, with transformers' own extension points rather than a copy of any model's code:

* an attention function and a mask function registered under :data:`ATTN_IMPLEMENTATION`
  (``AttentionInterface``, ``AttentionMaskInterface``): the mask function hands the blocks the
  ``(batch, length)`` padding mask as it is, and the attention function, given packed queries
  ``(1, heads, tokens, head_dim)``, finds each sequence's tokens from it;
* a forward pre-hook on the module that holds the blocks (BERT's ``encoder``, DistilBERT's
  ``transformer``) packs the hidden states, and a forward hook scatters its output back to
  ``(batch, length, hidden)``.

Models whose attention goes through transformers' attention interface and whose blocks see positions
only through the hidden states qualify (BERT, RoBERTa, ELECTRA, XLM-R, DistilBERT, MiniLM, ...):
:func:`unpad_unsupported` says why a model does not. ``pack`` (``unpad: true``) applies it and checks
the outputs; the model's config keeps ``stackcomp_unpad: true``, and :func:`link_unpadding` (run by
``stackcomp.load`` and transformers' loading path through ``link_layers``, as a registered model
link) applies it again on load.
Training, tracing, ONNX export and calls that ask for per-layer hidden states or attention weights
(which transformers collects from the blocks themselves) see the padded model: the hooks step aside.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import torch
from torch import nn

from stackcomp.kernels.attention import cu_seqlens_from_mask, varlen_attention
from stackcomp.nn.base import register_model_link
from stackcomp.nn.quantized import _exporting
from stackcomp.targets import block_stacks

__all__ = ["ATTN_IMPLEMENTATION", "CONFIG_FLAG", "apply_unpadding", "link_unpadding", "remove_unpadding",
           "unpad_unsupported"]

#: the name the attention and mask functions are registered under in transformers
ATTN_IMPLEMENTATION = "stackcomp_unpadded"
#: the config attribute that marks a model saved unpadded
CONFIG_FLAG = "stackcomp_unpad"
#: names the block holder's forward gives the padding mask
MASK_ARGS = ("attention_mask", "attn_mask")
#: config fields of position schemes applied inside the blocks (rotary, relative), which a packed
#: sequence would break: such models are refused
IN_BLOCK_POSITIONS = ("rope_theta", "global_rope_theta", "rotary_dim", "relative_attention", "rope_scaling")


def _tracing() -> bool:
    """Exporting (the int8 layers' test), or a jit trace or compile: a graph is recorded, so a packing
    that depends on the mask's values would be baked into it."""
    return bool(_exporting() or torch.compiler.is_compiling())


# ----------------------------------------------------------------------------- transformers' interfaces


def padding_mask(**kwargs: Any):
    """The mask function: the ``(batch, length)`` padding mask itself (bool), or None without padding.
    Any other mask (packed position ids, a combined mask function) is SDPA's 4-D mask: the hooks
    step aside for it and the attention runs padded."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    mask = kwargs.get("attention_mask")
    if kwargs.get("mask_function") is not bidirectional_mask_function or _tracing():
        return sdpa_mask(**kwargs)  # an exported graph gets transformers' own mask, for any input
    if mask is None or bool(mask.all()):
        return None
    return mask.to(torch.bool, copy=True)  # this forward's own tensor: _cu_seqlens keeps its starts on it


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function: packed queries ``(1, heads, tokens, head_dim)`` with the batch's padding
    mask run per sequence (:func:`~stackcomp.kernels.attention.varlen_attention`); a padded batch, or
    no mask, runs transformers' SDPA function. Returns ``(batch, length, heads, head_dim)`` as every
    attention function of transformers does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    kwargs.pop("is_causal", None)  # an encoder's attention is bidirectional
    if attention_mask is None or attention_mask.dim() != 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scale,
                                      is_causal=False, **kwargs)
    if query.shape[0] == attention_mask.shape[0] and query.shape[2] == attention_mask.shape[1]:  # padded
        mask = attention_mask[:, None, None, :].bool()
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scale,
                                      is_causal=False, **kwargs)
    cu = _cu_seqlens(attention_mask)
    if query.shape[0] != 1 or int(cu[-1]) != query.shape[2]:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION}: queries of shape {tuple(query.shape)} match neither the padded "
                           f"batch {tuple(attention_mask.shape)} nor its {int(cu[-1])} packed tokens")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim) views
    return varlen_attention(q, k, v, cu, scale).unsqueeze(0), None


def _cu_seqlens(mask: torch.Tensor) -> torch.Tensor:
    """The mask's packed sequence starts, made once per forward: every block gets the same mask tensor."""
    cu = getattr(mask, "_stackcomp_cu_seqlens", None)
    if cu is None:
        cu = cu_seqlens_from_mask(mask)
        mask._stackcomp_cu_seqlens = cu
    return cu


def register_with_transformers() -> None:
    """Register :func:`attention` and :func:`padding_mask` under :data:`ATTN_IMPLEMENTATION` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask)


# ----------------------------------------------------------------------------- where and whether


def _holder(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The module whose forward runs the blocks (the parent of the outermost block stack)."""
    stacks = block_stacks(model)
    if len(stacks) != 1:
        return None
    parent = stacks[0][0].rpartition(".")[0]
    return parent, (model.get_submodule(parent) if parent else model)


def _mask_arg(holder: nn.Module) -> str | None:
    params = list(inspect.signature(holder.forward).parameters)
    return next((p for p in params[1:] if p in MASK_ARGS), None)


def unpad_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot run unpadded (None: it can; ``pack`` still checks its outputs)."""
    config = getattr(model, "config", None)
    kind = type(model).__name__
    if config is None or not getattr(type(model), "_supports_attention_backend", False):
        return (f"{kind}'s attention does not go through transformers' attention interface "
                "(_supports_attention_backend), where the packed attention plugs in")
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return f"{kind} is a decoder or encoder-decoder; unpadding is for bidirectional encoders"
    found = [f for f in IN_BLOCK_POSITIONS if getattr(config, f, None)]
    if found or getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        what = found[0] if found else f"position_embedding_type={config.position_embedding_type}"
        return f"{kind} applies positions inside its blocks ({what}), which packed sequences would mix"
    if getattr(config, "sliding_window", None) or getattr(config, "local_attention", None):
        return f"{kind} has local (sliding-window) attention; the packed kernel computes full attention"
    holder = _holder(model)
    if holder is None:
        return f"{kind}: not one stack of repeated transformer blocks (found {len(block_stacks(model))})"
    if _mask_arg(holder[1]) is None:
        return (f"{kind}: the forward of {holder[0] or 'the model'} ({type(holder[1]).__name__}) takes no "
                f"padding mask argument named {' or '.join(MASK_ARGS)}")
    return None


# ----------------------------------------------------------------------------- the hooks


class _Unpadder:
    """The pre-hook packs the hidden states of a padded batch, the hook scatters the output back."""

    def __init__(self, holder: nn.Module):
        sig = inspect.signature(holder.forward)
        self.params = list(sig.parameters)
        self.mask_arg = _mask_arg(holder)
        self.local = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle of the model: calls in flight stay behind
        return {"params": self.params, "mask_arg": self.mask_arg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.local = threading.local()

    def _get(self, args: tuple, kwargs: dict, name: str) -> Any:
        i = self.params.index(name)
        return args[i] if i < len(args) else kwargs.get(name)

    def block_outputs_wanted(self) -> bool:
        """Whether the model call in flight (this thread's) wants per-layer states or attention weights."""
        outer = self.local.__dict__.get("outer")
        return bool(outer and outer[-1])

    def outer_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """On the base model: whether this call asks for what the blocks would give packed."""
        config = getattr(module, "config", None)
        wants = any(bool(kwargs.get(k, getattr(config, k, False))) for k in ("output_hidden_states", "output_attentions"))
        self.local.__dict__.setdefault("outer", []).append(wants)

    def outer_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.local.outer.pop()

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        stack = self.local.__dict__.setdefault("stack", [])
        hidden = self._get(args, kwargs, self.params[0])
        mask = self._get(args, kwargs, self.mask_arg)
        outer = self.local.__dict__.get("outer")
        if (module.training or _tracing() or mask is None or not isinstance(hidden, torch.Tensor) or
                (outer and outer[-1])
                or mask.dim() != 2 or hidden.dim() != 3 or mask.shape != hidden.shape[:2]):
            stack.append(None)
            return None
        index = mask.reshape(-1).nonzero().squeeze(1)
        stack.append((hidden.shape, index))
        packed = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).unsqueeze(0)
        if args:
            return (packed, *args[1:]), kwargs
        return args, {**kwargs, self.params[0]: packed}

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        saved = self.local.stack.pop()
        if saved is None:
            return None
        shape, index = saved

        def unpack(t: Any) -> Any:
            if not (isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == 1 and t.shape[1] == index.numel()):
                return t
            full = t.new_zeros(shape[0] * shape[1], t.shape[-1])
            full.index_copy_(0, index, t[0])
            return full.view(shape[0], shape[1], t.shape[-1])

        if isinstance(output, torch.Tensor):
            return unpack(output)
        if hasattr(output, "keys"):  # a ModelOutput: its tensors, and tuples of per-layer states
            for key in list(output.keys()):
                value = output[key]
                output[key] = tuple(unpack(t) for t in value) if isinstance(value, tuple) else unpack(value)
            return output
        if isinstance(output, tuple):
            return tuple(unpack(t) for t in output)
        return output


_HANDLES = "_stackcomp_unpad_hooks"
_UNPADDER = "_stackcomp_unpadder"


def unpadder_of(model: nn.Module) -> _Unpadder | None:
    """The hooks' state of an unpadded model (None: not unpadded)."""
    holder = _holder(model)
    return None if holder is None else getattr(holder[1], _UNPADDER, None)


def apply_unpadding(model: nn.Module) -> nn.Module:
    """Make ``model`` run unpadded (idempotent); raises ValueError naming why a model cannot."""
    why = unpad_unsupported(model)
    if why is not None:
        raise ValueError(f"unpad: {why}")
    register_with_transformers()
    name, holder = _holder(model)
    if getattr(holder, _HANDLES, None) is None:
        unpadder = _Unpadder(holder)
        base = getattr(model, "base_model", model)
        object.__setattr__(holder, _UNPADDER, unpadder)
        handles = (holder.register_forward_pre_hook(unpadder.pre, with_kwargs=True),
                   holder.register_forward_hook(unpadder.post, with_kwargs=True),
                   base.register_forward_pre_hook(unpadder.outer_pre, with_kwargs=True),
                   base.register_forward_hook(unpadder.outer_post, with_kwargs=True))
        object.__setattr__(holder, _HANDLES, handles)
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    setattr(model.config, CONFIG_FLAG, True)
    return model


def remove_unpadding(model: nn.Module, attn_implementation: str = "sdpa") -> nn.Module:
    """Undo :func:`apply_unpadding`: the hooks removed, ``attn_implementation`` set back."""
    holder = _holder(model)
    handles = getattr(holder[1], _HANDLES, None) if holder is not None else None
    for h in handles or ():
        h.remove()
    if handles is not None:
        object.__delattr__(holder[1], _HANDLES)
        object.__delattr__(holder[1], _UNPADDER)
    if getattr(model, "config", None) is not None:
        model.config._attn_implementation = attn_implementation
        if hasattr(model.config, CONFIG_FLAG):
            delattr(model.config, CONFIG_FLAG)
    return model


@register_model_link
def link_unpadding(model: nn.Module) -> None:
    """Apply unpadding to a model loaded with the :data:`CONFIG_FLAG` in its config (else nothing)."""
    if getattr(getattr(model, "config", None), CONFIG_FLAG, False):
        apply_unpadding(model)
