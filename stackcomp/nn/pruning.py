"""Where the attention heads and FFN neurons of an encoder live, and their removal.

``prune_structured`` needs, per transformer block, the query/key/value/output linears of the
attention, the two FFN linears and the head width. :data:`LAYOUTS` says where they are for each
supported ``model_type``; their attention forwards infer the head count from the projection
widths, so a block keeps working with fewer heads once its linears are sliced.

* :func:`masked` multiplies 0/1 (or trainable) masks into each head's output (the input of the
  attention output linear) and each neuron's activation (the input of the FFN output linear):
  what importance is measured on, and what :func:`remove_units` must reproduce exactly;
* :func:`remove_units` slices the linears (rows of query/key/value and the FFN input, columns of
  the attention and FFN outputs): they stay plain ``nn.Linear``, so later passes (``ds_factorize``,
  ``int8``, ``pack``) see ordinary layers. The kept counts go into ``config.stackcomp_pruned``;
* :func:`restore_pruned_shapes` gives a model freshly built from such a config the pruned shapes
  its weights file holds, before the weights are loaded (``stackcomp.artifacts.load_model``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stackcomp.errors import PassError

__all__ = ["CONFIG_KEY", "LAYOUTS", "Block", "blocks", "masked", "remove_units", "restore_pruned_shapes"]

#: the config attribute that marks a pruned model, with the kept counts as pruning left them:
#: {"heads": [per block], "intermediate_sizes": [per block]} (loading reads the shapes from the weights)
CONFIG_KEY = "stackcomp_pruned"


@dataclass(frozen=True)
class Layout:
    """Module paths of one architecture: the block list (under the base model) and, in a block,
    the attention module (it holds the head count) and the six linears."""

    stack: str
    attention: str
    query: str
    key: str
    value: str
    out: str
    ffn_in: str
    ffn_out: str
    head_count_attrs: tuple[str, ...]


_BERT = Layout(stack="encoder.layer", attention="attention.self", query="attention.self.query",
               key="attention.self.key", value="attention.self.value", out="attention.output.dense",
               ffn_in="intermediate.dense", ffn_out="output.dense", head_count_attrs=("num_attention_heads",))

#: supported ``model_type``s; others (ALBERT's shared blocks, DeBERTa's relative projections,
#: ModernBERT's fused QKV) are refused with a PassError
LAYOUTS: dict[str, Layout] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "camembert": _BERT,
    "distilbert": Layout(stack="transformer.layer", attention="attention", query="attention.q_lin",
                         key="attention.k_lin", value="attention.v_lin", out="attention.out_lin",
                         ffn_in="ffn.lin1", ffn_out="ffn.lin2", head_count_attrs=("n_heads",)),
}


@dataclass(frozen=True)
class Block:
    """One transformer block's prunable parts, with the full module names (for messages)."""

    name: str
    block: nn.Module
    attention: nn.Module
    linears: dict[str, nn.Linear]  # query, key, value, out, ffn_in, ffn_out
    head_size: int
    layout: Layout

    @property
    def heads(self) -> int:
        return self.linears["out"].in_features // self.head_size

    @property
    def neurons(self) -> int:
        return self.linears["ffn_in"].out_features


