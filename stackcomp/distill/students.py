"""Making a distillation student: cut from a model, built fresh from a config, or loaded.

- :func:`cut_student` (DistilBERT-style): a copy of the model keeping a subset of its
  transformer layers with their weights, at the same width. ALBERT shares one set of layer
  weights across all its layers, so "keeping layers" there means applying the shared group
  fewer times: only the number of layers matters.
- :func:`student_from_config` (TinyBERT-style): a fresh, randomly initialised model of any
  Hugging Face architecture, its vocabulary, positions and labels taken from a reference model
  so it reads the same tokenized data.
- :func:`student_from_pretrained`: any model id or folder, refused if its tokenizer differs
  from the recipe's (the data are tokenized once, with the recipe model's tokenizer).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stackcomp.errors import ModelError, RecipeError
from stackcomp.targets import block_stacks

__all__ = ["num_layers", "hidden_width", "layer_list", "cut_student", "default_keep",
           "student_from_config", "student_from_pretrained"]


def _arch(model: nn.Module) -> str:
    """The architecture's name for messages: the config's model_type, else the class name."""
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def num_layers(model: nn.Module) -> int:
    """Transformer layers the model applies (ALBERT: applications of its shared layers).

    Hugging Face configs name it ``num_hidden_layers`` (DistilBERT's ``n_layers`` maps to it);
    without one, the length of the layer stack.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return n if isinstance(n, int) else len(layer_list(model)[1])


def hidden_width(model: nn.Module) -> int:
    """The width of the hidden states between layers (``config.hidden_size``, which every Hugging
    Face encoder config maps its own name to, e.g. DistilBERT's ``dim``)."""
    n = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(n, int):
        raise ModelError(f"{_arch(model)}: its config has no hidden_size, so its width is unknown")
    return n


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the model's transformer layers, with its name.

    Found by structure: the longest module list of repeated blocks (:func:`stackcomp.targets.block_stacks`),
    whatever the architecture calls it (BERT's ``encoder.layer``, DistilBERT's ``transformer.layer``,
    ModernBERT's ``layers``; ALBERT's ``albert_layer_groups``, shorter than its depth as its layers
    are shared).
    """
    stacks = block_stacks(model)
    if not stacks:
        raise ModelError(f"{_arch(model)}: found no nn.ModuleList of repeated transformer blocks, so its layers "
                         "cannot be told apart; use student.config or student.model instead of a cut student")
    longest = max(len(m) for _, m in stacks)
    found = [(name, m) for name, m in stacks if len(m) == longest]
    if len(found) != 1:
        where = ", ".join(name for name, _ in found)
        raise ModelError(f"{_arch(model)}: cannot tell which module list holds its transformer layers: {where} are "
                         f"all {longest} blocks long; use student.config or student.model instead of a cut student")
    return found[0]


def _shares_layers(model: nn.Module) -> bool:
    """True when the model applies fewer distinct layers than its depth (ALBERT's shared groups)."""
    return len(layer_list(model)[1]) < num_layers(model)


def _check_aligned(model: nn.Module, mods: nn.ModuleList, keep: list[int]) -> None:
    """Refuse a cut whose kept layers differ in structure from the layers a model of the cut
    depth builds in their places (ModernBERT's first layer has no attention norm): the student
    would not reload from its own config."""
    def params(i: int) -> set[str]:
        return {n for n, _ in mods[i].named_parameters()}

    for j, i in enumerate(keep):
        if params(i) != params(j):
            raise ModelError(f"{_arch(model)}: layer {i} differs in structure from layer {j} (parameters "
                             f"{sorted(params(i) ^ params(j))[:3]}), so it cannot become the student's layer {j}; "
                             f"keep layers that line up, e.g. start with layer 0")


def default_keep(total: int, keep: int | None = None) -> list[int]:
    """Evenly spaced layers starting at the first: every other one by default (0, 2, 4, ...)."""
    if keep is None:
        return list(range(0, total, 2))
    if not 1 <= keep <= total:
        raise RecipeError(f"student.cut.num_layers must be in 1..{total} (the model has {total} layers), got {keep}")
    return [i * total // keep for i in range(keep)]


def cut_student(model: nn.Module, layers: Sequence[int] | None = None, *, count: int | None = None,
                hidden_size: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` keeping ``layers`` (0-based; default every other one) and their weights.

    Returns the student and a note of what was kept. ``hidden_size``, if given, must equal
    the model's width: cutting cannot narrow a model (a narrower student is built from a
    config and distilled with a projection). The input model is left untouched.
    """
    total = num_layers(model)
    width = hidden_width(model)
    if hidden_size is not None and hidden_size != width:
        raise ModelError(f"student.cut.hidden_size={hidden_size}, but a cut student keeps its teacher's width "
                         f"({width}): its layers are copied with their weights. For a narrower student use "
                         "student.config (a fresh model, e.g. hidden_size 312) with the hidden-state loss")
    if layers is not None and count is not None and len(layers) != count:
        raise RecipeError(f"student.cut: layers lists {len(layers)} layers but num_layers is {count}")
    keep = default_keep(total, count) if layers is None else [int(i) for i in layers]
    if not keep:
        raise RecipeError("student.cut.layers is empty; keep at least one layer")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise RecipeError(f"student.cut.layers: {bad} out of range; the model has layers 0..{total - 1} (0-based)")
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise RecipeError(f"student.cut.layers must be increasing and distinct, got {keep}")

    note: dict[str, Any] = {"kind": "cut", "from_layers": total, "layers": len(keep), "hidden_size": width}
    if _shares_layers(model):
        _, groups = layer_list(model)
        arch = _arch(model)
        if arch != "albert":
            raise ModelError(f"{arch}: its {total} layers share the weights of {len(groups)} blocks; a cut student "
                             "of a model with shared layers is supported for ALBERT only (which reads its depth from "
                             "its config); use student.config instead")
        if layers is not None and keep != list(range(len(keep))):
            raise ModelError(f"albert: student.cut.layers {keep} cannot be picked: ALBERT's layers share one set of "
                             "weights, so a cut only applies the shared layers fewer times; give "
                             f"student.cut.num_layers: {len(keep)} instead")
        if len(keep) < len(groups):
            raise ModelError(f"albert with {len(groups)} layer groups cannot be cut to {len(keep)} layers: "
                             "every group must still be applied at least once")
        student = copy.deepcopy(model)
        student.config.num_hidden_layers = len(keep)
        note["kept"] = None
        note["albert"] = ("ALBERT shares its layer weights: the student applies the same shared layer "
                          f"{len(keep)} times instead of {total}")
    else:
        _check_aligned(model, layer_list(model)[1], keep)
        student = copy.deepcopy(model)
        name, mods = layer_list(student)
        new = nn.ModuleList([mods[i] for i in keep])
        parent_name, _, attr = name.rpartition(".")
        setattr(student.get_submodule(parent_name) if parent_name else student, attr, new)
        student.config.num_hidden_layers = len(keep)
        types = getattr(student.config, "layer_types", None)
        if isinstance(types, list) and len(types) == total:
            student.config.layer_types = [types[i] for i in keep]
        for j, layer in enumerate(new):  # HF numbers layers for caches; keep the numbering dense
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = j
        note["kept"] = keep
    return student, note


# ----------------------------------------------------------------------------- fresh students

#: config fields a fresh student takes from the reference model unless the recipe sets them
_INHERITED = ("vocab_size", "max_position_embeddings", "type_vocab_size", "pad_token_id", "problem_type")


def student_from_config(spec: dict[str, Any], reference: nn.Module, *, seed: int = 0,
                        task: Any = None) -> tuple[nn.Module, dict]:
    """A randomly initialised model from ``spec`` (``model_type`` + config fields) with the head
    of ``task`` (a :class:`~stackcomp.tasks.Task`; none: a sequence classifier).

    Vocabulary size, positions, token types, padding id and the task settings (label set, an
    embedding model's pooling) come from ``reference`` (the model whose tokenizer and task the
    data were prepared for) unless given. Unknown fields are errors, not silently stored, as
    Hugging Face configs would.
    """
    from transformers import AutoConfig

    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if not isinstance(model_type, str):
        raise RecipeError("student.config needs model_type (e.g. bert, albert, distilbert) and its config fields, "
                          "e.g. {model_type: bert, num_hidden_layers: 4, hidden_size: 312, intermediate_size: 1200, "
                          "num_attention_heads: 12}")
    try:
        default = AutoConfig.for_model(model_type)
    except ValueError:
        raise RecipeError(f"student.config.model_type {model_type!r} is not a Hugging Face architecture") from None
    unknown = sorted(k for k in spec if not hasattr(default, k))
    if unknown:
        raise RecipeError(f"student.config: {model_type} configs have no field(s) {unknown}")
    ref = reference.config
    for key in _INHERITED:
        if key not in spec and hasattr(default, key) and getattr(ref, key, None) is not None:
            spec[key] = getattr(ref, key)
    try:
        config = AutoConfig.for_model(model_type, **spec)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"student.config: {e}") from None
    width, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise RecipeError(f"student.config: hidden_size {width} is not a multiple of num_attention_heads {heads}")
    if task is None:
        from stackcomp.tasks import get_task

        task = get_task("glue/sst2")  # any sequence-classification kind: the labels come from reference
    torch.manual_seed(seed)
    try:
        model = task.model_from_config(config, reference)
    except (ValueError, TypeError) as e:
        raise ModelError(f"student.config: cannot build a {model_type} model for {task.name}: {e}") from None
    device = next(reference.parameters()).device
    note = {"kind": "config", "model_type": model_type, "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size}
    return model.to(device), note


def student_from_pretrained(spec: str, task: Any, tokenizer: Any) -> tuple[nn.Module, dict]:
    """A model id or folder as the student; its tokenizer must match the recipe's."""
    from stackcomp.models import load_base_model

    model, own_tokenizer = load_base_model(spec, task)
    if tokenizer is not None and own_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"student.model {spec!r} uses a different tokenizer vocabulary than the recipe's model; "
                         "the task data are tokenized once with the recipe model's tokenizer, so the student must "
                         "share it")
    note = {"kind": "model", "model": spec, "layers": num_layers(model), "hidden_size": hidden_width(model)}
    return model, note
