"""Stage artifacts on disk: written atomically, checked by checksum, loaded by key.

One artifact is a folder ``<run>/artifacts/<key>/``::

    stage.json        who made it: stage, pass, params, key, parents, versions
    metrics.json      what the stage measured (may be empty)
    report.json       what ``analyze`` found, and what the pass reported
    timings.json      seconds spent in analyze / transform / finetune
    model/            model.safetensors, config.json, stackcomp_manifest.json, tokenizer files
    CHECKSUMS.json    sha256 and size of every file above; written last

Everything is written into a temporary sibling folder and renamed into place, so a kill at
any moment leaves either no artifact or a complete one. An artifact is trusted only if its
``CHECKSUMS.json`` exists and every file matches it; otherwise the stage is recomputed.

A model folder is the Hugging Face layout plus a layer manifest: the base architecture is
rebuilt from ``config.json``, compressed layers are put back from the manifest, then the
weights come from safetensors. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stackcomp.errors import ArtifactError, ModelError
from stackcomp.rundir import ARTIFACTS, CHECKSUMS, MANIFEST, METRICS, MODEL_DIR, STAGE, WEIGHTS, read_json, write_json

MANIFEST_SCHEMA = 1


# ----------------------------------------------------------------------------- file hashes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- model folders


def save_model(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Save a (possibly compressed) Hugging Face model as safetensors + config + layer manifest."""
    from safetensors.torch import save_model as st_save_model

    from stackcomp.nn.base import CompressedLayer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedLayer):
            layers[name] = {"type": type(module).__name__, **module.manifest()}
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "producer": "stackcomp",
        "model_class": type(model).__name__,
        "layers": layers,
    }
    config = getattr(model, "config", None)
    if config is None:
        raise ArtifactError(f"cannot save {type(model).__name__}: stackcomp saves Hugging Face models (with .config)")
    config.save_pretrained(folder)
    for p in model.parameters():
        if not torch.isfinite(p).all():
            from stackcomp.errors import NumericalError

            bad = next(n for n, q in model.named_parameters() if not torch.isfinite(q).all())
            raise NumericalError(f"refusing to save: parameter {bad} holds NaN or Inf")
    # one metadata key: safetensors writes the metadata map in hash order, so two keys make the
    # same weights give different bytes from run to run (the manifest says who produced the folder)
    try:
        st_save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    except Exception as e:  # safetensors reports a failed write (disk full...) as SafetensorError
        raise _as_os_error(e, folder / WEIGHTS) from None
    write_json(folder / MANIFEST, manifest)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _as_os_error(e: Exception, path: Path) -> Exception:
    """safetensors' ``I/O error: ... (os error N)`` as the OSError it was, so callers see errno N."""
    import re

    m = re.search(r"os error (\d+)", str(e))
    if type(e).__name__ == "SafetensorError" and m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    return e


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (or any stage artifact / export folder)."""
    import transformers
    from safetensors.torch import load_model as st_load_model

    from stackcomp.nn.base import layer_class
    from stackcomp.targets import set_module

    folder = Path(folder)
    if (folder / MODEL_DIR / MANIFEST).exists():  # a stage artifact: its model lives in model/
        folder = folder / MODEL_DIR
    if (folder / STAGE).exists() and not (folder / MANIFEST).exists():
        stage = read_json(folder / STAGE)
        if stage.get("model_from"):
            return load_model(folder.parent / stage["model_from"], device)
    if not (folder / MANIFEST).exists():
        raise ModelError(f"{folder} is not a stackcomp model folder (no {MANIFEST}); "
                         "use transformers' from_pretrained for plain Hugging Face folders")
    manifest = read_json(folder / MANIFEST)
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise ArtifactError(f"{folder / MANIFEST}: schema {manifest.get('schema')} is not {MANIFEST_SCHEMA}")
    config = transformers.AutoConfig.from_pretrained(folder)
    model_cls = getattr(transformers, manifest["model_class"], None)
    if model_cls is None:
        raise ArtifactError(f"{folder}: unknown model class {manifest['model_class']!r} in the manifest")
    model = model_cls(config)
    for name, entry in manifest["layers"].items():
        entry = dict(entry)
        cls = layer_class(entry.pop("type"))
        set_module(model, name, cls.from_manifest(entry))
    missing, unexpected = st_load_model(model, str(folder / WEIGHTS), strict=False)
    missing = [m for m in missing if not _is_tied_copy(model, m)]
    if missing or unexpected:
        raise ArtifactError(f"{folder / WEIGHTS}: weights do not match the manifest "
                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()


def _is_tied_copy(model: nn.Module, name: str) -> bool:
    """safetensors drops tied duplicates (e.g. decoder weights tied to embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return name in tied if not isinstance(tied, dict) else name in tied.keys()


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    folder = Path(folder)
    if (folder / MODEL_DIR).is_dir():
        folder = folder / MODEL_DIR
    return AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------- stage artifacts


class ArtifactStore:
    """Stage artifacts addressed by key: ``<run dir>/artifacts`` or a cache folder shared by runs.

    Keys hash everything a stage's result depends on, so recipes that share a prefix (same
    model, task, data and stages) may share one cache and compute that prefix once.
    """

    def __init__(self, root: str | Path, *, artifacts_dir: str | Path | None = None):
        self.root = Path(artifacts_dir) if artifacts_dir is not None else Path(root) / ARTIFACTS

    def path(self, key: str) -> Path:
        return self.root / key

    def is_complete(self, key: str) -> bool:
        return (self.path(key) / CHECKSUMS).exists()

    def verify(self, key: str) -> str | None:
        """None if the artifact is intact, else a sentence saying what is wrong."""
        folder = self.path(key)
        try:
            sums = json.loads((folder / CHECKSUMS).read_text())
        except FileNotFoundError:
            return "incomplete (no checksums)"
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return f"{CHECKSUMS} is corrupt or unreadable"
        if not _well_formed(sums):
            return f"{CHECKSUMS} is corrupt (not a map of relative paths to [sha256, size])"
        for required in (STAGE, METRICS):
            if required not in sums:
                return f"{CHECKSUMS} does not list {required}"
        for rel, (digest, size) in sums.items():
            f = folder / rel
            try:
                if not f.is_file():
                    return f"file {rel} is missing"
                if f.stat().st_size != size:
                    return f"file {rel} has {f.stat().st_size} bytes, expected {size}"
                if sha256_file(f) != digest:
                    return f"file {rel} fails its checksum"
            except OSError as e:
                return f"file {rel} cannot be read ({e.strerror or e})"
        return None

    def begin(self, key: str) -> Path:
        """A fresh temporary folder to write an artifact into."""
        self.root.mkdir(parents=True, exist_ok=True)
        # the writer's pid in the name: a run sharing the cache never removes a live writer's folder
        return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=self.root))

    def commit(self, key: str, tmp: Path) -> Path:
        """Checksum everything in ``tmp``, then rename it into place in one step."""
        sums = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                rel = f.relative_to(tmp).as_posix()
                sums[rel] = [sha256_file(f), f.stat().st_size]
                _fsync(f)
        write_json(tmp / CHECKSUMS, sums)
        _fsync(tmp / CHECKSUMS)
        final = self.path(key)
        if final.exists():  # a corrupt or stale artifact under the same key
            trash = Path(tempfile.mkdtemp(prefix=f".old-{key}-", dir=self.root))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        return final

    def discard(self, key: str) -> None:
        final = self.path(key)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)

    def clean_temporaries(self) -> int:
        """Remove half-written folders left by killed runs (not those of a run still writing)."""
        n = 0
        if self.root.exists():
            for d in self.root.iterdir():
                if d.name.startswith((".tmp-", ".old-")) and not _writer_alive(d.name):
                    shutil.rmtree(d, ignore_errors=True)
                    n += 1
        return n

    def read(self, key: str, name: str) -> Any:
        return read_json(self.path(key) / name)


def _writer_alive(name: str) -> bool:
    """True if a ``.tmp-<key>-<pid>-…`` folder belongs to another live process."""
    parts = name.split("-")
    if not name.startswith(".tmp-") or len(parts) < 4 or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _well_formed(sums: Any) -> bool:
    """CHECKSUMS.json as written by ``commit``: relative paths inside the folder -> [hex digest, size]."""
    if not isinstance(sums, dict):
        return False
    for rel, entry in sums.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            return False
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            return False
    return True


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    _fsync(path)