def blocks(model: nn.Module, who: str = "prune_structured") -> list[Block]:
    """The blocks of ``model``, or a PassError naming the architecture or the layer that cannot be pruned."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    layout = LAYOUTS.get(kind)
    if layout is None:
        raise PassError(f"{who}: model type {kind!r} has no head/neuron pruning support "
                        f"(supported: {', '.join(sorted(LAYOUTS))})")
    base = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "")
    prefix = f"{prefix}." if base is not model and prefix else ""
    stack = base.get_submodule(layout.stack)
    head_size = config.hidden_size // config.num_attention_heads
    out = []
    for i, block in enumerate(stack):
        name = f"{prefix}{layout.stack}.{i}"
        linears = {}
        for part in ("query", "key", "value", "out", "ffn_in", "ffn_out"):
            module = block.get_submodule(getattr(layout, part))
            if type(module) is not nn.Linear:
                raise PassError(f"{who}: {name}.{getattr(layout, part)} is a {type(module).__name__}, not a plain "
                                "nn.Linear; prune before passes that replace linears (ds_factorize, int8, pack...)")
            linears[part] = module
        out.append(Block(name, block, block.get_submodule(layout.attention), linears, head_size, layout))
    if len({id(b.linears['query']) for b in out}) < len(out):
        raise PassError(f"{who}: the blocks of this {kind} model share weights; they cannot be pruned one by one")
    return out


@contextmanager
def masked(model_blocks: Sequence[Block], head_masks: Sequence[torch.Tensor],
           neuron_masks: Sequence[torch.Tensor]) -> Iterator[None]:
    """While inside, each block's head outputs and FFN activations are multiplied by its masks
    (shape (heads,) and (neurons,)); gradients flow to masks that require them."""
    handles = []

    def head_hook(mask: torch.Tensor, d: int):
        def hook(_module, args):
            x = args[0]
            return (x.unflatten(-1, (-1, d)).mul(mask.to(x.dtype).unsqueeze(-1)).flatten(-2), *args[1:])
        return hook

    def neuron_hook(mask: torch.Tensor):
        def hook(_module, args):
            return (args[0] * mask.to(args[0].dtype), *args[1:])
        return hook

    try:
        for b, hm, nm in zip(model_blocks, head_masks, neuron_masks, strict=True):
            handles.append(b.linears["out"].register_forward_pre_hook(head_hook(hm, b.head_size)))
            handles.append(b.linears["ffn_out"].register_forward_pre_hook(neuron_hook(nm)))
        yield
    finally:
        for h in handles:
            h.remove()


def _slice(lin: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """``lin`` with only the ``keep`` rows (dim 0) or columns (dim 1) of its weight."""
    weight = lin.weight.detach().index_select(dim, keep.to(lin.weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=lin.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach().index_select(0, keep.to(lin.bias.device)))
    new.train(lin.training)
    return new


def _set(block_module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(block_module.get_submodule(parent) if parent else block_module, attr, new)


def remove_units(model: nn.Module, kept_heads: Sequence[Sequence[int]], kept_neurons: Sequence[Sequence[int]],
                 who: str = "prune_structured") -> nn.Module:
    """Keep only the listed heads and neurons of each block (indices into the block's current
    ones), in place; record the kept counts in ``model.config``. Returns ``model``."""
    found = blocks(model, who)
    for b, hk, nk in zip(found, kept_heads, kept_neurons, strict=True):
        if not hk:
            raise PassError(f"{who}: {b.name} would keep no attention head")
        d = b.head_size
        rows = torch.tensor([h * d + j for h in sorted(hk) for j in range(d)], dtype=torch.long)
        cols = torch.tensor(sorted(nk), dtype=torch.long)
        lay, module = b.layout, b.block
        for part in ("query", "key", "value"):
            _set(module, getattr(lay, part), _slice(b.linears[part], rows, 0))
        _set(module, lay.out, _slice(b.linears["out"], rows, 1))
        _set(module, lay.ffn_in, _slice(b.linears["ffn_in"], cols, 0))
        _set(module, lay.ffn_out, _slice(b.linears["ffn_out"], cols, 1))
        _set_head_count(b.attention, lay, len(hk), d)
    now = blocks(model, who)
    setattr(model.config, CONFIG_KEY, {"heads": [b.heads for b in now], "intermediate_sizes": [b.neurons for b in now]})
    return model


def _set_head_count(attention: nn.Module, layout: Layout, heads: int, head_size: int) -> None:
    for attr in layout.head_count_attrs:
        setattr(attention, attr, heads)
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = heads * head_size


def restore_pruned_shapes(model: nn.Module, weights: str | Path, layers: dict[str, dict] | None = None) -> nn.Module:
    """Give a model built from a pruned model's config the pruned linears' shapes, read from
    the weights file's header (so a model cut or changed after pruning loads too); the values
    are left to the weights. ``layers`` (the manifest's entries by module name): the compressed
    layers, rebuilt from their entries; a block's head count then comes from its query entry
    (``query_features`` of a fused QKV projection, else ``out_features``). No-op for a config
    without ``stackcomp_pruned``, or for a weights file that cannot be read (the weight loading
    then reports it)."""
    from safetensors import safe_open

    from stackcomp.errors import ArtifactError

    if not getattr(model.config, CONFIG_KEY, None):
        return model
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 -- missing, truncated, damaged: load_model reports it when it loads the weights
        return model
    layers = layers or {}
    for b in blocks(model, "load"):
        stored = {part: shapes.get(f"{b.name}.{getattr(b.layout, part)}.weight") for part in b.linears}
        for part, shape in stored.items():
            lin = b.linears[part]
            if shape is None or shape == tuple(lin.weight.shape) or f"{b.name}.{getattr(b.layout, part)}" in layers:
                continue  # not pruned, or a compressed layer (rebuilt from the manifest)
            if len(shape) != 2 or shape[0] > lin.out_features or shape[1] > lin.in_features:
                raise ArtifactError(f"{weights}: {b.name}.{getattr(b.layout, part)}.weight has shape {shape}, "
                                    f"not a pruned {tuple(lin.weight.shape)}")
            _set(b.block, getattr(b.layout, part),
                 nn.Linear(shape[1], shape[0], bias=lin.bias is not None, dtype=lin.weight.dtype))
        query = layers.get(f"{b.name}.{b.layout.query}") or {}
        width = query.get("query_features", query.get("out_features"))
        if width is None:
            width = stored["query"][0] if stored["query"] else None
        if width is not None:
            if width % b.head_size:
                raise ArtifactError(f"{weights}: {b.name} keeps {width} query rows, not whole heads of {b.head_size}")
            _set_head_count(b.attention, b.layout, width // b.head_size, b.head_size)
    return model
