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

#: Encoder linears of BERT, ALBERT, DistilBERT, RoBERTa and friends.
DEFAULT_TARGETS = ("re:.*(encoder|transformer)\\..*",)
#: Heads and embedding projections stay dense unless a recipe asks otherwise.
DEFAULT_IGNORE = ("re:.*(classifier|pooler|pre_classifier|embeddings|embedding_hidden_mapping_in|predictions).*",)


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

    A module reachable under several names (ALBERT's shared layer) is yielded once, under
    its first name, so it is compressed once and stays shared.
    """
    targets = tuple(DEFAULT_TARGETS if targets is None else targets)
    ignore = tuple(DEFAULT_IGNORE if ignore is None else ignore)
    for name, module in model.named_modules():  # named_modules() already skips repeats
        if not isinstance(module, types):
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
