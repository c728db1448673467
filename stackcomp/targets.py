"""Choosing which modules a pass touches: ``targets`` and ``ignore`` patterns.

Patterns follow llm-compressor's vocabulary: a plain string is a shell glob on the module's
qualified name (``*.attention.*``), a ``re:`` prefix makes it a regular expression matched
with ``re.fullmatch``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator

from torch import nn

#: Heads and embedding projections stay dense unless a recipe asks otherwise. Without ``targets``
#: only modules inside the transformer blocks (:func:`block_stacks`) are candidates anyway; these
#: names matter when a recipe's own ``targets`` reach further.
DEFAULT_IGNORE = ("re:.*(classifier|pooler|pre_classifier|embeddings|embedding_hidden_mapping_in|predictions).*",)


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of transformer blocks, outermost only, in model order.

    Found by structure, not by name: an ``nn.ModuleList`` whose items are modules of one class
    that hold submodules (BERT's ``encoder.layer``, DistilBERT's ``transformer.layer``,
    ModernBERT's ``layers``, ALBERT's shared ``albert_layer_groups``). Embeddings, embedding
    projections, poolers and heads sit outside every such list.
    """
    found: list[tuple[str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or len({type(c) for c in m}) != 1:
            continue
        if next(iter(m[0].children()), None) is None:
            continue  # a list of leaf layers (heads, projections), not of blocks
        if any(name == p or name.startswith(p + ".") or p == "" for p, _ in found):
            continue
        found.append((name, m))
    return found


def why_none_selected(model: nn.Module, targets: Iterable[str] | None, ignore: Iterable[str] | None) -> str:
    """What a pass says when its selection is empty: the patterns, or that the default found no blocks."""
    said = (f"targets={None if targets is None else list(targets)} "
            f"ignore={None if ignore is None else list(ignore)}")
    if targets is None and not block_stacks(model):
        return (f"{said}: {type(model).__name__} has no nn.ModuleList of repeated transformer blocks, where the "
                "default targets are found; name the layers with `targets:` patterns")
    return said


def in_blocks(name: str, stacks: Iterable[str]) -> bool:
    """True if the module named ``name`` lies inside one of the named block stacks."""
    return any(s == "" or name.startswith(s + ".") for s in stacks)


def matches(name: str, pattern: str) -> bool:
    """True if a module name matches one ``targets``/``ignore`` pattern."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_modules(
    model: nn.Module,
    targets: Iterable[str] | None = None,
    ignore: Iterable[str] | None = None,
    types: tuple[type, ...] = (nn.Linear,),
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for modules of ``types`` matched by targets and not by ignore.

    Without ``targets``, the modules inside the transformer blocks (:func:`block_stacks`),
    whatever the architecture calls them. A module reachable under several names (ALBERT's
    shared layer) is yielded once, under its first name, so it is compressed once and stays shared.
    """
    stacks = [s for s, _ in block_stacks(model)] if targets is None else None
    targets = tuple(() if targets is None else targets)
    ignore = tuple(DEFAULT_IGNORE if ignore is None else ignore)
    for name, module in model.named_modules():  # named_modules() already skips repeats
        if not isinstance(module, types):
            continue
        if stacks is not None and not in_blocks(name, stacks):
            continue
        if targets and not any(matches(name, p) for p in targets):
            continue
        if any(matches(name, p) for p in ignore):
            continue
        yield name, module


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
